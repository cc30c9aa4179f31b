"""Tests of the compact student: factored layers, structured pruning and build_student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsqueeze.server.compact import (
    CompactConfig,
    LowRankConv2d,
    LowRankLinear,
    Tucker2Conv2d,
    build_student,
    count_parameters,
    prune_chain,
    resolve_rank,
    to_chain,
)


class TinyCNN(nn.Module):
    """LeNet-like: two convs, a functional flatten with view, three linears (12x12 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3)
        self.fc1 = nn.Linear(12 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 8 x 6 x 6
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 12 x 2 x 2
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _tiny(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN().eval()


def _inputs(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def _svd_tail(matrix: torch.Tensor, rank: int) -> float:
    """Frobenius norm of the best rank-``rank`` approximation error (Eckart-Young)."""
    s = torch.linalg.svdvals(matrix.detach().double())
    return float(s[rank:].pow(2).sum().sqrt())


# ------------------------------------------------------------------------------------ factoring


def test_low_rank_linear_is_exact_at_full_rank_and_optimal_below() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(20, 12)
    x = torch.randn(7, 20)
    full = LowRankLinear.from_dense(dense, 12)
    torch.testing.assert_close(full(x), dense(x), atol=1e-5, rtol=1e-5)

    low = LowRankLinear.from_dense(dense, 4)
    product = low.expand.weight @ low.reduce.weight
    err = float(torch.linalg.matrix_norm(product.double() - dense.weight.double()).detach())
    assert err == pytest.approx(_svd_tail(dense.weight, 4), rel=1e-4)
    assert err > 0.1  # really truncated
    assert count_parameters(low) == 20 * 4 + 4 * 12 + 12


def test_low_rank_conv_is_exact_at_full_rank_and_optimal_below() -> None:
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 10, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9)
    full = LowRankConv2d.from_dense(dense, 10)  # min(10, 3*3*3) = 10
    torch.testing.assert_close(full(x), dense(x), atol=1e-5, rtol=1e-5)

    low = LowRankConv2d.from_dense(dense, 3)
    product = low.expand.weight.reshape(10, 3) @ low.reduce.weight.reshape(3, -1)
    err = float(torch.linalg.matrix_norm(product.double() - dense.weight.reshape(10, -1).double()).detach())
    assert err == pytest.approx(_svd_tail(dense.weight.reshape(10, -1), 3), rel=1e-4)
    with torch.no_grad():
        rel_out = float((low(x) - dense(x)).norm() / dense(x).norm())
    assert 0.01 < rel_out < 1.0


def test_tucker2_conv_is_exact_at_full_ranks_and_improves_with_rank() -> None:
    torch.manual_seed(0)
    dense = nn.Conv2d(6, 8, 3, padding=1)
    x = torch.randn(2, 6, 7, 7)
    full = Tucker2Conv2d.from_dense(dense, 6, 8)
    torch.testing.assert_close(full(x), dense(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        errors = [float((Tucker2Conv2d.from_dense(dense, r, r)(x) - dense(x)).norm()) for r in (2, 4, 6)]
    assert errors[0] > errors[1] > errors[2] > 0


def test_factoring_rejects_out_of_range_rank() -> None:
    with pytest.raises(ValueError, match="rank must be in"):
        LowRankLinear.from_dense(nn.Linear(5, 3), 4)
    with pytest.raises(ValueError, match="groups=1"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 2)


def test_resolve_rank() -> None:
    assert resolve_rank(0.25, 40) == 10
    assert resolve_rank(0.001, 40) == 1
    assert resolve_rank(100, 40) == 40
    assert resolve_rank(None, 40) is None
    with pytest.raises(ValueError):
        resolve_rank(1.5, 40)
    with pytest.raises(TypeError):
        resolve_rank(True, 40)


# ------------------------------------------------------------------------------ reading models


def test_to_chain_reads_functional_forward_and_sequential_alike() -> None:
    model = _tiny()
    chain = to_chain(model)
    kinds = [type(m).__name__ for _, m in chain]
    assert kinds == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten",
        "Linear", "ReLU", "Linear", "ReLU", "Linear",
    ]  # fmt: skip
    assert [n for n, _ in chain if n.startswith(("conv", "fc"))] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    rebuilt = nn.Sequential(*[m for _, m in chain])
    x = _inputs()
    torch.testing.assert_close(rebuilt(x), model(x))
    assert len(to_chain(rebuilt)) == len(chain)


def test_to_chain_rejects_a_residual_model() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + x

    with pytest.raises(ValueError, match="chain"):
        to_chain(Residual())


# -------------------------------------------------------------------------------------- pruning


def test_pruning_zero_filters_and_units_keeps_outputs_exactly() -> None:
    """Filters/units whose weights and bias are 0 contribute nothing: removing them structurally
    (including the flatten's column blocks in fc1) must leave the outputs unchanged."""
    model = _tiny()
    with torch.no_grad():
        for layer, dead in ((model.conv1, [1, 4, 6, 7]), (model.conv2, [0, 5, 9]), (model.fc1, list(range(0, 32, 2)))):
            layer.weight[dead] = 0.0
            layer.bias[dead] = 0.0
    x = _inputs()
    config = CompactConfig(
        conv_rank=None, linear_rank=None, prune_ratio=0.25, linear_prune_ratio=0.5, no_prune=("fc2",)
    )
    student = build_student(model, config)
    assert student.conv1.out_channels == 6 and student.conv2.in_channels == 6
    assert student.conv2.out_channels == 9 and student.fc1.in_features == 9 * 4
    assert student.fc1.out_features == 16 and student.fc2.in_features == 16
    assert student.fc3.out_features == 5  # the classes are never pruned
    torch.testing.assert_close(student(x), model(x), atol=1e-6, rtol=1e-5)


def test_l1_and_l2_norm_keep_different_filters() -> None:
    conv = nn.Conv2d(1, 2, (1, 4), bias=False)
    nxt = nn.Conv2d(2, 1, 1)
    with torch.no_grad():
        conv.weight[0] = torch.tensor([1.0, 1.0, 1.0, 1.0]).view(1, 1, 4)  # l1 4, l2 2
        conv.weight[1] = torch.tensor([3.0, 0.0, 0.0, 0.0]).view(1, 1, 4)  # l1 3, l2 3
    kept = {}
    for norm in ("l1", "l2"):
        chain = [("a", type(conv)(1, 2, (1, 4), bias=False)), ("b", type(nxt)(2, 1, 1))]
        chain[0][1].load_state_dict(conv.state_dict())
        chain[1][1].load_state_dict(nxt.state_dict())
        prune_chain(chain, 0.5, 0.0, norm)
        kept[norm] = chain[0][1].weight.flatten().tolist()
        assert chain[1][1].weight.shape == (1, 1, 1, 1)
    assert kept["l1"] == [1.0, 1.0, 1.0, 1.0]
    assert kept["l2"] == [3.0, 0.0, 0.0, 0.0]


def test_higher_prune_ratio_gives_fewer_parameters_and_smaller_shapes() -> None:
    model = _tiny()
    params, widths = [], []
    for ratio in (0.0, 0.25, 0.5, 0.75):
        student = build_student(model, CompactConfig(conv_rank=None, linear_rank=None, prune_ratio=ratio))
        params.append(count_parameters(student))
        widths.append((student.conv1.out_channels, student.conv2.out_channels, student.fc1.out_features))
        assert student(_inputs()).shape == (16, 5)
    assert params == sorted(params, reverse=True) and len(set(params)) == 4
    assert widths[0] == (8, 12, 32) and widths[-1] == (2, 3, 8)


# ------------------------------------------------------------------------------ build_student


def test_smaller_rank_gives_fewer_parameters() -> None:
    model = _tiny()
    counts = []
    for rank in (1.0, 0.5, 0.25, 0.1):
        student = build_student(model, CompactConfig(conv_rank=rank, linear_rank=rank, keep_dense=()))
        counts.append(count_parameters(student))
        assert student(_inputs()).shape == (16, 5)
    assert counts[0] == count_parameters(model)  # full rank never saves: everything stays dense
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4


def test_layers_stay_dense_when_factoring_would_not_save_or_when_kept() -> None:
    model = _tiny()
    student = build_student(model, CompactConfig(conv_rank=0.5, linear_rank=0.25))
    assert type(student.conv1) is nn.Conv2d  # kept dense: "first_conv"
    assert type(student.fc3) is nn.Linear  # kept dense: "last_linear"
    assert isinstance(student.conv2, LowRankConv2d) and isinstance(student.fc1, LowRankLinear)
    # conv1 has 1*3*3 = 9 inputs per filter: rank 8 of 8 filters would be larger than dense
    student = build_student(model, CompactConfig(conv_rank=8, linear_rank=None, keep_dense=()))
    assert type(student.conv1) is nn.Conv2d


def test_build_student_tucker_and_per_layer_ranks() -> None:
    model = _tiny()
    config = CompactConfig(conv_init="tucker2", conv_rank=0.5, linear_rank=None, layer_ranks={"conv2": 0.25})
    student = build_student(model, config)
    assert isinstance(student.conv2, Tucker2Conv2d)
    assert student.conv2.core.weight.shape[:2] == (3, 2)  # out 12 * 0.25, in 8 * 0.25
    assert model.conv2.weight.shape == (12, 8, 3, 3)  # teacher untouched
    with pytest.raises(ValueError, match="unknown layer"):
        build_student(model, CompactConfig(layer_ranks={"nope": 2}))


def test_low_rank_student_approximates_the_teacher() -> None:
    model = _tiny()
    x = _inputs(64)
    gaps = []
    for rank in (1.0, 0.75, 0.25):
        student = build_student(model, CompactConfig(conv_rank=rank, linear_rank=rank, keep_dense=()))
        with torch.no_grad():
            gaps.append(float((student(x) - model(x)).norm() / model(x).norm()))
    assert gaps[0] < 1e-5 and gaps[0] < gaps[1] < gaps[2]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="norm"):
        CompactConfig(norm="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prune ratios"):
        CompactConfig(prune_ratio=1.0)
    with pytest.raises(ValueError, match="bits"):
        CompactConfig(bits=4)


def test_pruning_a_factored_model_is_refused() -> None:
    student = build_student(_tiny(), CompactConfig(conv_rank=None, linear_rank=0.25))
    with pytest.raises(ValueError, match="factored"):
        build_student(student, CompactConfig(prune_ratio=0.5))
    again = build_student(student, CompactConfig(conv_rank=None, linear_rank=None))  # re-reading is fine
    torch.testing.assert_close(again(_inputs()), student(_inputs()))


def test_every_subpackage_is_listed_for_installation() -> None:
    """pyproject lists packages one by one: a split into a new package folder must be listed there too."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(("fedsqueeze", *init.parent.relative_to(root).parts))
        for init in root.rglob("__init__.py")
        if not {"tests", "benchmarks", ".venv", ".git"} & set(init.relative_to(root).parts)
    }
    assert found - listed == set(), f"packages missing from pyproject's [tool.setuptools] packages: {found - listed}"
    assert "fedsqueeze.server.compact" in found


def test_compact_package_reexports_its_modules_names() -> None:
    from fedsqueeze.server import compact
    from fedsqueeze.server.compact import build, chain, layers, lsq, prune, sensitivity

    for name in compact.__all__:
        assert getattr(compact, name) is next(
            getattr(m, name) for m in (build, chain, layers, lsq, prune, sensitivity) if hasattr(m, name)
        )
