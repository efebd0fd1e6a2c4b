"""RunConfig: YAML + overrides, round trip, and one clear one-line ConfigError for each bad input."""

from __future__ import annotations

import pytest
import yaml

from linearard.config import ConfigError, RunConfig, redact


def _write(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_overrides_round_trip(tmp_path):
    path = _write(tmp_path, {"model": {"teacher": "org/model", "rope": "yarn:4"},
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
    ({"model": {"teacher": ""}}, [], "model.teacher is empty"),
    ({"train": {"steps": "many"}}, [], "train.steps must be int"),
    ({"data": {"mode": "stream"}}, [], "data.mode: 'stream' is not one of"),
    ({}, ["train.steps"], "bad override"),
    ({"train": {"method": "lora"}}, [], "train.method: 'lora' is not one of"),
    ({"train": {"method": "ard+cpt", "steps": 4, "cpt_steps": 4}}, [], "train.cpt_steps must be in [1, train.steps)"),
    ({"train": {"method": "ard+cpt", "batch_size": 6}}, [], "must be a multiple of 4 for ard+cpt"),
    ({"eval": {"passkey_trials": -1}}, [], "eval.passkey_trials must be a finite number >= 0"),
    ({"eval": {"length_multipliers": [2, 1]}}, [], "eval.length_multipliers must be increasing"),
    ({"eval": {"passkey_depths": [1.5]}}, [], "eval.passkey_depths must be values in [0, 1]"),
    ({"loss": {"q": -1}}, [], "loss.q must be a finite number >= 0"),
    ({}, ["--optim.lr", "1e6"], None),  # large is allowed: the run's non-finite guard stops it if it diverges
    ({}, ["--optim.lr", "inf"], "optim.lr must be a finite number in (0.0, ∞)"),
    ({}, ["--optim.lr", ".nan"], "optim.lr must be a finite number"),
    ({}, ["--optim.lr", "0"], "optim.lr must be a finite number in (0.0, ∞)"),
    ({}, ["--optim.eps", "-1e-8"], "optim.eps must be a finite number in (0.0, ∞)"),
    ({}, ["--optim.betas", "[0.9, 1.0]"], "optim.betas must be 2 numbers in [0, 1)"),
    ({}, ["--optim.betas", "[0.9]"], "optim.betas must be 2 numbers in [0, 1)"),
    ({}, ["--optim.min_lr_ratio", "1.5"], "optim.min_lr_ratio must be a finite number in [0.0, 1.0]"),
    ({}, ["--lora.dropout", "1.2"], "lora.dropout must be a finite number in [0.0, 1.0)"),
    ({}, ["--lora.alpha", "-8"], "lora.alpha must be a finite number in (0.0, ∞)"),
    ({}, ["--lora.target_modules", "[]"], "lora.target_modules must name at least one module"),
    ({}, ["--data.ctx_len", "1"], "data.ctx_len must be a finite number >= 2"),
    ({}, ["--data.max_documents", "0"], "data.max_documents must be a finite number >= 1"),
    ({}, ["--data.eval_fraction", "1"], "data.eval_fraction must be a finite number in [0.0, 1.0)"),
    ({}, ["--train.checkpoint_every", "-1"], "train.checkpoint_every must be a finite number >= 0"),
    ({}, ["--ray.max_failures", "-5"], "ray.max_failures must be a finite number >= 0"),
    ({}, ["--ray.num_workers", "0"], "ray.num_workers must be a finite number >= 1"),
    ({}, ["--ray.resources_per_worker", "{CPU: -1}"], "ray.resources_per_worker: CPU must be a finite number >= 0"),
    ({}, ["--ray.resources_per_worker", "{GPU: .nan}"], "ray.resources_per_worker: GPU must be a finite number >= 0"),
    ({}, ["--loss.hidden_cosine", "inf"], "loss.hidden_cosine must be a finite number >= 0"),
    ({}, ["--optim.weight_decay", ".nan"], "optim.weight_decay must be a finite number in [0.0, ∞]"),
    ({}, ["--eval.passkey_depths", "[.nan]"], "eval.passkey_depths must be values in [0, 1]"),
    ({}, ["--loss.backend", "triton"], "loss.backend triton runs on CUDA only, and ray.use_gpu is false"),
    ({}, ["--loss.backend", "triton", "--ray.use_gpu", "true"], None),  # GPU workers: the machine is checked later
])
def test_bad_configs_one_line(tmp_path, data, overrides, words):
    if words is None:
        RunConfig.from_yaml(_write(tmp_path, data), overrides)
        return
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


def test_bad_yaml_encoding(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  teacher: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        RunConfig.from_yaml(path)


@pytest.mark.parametrize("text, shown", [
    ("http://user:pw@mlflow:5000", "http://***@mlflow:5000"),
    ("https://user:p@ss@mlflow/prefix", "https://***@mlflow/prefix"),  # an unescaped @ in the password
    ("failed: http://u:pw@h:1/api/2.0/runs (mail x@y.org)", "failed: http://***@h:1/api/2.0/runs (mail x@y.org)"),
    ("sqlite:///outputs/mlflow.db", "sqlite:///outputs/mlflow.db"),
    ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
])
def test_redact_hides_the_credentials_of_uris(text, shown):
    assert redact(text) == shown


def test_what_is_saved_and_logged_has_no_uri_credentials(tmp_path):
    cfg = RunConfig.from_yaml(None, ["--tracking.uri", "http://user:SECRET-PW@mlflow:5000",
                                     "--ray.storage_path", "s3://KEY:SECRET-S3@bucket/runs"])
    assert cfg.tracking.uri == "http://user:SECRET-PW@mlflow:5000"  # the run itself connects with them
    assert cfg.to_dict()["tracking"]["uri"] == "http://***@mlflow:5000"
    cfg.to_yaml(tmp_path / "config.yaml")
    assert "SECRET" not in (tmp_path / "config.yaml").read_text() and "SECRET" not in cfg.yaml_text()


def test_records_the_keys_the_user_set(tmp_path):
    cfg = RunConfig.from_yaml(_write(tmp_path, {"loss": {"v": 3.0}}), ["--train.steps", "7"])
    assert cfg.user_set("loss.v") and cfg.user_set("train.steps") and cfg.user_set("loss")
    assert not cfg.user_set("loss.q") and not cfg.user_set("optim.lr")
