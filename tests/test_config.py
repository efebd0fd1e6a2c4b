"""RunConfig: YAML + overrides, round trip, and one clear one-line ConfigError for each bad input."""

from __future__ import annotations

import pytest
import yaml

from linearard.config import ConfigError, RunConfig


def _write(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_overrides_round_trip(tiny_model, tmp_path):
    path = _write(tmp_path, {"model": {"teacher": str(tiny_model()), "rope": "yarn:4"},
                             "data": {"ctx_len": 32}, "loss": {"layers": [0]}})
    cfg = RunConfig.from_yaml(path, ["--train.steps", "7", "optim.lr=3e-4", "--loss.layers", "[-1, 0]",
                                     "--lora.alpha=16", "ray.resources_per_worker={CPU: 2}"])
    assert cfg.model.rope == "yarn:4" and cfg.train.steps == 7 and cfg.optim.lr == 3e-4
    assert cfg.loss.layers == [-1, 0] and cfg.lora.alpha == 16.0 and cfg.ray.resources_per_worker == {"CPU": 2.0}
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg
    cfg.to_yaml(tmp_path / "copy.yaml")
    assert RunConfig.from_yaml(tmp_path / "copy.yaml") == cfg


@pytest.mark.parametrize("data, overrides, words", [
    ({"model": {"temperature": 1}}, [], "unknown key 'model.temperature'"),
    ({"modle": {}}, [], "unknown key 'modle'"),
    ({}, ["--train.stepz", "3"], "unknown key 'train.stepz'"),
    ({"model": {"rope": "pi:4"}}, [], "model.rope: bad rope spec"),
    ({"model": {"rope": "linear:1"}}, [], "factor must be > 1"),
    ({"model": {"rope": "yarn:0.5"}}, [], "factor must be > 1"),
    ({"data": {"ctx_len": 65}}, [], "longer than the teacher's native window 64"),
    ({"loss": {"layers": [0, 2]}}, [], "layer index 2 is out of range"),
    ({"loss": {"hidden_cosine": 1, "hidden_layers": [-3]}}, [], "layer index -3 is out of range"),
    ({"model": {"teacher": "/no/such/model"}}, [], "no such model path '/no/such/model'"),
    ({"model": {"teacher": ""}}, [], "model.teacher is empty"),
    ({"train": {"steps": "many"}}, [], "train.steps must be int"),
    ({"data": {"mode": "stream"}}, [], "data.mode: 'stream' is not one of"),
    ({"loss": {"q": 0, "k": 0, "v": 0}}, [], "every term has weight 0"),
    ({}, ["train.steps"], "bad override"),
])
def test_bad_configs_one_line(tiny_model, tmp_path, data, overrides, words):
    data.setdefault("model", {}).setdefault("teacher", str(tiny_model()))
    data.setdefault("data", {}).setdefault("ctx_len", 32)
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml(_write(tmp_path, data), overrides)
    message = str(err.value)
    assert words in message and "\n" not in message, message
    assert isinstance(err.value, ValueError)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
