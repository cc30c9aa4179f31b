"""Tests of fedsqueeze.training: SGD training, FedProx, evaluation and weight exchange."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedsqueeze.data import Dataset
from fedsqueeze.models import LeNet5, build_model
from fedsqueeze.training import evaluate, get_weights, set_weights, train


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Train on one thread: other processes share the machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_problem(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MNIST-shaped images whose label is a function of the mean pixel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return x, y


def fresh_lenet(seed: int = 0) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5()


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def test_lenet5_learns_mnist_from_3000_samples(mnist: Dataset) -> None:
    model = fresh_lenet(0)
    loss = train(model, mnist.x_train[:3000], mnist.y_train[:3000], epochs=1, seed=0)
    test_loss, accuracy = evaluate(model, mnist.x_test[:1000], mnist.y_test[:1000])
    assert accuracy > 0.8
    assert 0.0 < loss < 2.3  # below the log(10) of guessing
    assert test_loss < 1.0


def test_train_is_deterministic_given_the_seed() -> None:
    x, y = small_problem()
    runs = []
    for seed in (3, 3, 4):
        model = fresh_lenet(0)
        loss = train(model, x, y, batch_size=16, seed=seed)
        runs.append((loss, get_weights(model)))
    assert runs[0][0] == runs[1][0]
    assert distance(runs[0][1], runs[1][1]) == 0.0
    assert distance(runs[0][1], runs[2][1]) > 0.0


def test_train_returns_the_mean_loss_of_the_last_epoch() -> None:
    x, y = small_problem(n=50)
    model = fresh_lenet(1)
    first = train(model, x, y, epochs=1, batch_size=10, lr=0.01)
    later = train(model, x, y, epochs=3, batch_size=10, lr=0.01)
    assert np.isfinite(first) and np.isfinite(later)
    assert later < first
    # lr tiny: the last epoch's mean loss is close to the loss of the (almost unchanged) model
    model = fresh_lenet(2)
    reported = train(model, x, y, batch_size=7, lr=1e-9, momentum=0.0)
    with torch.no_grad():
        direct = float(F.cross_entropy(model(x), y))
    assert reported == pytest.approx(direct, rel=1e-4)


def test_proximal_term_keeps_weights_near_the_start() -> None:
    x, y = small_problem(n=128)
    start = get_weights(fresh_lenet(0))
    moved = {}
    for mu in (0.0, 10.0):
        model = fresh_lenet(0)
        train(model, x, y, epochs=2, batch_size=16, lr=0.05, proximal_mu=mu)
        moved[mu] = distance(get_weights(model), start)
    assert 0.0 < moved[10.0] < 0.7 * moved[0.0]


def test_evaluate_matches_a_direct_computation_whatever_the_batch_size() -> None:
    x, y = small_problem(n=300)
    model = fresh_lenet(5)
    with torch.no_grad():
        logits = model(x)
    expected_loss = float(F.cross_entropy(logits, y))
    expected_acc = float((logits.argmax(1) == y).float().mean())
    for batch_size in (1, 7, 128, 1000):
        loss, acc = evaluate(model, x, y, batch_size=batch_size)
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        assert acc == pytest.approx(expected_acc)
        assert 0.0 <= acc <= 1.0


def test_evaluate_restores_training_mode_and_leaves_no_gradients() -> None:
    x, y = small_problem(n=10)
    model = fresh_lenet(0)
    model.train()
    evaluate(model, x, y)
    assert model.training
    model.eval()
    evaluate(model, x, y)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"proximal_mu": -0.1}, "proximal_mu"),
    ],
)
def test_train_rejects_bad_hyper_parameters(kwargs: dict[str, float], match: str) -> None:
    x, y = small_problem(n=8)
    with pytest.raises(ValueError, match=match):
        train(fresh_lenet(), x, y, **kwargs)


def test_train_and_evaluate_reject_bad_data() -> None:
    x, y = small_problem(n=8)
    with pytest.raises(ValueError, match="differ in length: 8 samples vs 7 labels"):
        train(fresh_lenet(), x, y[:7])
    with pytest.raises(ValueError, match="empty"):
        evaluate(fresh_lenet(), x[:0], y[:0])


def test_get_weights_returns_detached_copies() -> None:
    model = fresh_lenet(0)
    weights = get_weights(model)
    assert list(weights) == list(model.state_dict())
    assert all(not w.requires_grad and w.device.type == "cpu" for w in weights.values())
    before = model.conv1.weight.detach().clone()
    weights["conv1.weight"].add_(1.0)
    assert torch.equal(model.conv1.weight.detach(), before)


def test_set_weights_round_trip() -> None:
    source, target = fresh_lenet(1), fresh_lenet(2)
    x, _ = small_problem(n=4)
    set_weights(target, get_weights(source))
    with torch.no_grad():
        assert torch.equal(source(x), target(x))
    numpy_weights = {k: v.numpy() for k, v in get_weights(fresh_lenet(3)).items()}
    set_weights(target, numpy_weights)
    assert torch.equal(target.fc3.bias.detach(), torch.from_numpy(numpy_weights["fc3.bias"]))


def test_set_weights_names_a_wrong_shape_and_leaves_the_model_unchanged() -> None:
    model = fresh_lenet(0)
    before = get_weights(model)
    weights = get_weights(fresh_lenet(1))
    weights["fc1.weight"] = torch.zeros(120, 576)
    with pytest.raises(ValueError, match=r"fc1\.weight.*expected shape \(120, 400\), found \(120, 576\)"):
        set_weights(model, weights)
    assert distance(get_weights(model), before) == 0.0


def test_set_weights_names_a_missing_or_unexpected_tensor() -> None:
    model = fresh_lenet(0)
    weights = get_weights(model)
    del weights["conv2.bias"]
    with pytest.raises(ValueError, match="lack 'conv2.bias'"):
        set_weights(model, weights)
    weights = get_weights(model)
    weights["fc4.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="'fc4.weight', which the model does not have"):
        set_weights(model, weights)
    with pytest.raises(ValueError, match="fc3.weight"):
        set_weights(build_model("cifar-cnn"), get_weights(model))
