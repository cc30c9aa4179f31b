"""Contract tests run over every registered stage and several pipelines."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedsqueeze.codecs import Codec, EncodeContext, ErrorFeedback, compression_stats, decode, parse, registered_stages
from fedsqueeze.codecs._wire import tensor_to_bytes
from fedsqueeze.codecs.stage_api import EncodeFurther

# Pipelines beyond the single stages; every registered stage is tested alone as well.
PIPELINES = [
    "topk(ratio=0.01) | quantize(bits=8) | zstd(level=3)",
    "topk(ratio=0.05) | ternary | zstd",
    "topk(ratio=0.02, dense_below=200) | quantize(bits=8) | zstd",
    "randomk(ratio=0.1, seed=3) | fp16",
    "svd(rank=2) | quantize(bits=4) | zstd",
    "powersgd(rank=2, iters=2) | bf16",
    "tucker(ranks=(2, 3)) | quantize(bits=8, granularity=channel)",
    "cp(rank=2, iters=5) | fp16 | zstd",
    "threshold(value=0.5) | sign",
    "quantize(bits=2, stochastic=true, granularity=64) | zstd(level=1)",
    "identity | zstd",
    "budget(bpp=0.5) | topk | quantize(bits=4) | zstd",
    "budget(bpp=2) | svd(rank=2) | quantize | zstd",
]


def all_specs() -> list[str]:
    return sorted(registered_stages()) + PIPELINES


def make_update(seed: int = 0) -> dict[str, torch.Tensor | np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return {
        "features.0.weight": torch.randn(32, 16, 3, 3, generator=g),
        "classifier.weight": torch.randn(120, 400, generator=g) * 1e-2,
        "classifier.bias": torch.randn(120, generator=g),
        "half": torch.randn(64, 64, generator=g).half(),
        "double": np.random.default_rng(seed).normal(size=(300,)),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "mask": torch.rand(50, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("spec", all_specs())
def test_names_shapes_dtypes_survive(spec: str) -> None:
    update = make_update()
    out = decode(parse(spec, seed=1).encode(update))
    assert list(out) == list(update)
    for name, value in update.items():
        ref = torch.as_tensor(value)
        assert out[name].shape == ref.shape, name
        assert out[name].dtype == ref.dtype, name
        assert bool(torch.isfinite(out[name].float()).all())
    # non-float tensors always travel losslessly
    assert torch.equal(out["bn.num_batches_tracked"], update["bn.num_batches_tracked"])
    assert torch.equal(out["mask"], update["mask"])


@pytest.mark.parametrize("spec", all_specs())
def test_spec_round_trips(spec: str) -> None:
    codec = parse(spec)
    again = parse(codec.spec)
    assert again == codec
    assert again.spec == codec.spec
    assert Codec(list(codec.stages)) == codec


@pytest.mark.parametrize("name", sorted(registered_stages()))
def test_lossless_stages_are_exact_and_lossy_ones_say_so(name: str) -> None:
    update = make_update(1)
    out = decode(parse(name).encode(update))
    exact = all(torch.equal(out[k], torch.as_tensor(v)) for k, v in update.items())
    if registered_stages()[name].lossless:
        assert exact
    else:
        assert not exact


# threshold's default cut-off (1e-3) keeps every entry of this input: give it one that bites
SHRINK_SPECS = [
    {"threshold": "threshold(value=2.0)"}.get(s, s) for s in all_specs() if not parse(s).lossless or "zstd" in s
]


@pytest.mark.parametrize("spec", [*sorted(registered_stages()), "quantize(stochastic=true)", "quantize(bits=2)"])
def test_a_stage_that_draws_nothing_encodes_the_same_with_any_seed(spec: str) -> None:
    # the encoder hands seed 0, not a hashed seed per tensor, to a stage whose draws_random is False
    stage = parse(spec).stages[0]
    if stage.kind != "tensor" or stage.allocates:
        return
    if spec == "quantize(stochastic=true)":
        assert stage.draws_random  # its rounding draws from the seed
    if stage.draws_random:
        return
    g = torch.Generator().manual_seed(5)
    for x in (torch.randn(120, 400, generator=g), torch.randn(300, generator=g) * 1e-3):
        outputs = [stage.encode(x, EncodeContext(name="x", state={}, seed=seed)) for seed in (0, 1, 2**62 + 3)]
        layouts = [None if out is None else [_part_bytes(part) for part in out.parts] + [out.meta] for out in outputs]
        assert layouts[0] == layouts[1] == layouts[2], spec


def _part_bytes(part: torch.Tensor | EncodeFurther) -> bytes:
    t = part.tensor if isinstance(part, EncodeFurther) else part
    return bytes(tensor_to_bytes(t)) + str((t.dtype, tuple(t.shape))).encode()


@pytest.mark.parametrize("spec", SHRINK_SPECS)
def test_bytes_shrink_where_the_stage_compresses(spec: str) -> None:
    g = torch.Generator().manual_seed(5)
    # compressible input for every kind of stage: low rank conv kernels and matrices
    update = {
        "conv": torch.einsum("or,ir,yr,xr->oiyx", *(torch.randn(n, 2, generator=g) for n in (64, 32, 3, 3))),
        "fc": torch.randn(256, 2, generator=g) @ torch.randn(2, 512, generator=g),
    }
    blob = parse(spec, seed=0).encode(update)
    stats = compression_stats(update, blob)
    assert stats.blob_bytes == len(blob)
    assert stats.ratio > 1.05, f"{spec}: {stats}"
    assert stats.bits_per_param == pytest.approx(8 * len(blob) / stats.num_params)


@pytest.mark.parametrize("spec", all_specs())
def test_error_feedback_state_round_trips(spec: str) -> None:
    ef = ErrorFeedback(parse(spec, seed=2))
    ef.encode(make_update(2))
    restored = ErrorFeedback(parse(spec, seed=2))
    restored.load_state_dict(ef.state_dict())
    assert restored.state_dict().keys() == ef.state_dict().keys()
    for key, value in ef.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)
    nxt = make_update(3)
    assert ef.encode(nxt) == restored.encode(nxt)


@pytest.mark.parametrize("spec", all_specs())
def test_error_feedback_state_without_copies_gives_the_same_rounds(spec: str) -> None:
    # client/mod.py hands error feedback fresh state and serializes what it returns at once
    # (copy=False); three rounds must send the same blobs and keep the same residuals as with copies
    copying, sharing = ErrorFeedback(parse(spec, seed=2)), ErrorFeedback(parse(spec, seed=2))
    saved: dict[str, torch.Tensor] = {}
    for round_ in range(3):
        update = make_update(round_)
        blob = copying.encode(update)
        fresh = ErrorFeedback(parse(spec, seed=2))
        given = {k: v.clone() for k, v in saved.items()}
        fresh.load_state_dict(given, copy=False)
        assert fresh.encode(update) == blob, (spec, round_)
        assert all(torch.equal(v, saved[k]) for k, v in given.items())  # the state it took is not edited
        saved = fresh.state_dict(copy=False)
        for key, value in copying.state_dict().items():
            assert torch.equal(saved[key], value), (spec, round_, key)
    sharing.load_state_dict(saved, copy=False)
    before = {k: v.clone() for k, v in saved.items()}
    sharing.encode(make_update(9))
    assert all(torch.equal(saved[k], before[k]) for k in saved)  # an encode replaces the residual, never edits it


def test_stage_objects_and_spec_strings_build_the_same_codec() -> None:
    from fedsqueeze.codecs import Quantize, TopK, Zstd

    by_objects = TopK(ratio=0.01) | Quantize(bits=4) | Zstd(level=3)
    assert by_objects == parse("topk(ratio=0.01) | quantize(bits=4) | zstd(level=3)")
    update = make_update()
    assert by_objects.encode(update) == parse(by_objects.spec).encode(update)


def test_every_stage_is_a_frozen_dataclass_with_docstring() -> None:
    for name, cls in registered_stages().items():
        assert dataclasses.is_dataclass(cls), name
        assert cls.__doc__ and "Math" in cls.__doc__ and "Cost" in cls.__doc__ and "Pays" in cls.__doc__, name


DROP_IN_STAGE = '''
from dataclasses import dataclass
from typing import ClassVar

import torch

from .stage_api import (
    EncodeContext, Encoded, EncodeFurther, Stage, check_param, expect_part, expect_parts, register_stage,
)


@register_stage
@dataclass(frozen=True)
class Scale(Stage):
    """Math: y = x. Cost: none. Pays: never; a test stage."""

    name: ClassVar[str] = "scale"
    factor: float = 2.0

    def __post_init__(self) -> None:
        check_param(self.factor > 0, self.name, "factor", "a number > 0", self.factor)

    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        return Encoded([EncodeFurther(x / self.factor)])

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        expect_parts(self.name, parts, 1)
        expect_part(self.name, parts[0], "the values", dtype=torch.float32, shape=shape)
        return parts[0] * self.factor
'''


def test_a_stage_file_dropped_into_the_package_is_registered(tmp_path: pathlib.Path) -> None:
    # a copy of the package under another name, plus one new file and no other edit
    import fedsqueeze.codecs

    package = tmp_path / "dropin_codecs"
    shutil.copytree(
        pathlib.Path(fedsqueeze.codecs.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__")
    )
    (package / "_scale.py").write_text(DROP_IN_STAGE)
    script = (
        "import torch, dropin_codecs as c\n"
        "assert 'scale' in c.registered_stages()\n"
        "x = torch.randn(5, 3)\n"
        "y = c.decode(c.parse('scale(factor=4) | quantize(bits=8)').encode({'x': x}))['x']\n"
        "assert float((y - x).abs().max()) < 0.05, float((y - x).abs().max())\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_stage_author_helpers_are_public() -> None:
    from fedsqueeze.codecs import stage_api

    for name in (
        "Stage",
        "EncodeFurther",
        "Encoded",
        "EncodeContext",
        "DecodeCost",
        "register_stage",
        "check_param",
        "expect",
        "expect_part",
        "expect_parts",
        "is_int",
        "is_number",
        "CodecError",
    ):
        assert hasattr(stage_api, name) and not name.startswith("_"), name
    for method in (
        stage_api.Stage.encode,
        stage_api.Stage.decode,
        stage_api.Stage.encode_bytes,
        stage_api.Stage.decode_bytes,
        stage_api.Stage.decode_cost,
    ):
        doc = method.__doc__ or ""
        assert "Parameters" in doc or "Raise" in doc, method.__name__
    assert "later stages" in (stage_api.EncodeFurther.__doc__ or "")
