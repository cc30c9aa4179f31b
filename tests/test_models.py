"""Tests of fedsqueeze.models: parameter counts, output shapes, build_model and determinism."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.models import (
    DATASET_SHAPES,
    MODEL_NAMES,
    CifarCNN,
    LeNet5,
    McMahanCNN,
    build_model,
)

CLASSES = {"lenet5": LeNet5, "mcmahan-cnn": McMahanCNN, "cifar-cnn": CifarCNN}


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet5_has_61706_parameters_on_mnist() -> None:
    assert num_params(LeNet5()) == 61_706
    assert num_params(build_model("lenet5", "mnist")) == 61_706


def test_mcmahan_cnn_has_1663370_parameters_on_mnist() -> None:
    assert num_params(McMahanCNN()) == 1_663_370
    assert num_params(build_model("mcmahan-cnn", "mnist")) == 1_663_370


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("dataset", sorted(DATASET_SHAPES))
def test_docstring_states_the_measured_parameter_count(name: str, dataset: str) -> None:
    count = num_params(build_model(name, dataset))
    assert f"{count:,}" in CLASSES[name].__doc__


def test_model_names_are_the_three_models() -> None:
    assert set(MODEL_NAMES) == {"lenet5", "mcmahan-cnn", "cifar-cnn"}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("dataset", sorted(DATASET_SHAPES))
def test_forward_gives_one_logit_per_class(name: str, dataset: str) -> None:
    channels, size, num_classes = DATASET_SHAPES[dataset]
    model = build_model(name, dataset)
    out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_input_shape_and_classes_follow_the_dataset() -> None:
    assert DATASET_SHAPES["mnist"] == (1, 28, 10)
    assert DATASET_SHAPES["cifar10"] == (3, 32, 10)
    model = build_model("lenet5", "cifar10")
    assert model.conv1.in_channels == 3
    with pytest.raises(RuntimeError):  # an MNIST image does not fit a CIFAR-10 model
        model(torch.randn(1, 1, 28, 28))


def test_custom_class_count() -> None:
    model = McMahanCNN(in_channels=1, num_classes=62, image_size=28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 62)


def test_build_model_rejects_unknown_model_and_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="resnet") as info:
        build_model("resnet")
    for name in MODEL_NAMES:
        assert name in str(info.value)


def test_build_model_rejects_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="svhn.*mnist.*cifar10"):
        build_model("lenet5", "svhn")


@pytest.mark.parametrize("kwargs", [{"image_size": 8}, {"num_classes": 1}, {"in_channels": 0}])
def test_constructor_rejects_impossible_shapes(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LeNet5(**kwargs)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_initialisation_is_deterministic_given_the_seed(name: str) -> None:
    torch.manual_seed(7)
    first = build_model(name).state_dict()
    torch.manual_seed(7)
    second = build_model(name).state_dict()
    torch.manual_seed(8)
    third = build_model(name).state_dict()
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["conv1.weight"], third["conv1.weight"])


def test_models_have_no_batchnorm_buffers() -> None:
    for name in MODEL_NAMES:
        model = build_model(name)
        assert list(model.buffers()) == []
