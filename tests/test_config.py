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
    ({"train": {"method": "lora"}}, [], "train.method: 'lora' is not one of"),
    ({"train": {"method": "ard+cpt", "steps": 4, "cpt_steps": 4}}, [], "train.cpt_steps must be in [1, train.steps)"),
    ({"train": {"method": "ard+cpt", "batch_size": 6}}, [], "must be a multiple of 4 for ard+cpt"),
    ({"eval": {"passkey_trials": -1}}, [], "eval.passkey_trials must be >= 0"),
    ({"eval": {"length_multipliers": [2, 1]}}, [], "eval.length_multipliers must be increasing"),
    ({"eval": {"passkey_depths": [1.5]}}, [], "eval.passkey_depths must be values in [0, 1]"),
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


def test_methods_are_presets_at_equal_tokens(tiny_model):
    base = ["--model.teacher", str(tiny_model()), "--data.ctx_len", "32", "--train.batch_size", "8"]
    ard = RunConfig.from_yaml(None, base)
    assert (ard.train.method, ard.loss.q, ard.loss.lm) == ("ard", 1.0, 0.0)
    # CPT reads 4n-token blocks (past the teacher's window of 64: allowed, no term reads the teacher there),
    # 4x fewer per step: the same tokens per step as ARD.
    cpt = RunConfig.from_yaml(None, base + ["--train.method", "cpt"])
    assert (cpt.loss.q, cpt.loss.k, cpt.loss.v, cpt.loss.lm) == (0, 0, 0, 1.0) and not cpt.uses_teacher
    assert (cpt.data.ctx_len, cpt.train.batch_size) == (128, 2)  # n = 32 as the user set it: 4n blocks
    assert cpt.data.ctx_len * cpt.train.batch_size == ard.data.ctx_len * ard.train.batch_size == 256
    kd = RunConfig.from_yaml(None, base + ["--train.method", "logits_kd", "--loss.v", "2"])  # the user's key wins
    assert (kd.loss.logits_kd, kd.loss.q, kd.loss.v) == (1.0, 0.0, 2.0)
    hidden = RunConfig.from_yaml(None, base + ["--train.method", "hidden_cosine"])
    assert hidden.loss.hidden_cosine == 1.0 and hidden.loss.q == 0.0
    with pytest.raises(ConfigError, match="longer than the teacher's native window"):  # ARD must stay at <= n
        RunConfig.from_yaml(None, base[:-4] + ["--data.ctx_len", "128"])

    both = RunConfig.from_yaml(None, base + ["--train.method", "ard+cpt", "--train.steps", "10"])
    first, second = both.stages()
    assert (first.train.method, first.train.steps, first.data.ctx_len, first.loss.q) == ("ard", 8, 32, 1.0)
    assert (second.train.method, second.train.steps, second.data.ctx_len, second.loss.lm) == ("cpt", 2, 128, 1.0)
    assert second.train.batch_size == 2 and second.loss.q == 0.0
    assert ard.stages() == [ard]
