"""ServerDistiller with LSQ fine-tuning and sensitivity pruning (optional run-config keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedsqueeze.config import RunConfig
from fedsqueeze.data import Dataset, normalisation
from fedsqueeze.models import build_model
from fedsqueeze.server.compact import build_student, count_parameters
from fedsqueeze.server.export import load_exported
from fedsqueeze.server.server_distiller import (
    QuantisationSettings,
    ServerDistiller,
    compact_config,
    prune_method,
    quantisation_settings,
)


def _run(**extra: Any) -> dict[str, Any]:
    base = RunConfig.from_mapping(
        {"distill-every": 1, "distill-epochs": 1, "proxy-size": 200, "num-server-rounds": 1, "student-prune-ratio": 0.5}
    ).as_dict()
    return {**base, **extra}


def _pixel_dataset(num_train: int, num_test: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    (mean,), (std,) = normalisation("mnist")

    def images(n: int) -> torch.Tensor:
        return (torch.randint(0, 256, (n, 1, 28, 28), generator=generator).float() / 255.0 - mean) / std

    labels = torch.randint(0, 10, (num_train + num_test,), generator=generator)
    return Dataset("mnist", images(num_train), labels[:num_train], images(num_test), labels[num_train:])


def test_optional_keys_default_to_the_old_behaviour_and_reject_bad_values() -> None:
    assert quantisation_settings(_run()) == QuantisationSettings(0, 2)
    assert quantisation_settings(_run(**{"student-weight-bits": 4, "student-qat-epochs": 3})) == QuantisationSettings(
        4, 3
    )
    assert (
        prune_method(_run()) == "norm"
        and prune_method(_run(**{"student-prune-method": "sensitivity"})) == "sensitivity"
    )
    for key, value, match in (
        ("student-weight-bits", 1, "0 \\(off\\) or 2..8"),
        ("student-weight-bits", True, "0 \\(off\\) or 2..8"),
        ("student-qat-epochs", 0, "integer >= 1"),
        ("student-prune-method", "random", "'norm' or 'sensitivity'"),
    ):
        with pytest.raises(ValueError, match=match):
            (prune_method if key == "student-prune-method" else quantisation_settings)(_run(**{key: value}))


def test_lsq_student_with_sensitivity_pruning_is_exported_packed(tmp_path: Path) -> None:
    run = _run(**{"student-weight-bits": 4, "student-prune-method": "sensitivity"})
    distiller = ServerDistiller(run, _pixel_dataset(400, 64), lambda: build_model("lenet5", "mnist"))
    torch.manual_seed(0)
    teacher = build_model("lenet5", "mnist")
    distiller.distill_round(1, teacher)
    report = distiller.export(tmp_path)
    student = report["student"]
    assert student["torchscript_file"] == "compact/student_lsq4.pt"
    assert set(student["weight_bits"].values()) == {4}
    assert set(student["prune_ratios"]) == {"conv1", "conv2", "fc1", "fc2"} and student["prune_method"] == "sensitivity"
    uniform = count_parameters(build_student(teacher, compact_config(run)))
    weights = sum(p.numel() for n, p in distiller.student.named_parameters() if not n.endswith(".step"))
    assert weights <= uniform  # the same size budget as uniform pruning
    model = load_exported(tmp_path / student["torchscript_file"])
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    assert report["size_ratio"] > 20
