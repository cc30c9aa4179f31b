"""Golden blobs of wire format v1: checked-in blobs must keep decoding to the checked-in tensors.

A change of the format or of a stage's decoding fails here. Regenerate the blobs only on
purpose (and bump the format version): ``python tests/golden/regenerate.py``.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch

from fedsqueeze.codecs import blob_spec, decode, parse, registered_stages
from fedsqueeze.codecs._pipeline import read_header

GOLDEN = pathlib.Path(__file__).parent / "golden"
MANIFEST: dict[str, str] = json.loads((GOLDEN / "manifest.json").read_text())


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("golden_regenerate", GOLDEN / "regenerate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stem", sorted(MANIFEST))
def test_golden_blob_decodes_to_the_stored_tensors(stem: str) -> None:
    blob = (GOLDEN / f"{stem}.fsqz").read_bytes()
    assert blob[:5] == b"FSQZ\x01"
    assert blob_spec(blob) == parse(MANIFEST[stem]).spec
    decoded = decode(blob)
    with np.load(GOLDEN / f"{stem}.npz", allow_pickle=False) as expected:
        assert sorted(decoded) == sorted(expected.files)
        for name, tensor in decoded.items():
            want = expected[name]
            got = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
            assert got.dtype == want.dtype and got.shape == want.shape, name
            if _multiplies_factors(MANIFEST[stem]) and not np.array_equal(got, want):
                # BLAS products of the factors round by the CPU's kernels (AVX2, AVX-512, AMX): a few ulps
                # of the largest value apart across machines; a change of the format is far beyond that
                bound = PRODUCT_ULPS * np.finfo(np.float32).eps * float(np.abs(want).max())
                assert float(np.abs(got - want).max()) <= bound, f"{stem}: {name} decodes differently"
                continue
            assert np.array_equal(got, want), f"{stem}: {name} decodes differently"


PRODUCT_ULPS = 16
"""How far (in float32 epsilons of a tensor's largest magnitude) a decode that multiplies factors may differ
from the golden tensors: this repository's low-rank stages decode with matrix products, and MKL picks its
kernels per CPU; the golden tensors of ``cp`` and ``tucker`` were 1 ulp off on a machine with AMX and
AVX-512 (the stored ones came from another)."""


def _multiplies_factors(spec: str) -> bool:
    return any(stage.name in ("svd", "powersgd", "tucker", "cp") for stage in parse(spec).stages)


def test_every_registered_stage_has_a_golden_blob() -> None:
    covered = {stage.name for spec in MANIFEST.values() for stage in parse(spec).stages}
    assert covered == set(registered_stages())


def test_each_single_stage_blob_really_uses_its_stage() -> None:
    # a blob in which the stage declined every tensor would pin nothing but the raw format
    module = _generator()
    update = module.golden_update()  # type: ignore[attr-defined]
    identity_body = read_header(parse("identity").encode(update))[2]
    plain = bytes(identity_body.take(identity_body.remaining, "body"))
    for stem, spec in MANIFEST.items():
        codec = parse(spec)
        if len(codec.stages) > 1 or codec.stages[0].name in ("identity", "zstd"):
            continue
        r = read_header((GOLDEN / f"{stem}.fsqz").read_bytes())[2]
        assert bytes(r.take(r.remaining, "body")) != plain, f"{spec} left every tensor raw"


def test_the_golden_update_is_what_the_blobs_were_made_from() -> None:
    module = _generator()
    update = module.golden_update()  # type: ignore[attr-defined]
    lossless = decode((GOLDEN / "identity.fsqz").read_bytes())
    assert all(torch.equal(lossless[name], update[name]) for name in update)
    assert set(module.golden_specs()) == set(MANIFEST)  # type: ignore[attr-defined]
