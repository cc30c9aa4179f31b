"""Test-only: turn the SuperNode whose environment puts this folder on PYTHONPATH into a hostile one.

Python imports ``sitecustomize`` at the start of every process, so this reaches the ClientApp processes
(``flwr-clientapp``) that the SuperNode starts, without anything hostile in the package: once
``fedsqueeze.client.app`` has been imported, each of its registered handlers is wrapped, outermost, with
:func:`fedsqueeze.simulation.hostile.hostile_mod` for the kinds named in ``FEDSQUEEZE_TEST_HOSTILE_KINDS``
(comma-separated; the node's partition is ``FEDSQUEEZE_TEST_HOSTILE_PARTITION``). Other processes only pay
for one entry in ``sys.meta_path``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

TARGET = "fedsqueeze.client.app"


def _make_hostile(module: ModuleType) -> None:
    from flwr.client.mod.utils import make_ffn

    from fedsqueeze.simulation.hostile import hostile_mod

    kinds = os.environ["FEDSQUEEZE_TEST_HOSTILE_KINDS"].split(",")
    mod = hostile_mod({int(os.environ["FEDSQUEEZE_TEST_HOSTILE_PARTITION"])}, kinds)
    app = module.app
    # Flower binds mods to each handler when it is registered: wrap the bound handlers themselves
    for name, handler in list(app._registered_funcs.items()):  # noqa: SLF001 (test-only injection)
        app._registered_funcs[name] = make_ffn(handler, [mod])  # noqa: SLF001
    print(f"sitecustomize: ClientApp made hostile ({kinds})", file=sys.stderr, flush=True)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # find the real module, once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            _make_hostile(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("FEDSQUEEZE_TEST_HOSTILE_KINDS"):
    sys.meta_path.insert(0, _PatchAfterImport())
