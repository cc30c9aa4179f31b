"""RunConfig: one typed place for defaults, equal to pyproject's, with clear errors for bad keys and values."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedsqueeze.config import RunConfig, proxy_holdout


def pyproject_app_config() -> dict[str, object]:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    table: dict[str, object] = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    return table


def test_defaults_equal_pyprojects_app_config_key_for_key() -> None:
    table = pyproject_app_config()
    assert sorted(table) == sorted(RunConfig())  # the same keys
    for key, value in table.items():
        assert RunConfig()[key] == value and type(RunConfig()[key]) is type(value), key
    assert RunConfig.from_mapping(table) == RunConfig()


def test_values_are_typed_and_ints_pass_as_floats() -> None:
    run = RunConfig.from_mapping({"lr": 1, "num-server-rounds": 3, "uplink-codec": "sign"})
    assert run.lr == 1.0 and isinstance(run.lr, float) and run["lr"] == 1.0
    assert run.num_server_rounds == 3 and run.uplink_codec == "sign"
    assert run.as_dict()["num-server-rounds"] == 3 and dict(run) == run.as_dict()
    with pytest.raises(ValueError, match="'num-server-rounds' must be int.*float 2.5"):
        RunConfig.from_mapping({"num-server-rounds": 2.5})
    with pytest.raises(ValueError, match="'uplink-codec' must be str"):
        RunConfig.from_mapping({"uplink-codec": 8})
    with pytest.raises(ValueError, match="'error-feedback' must be bool"):
        RunConfig.from_mapping({"error-feedback": 1})


def test_unknown_keys_are_refused_with_the_closest_known_key() -> None:
    with pytest.raises(ValueError, match="unknown run config key 'num-server-round'.*'num-server-rounds'"):
        RunConfig.from_mapping({"num-server-round": 3})
    with pytest.raises(ValueError, match="unknown run config key 'zzz'"):
        RunConfig.from_mapping({"zzz": 1})


def test_choices_and_ranges_are_checked() -> None:
    with pytest.raises(ValueError, match="'initial-model' must be one of"):
        RunConfig.from_mapping({"initial-model": "random"})
    with pytest.raises(ValueError, match="'batch-size' must be >= 1"):
        RunConfig.from_mapping({"batch-size": 0})
    with pytest.raises(ValueError, match="max-feedback-staleness"):
        RunConfig.from_mapping({"max-feedback-staleness": -1})
    with pytest.raises(ValueError, match="'server-momentum' must be in \\[0, 1\\)"):
        RunConfig.from_mapping({"server-momentum": 1.0})


def test_the_config_is_frozen() -> None:
    run = RunConfig()
    with pytest.raises(AttributeError):
        run.lr = 0.1  # type: ignore[misc]


def test_proxy_holdout_follows_distillation() -> None:
    assert RunConfig().proxy_holdout() == 0
    assert proxy_holdout({"distill-every": 2, "proxy-size": 700}) == 700
    with pytest.raises(ValueError, match="proxy-size"):
        RunConfig.from_mapping({"distill-every": 2, "proxy-size": 0}).proxy_holdout()
    with pytest.raises(ValueError, match="distill-every"):
        RunConfig.from_mapping({"distill-every": -1}).proxy_holdout()


def test_fedavgm_gets_the_server_learning_rate_and_momentum() -> None:
    from fedsqueeze.server.app import make_strategy

    strategy = make_strategy(RunConfig.from_mapping({"strategy": "fedavgm", "server-lr": 0.5, "server-momentum": 0.9}))
    assert (strategy.server_learning_rate, strategy.server_momentum) == (0.5, 0.9)
    plain = make_strategy(RunConfig.from_mapping({"strategy": "fedavgm"}))
    assert (plain.server_learning_rate, plain.server_momentum) == (1.0, 0.0)
