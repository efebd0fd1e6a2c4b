"""The plan: a config resolved once against the teacher's config.json, every problem one ConfigError line."""

from __future__ import annotations

import pickle

import pytest

from linearard.config import ConfigError, RunConfig
from linearard.plan import resolve, resolve_layers


def _plan(tiny_model, overrides):
    return resolve(RunConfig.from_yaml(None, ["--model.teacher", str(tiny_model()), "--data.ctx_len", "32",
                                              *overrides]))


@pytest.mark.parametrize("overrides, words", [
    (["--model.rope", "pi:4"], "model.rope: bad rope spec"),
    (["--model.rope", "linear:1"], "factor must be a finite number > 1"),
    (["--model.rope", "yarn:0.5"], "factor must be a finite number > 1"),
    (["--model.rope", "linear:inf"], "factor must be a finite number > 1"),
    (["--model.rope", "yarn:4,beta_fast=fast"], "beta_fast must be a finite number"),
    (["--model.rope", "llama3:8,low_freq_factor=x"], "low_freq_factor must be a finite number"),
    (["--data.ctx_len", "65"], "longer than the teacher's native window 64"),
    (["--loss.layers", "[0, 2]"], "loss.layers: layer index 2 is out of range"),
    (["--loss.hidden_cosine", "1", "--loss.hidden_layers", "[-3]"], "loss.hidden_layers: layer index -3 is out of range"),
    (["--model.teacher", "/no/such/model"], "no such model path '/no/such/model'"),
    (["--loss.q", "0", "--loss.k", "0", "--loss.v", "0"], "every term has weight 0"),
    (["--data.source", "/no/such/corpus.jsonl"], "data.source: no such file or folder"),
])
def test_bad_plans_one_line(tiny_model, overrides, words):
    with pytest.raises(ConfigError) as err:
        _plan(tiny_model, overrides)
    message = str(err.value)
    assert words in message and "\n" not in message, message


def test_methods_are_presets_at_equal_tokens(tiny_model):
    base = ["--train.batch_size", "8"]
    ard = _plan(tiny_model, base).stages
    assert [s.method for s in ard] == ["ard"] and (ard[0].config.loss.q, ard[0].config.loss.lm) == (1.0, 0.0)
    # CPT reads 4n-token blocks (past the teacher's window of 64: allowed, no term reads the teacher there),
    # 4x fewer per step: the same tokens per step as ARD.
    (cpt,) = _plan(tiny_model, base + ["--train.method", "cpt"]).stages
    c = cpt.config
    assert (c.loss.q, c.loss.k, c.loss.v, c.loss.lm) == (0, 0, 0, 1.0) and not c.loss.reads_teacher
    assert (c.data.ctx_len, c.train.batch_size) == (128, 2)  # n = 32 as the user set it: 4n blocks
    assert c.data.ctx_len * c.train.batch_size == ard[0].config.data.ctx_len * ard[0].config.train.batch_size
    (kd,) = _plan(tiny_model, base + ["--train.method", "logits_kd", "--loss.v", "3"]).stages  # the user's key wins
    assert (kd.config.loss.logits_kd, kd.config.loss.q, kd.config.loss.v) == (1.0, 0.0, 3.0)
    (hidden,) = _plan(tiny_model, base + ["--train.method", "hidden_cosine"]).stages
    assert hidden.config.loss.hidden_cosine == 1.0 and hidden.config.loss.q == 0.0
    with pytest.raises(ConfigError, match="longer than the teacher's native window"):  # ARD must stay at <= n
        _plan(tiny_model, ["--data.ctx_len", "128"])

    both = _plan(tiny_model, base + ["--train.method", "ard+cpt", "--train.steps", "10"])
    first, second = both.stages
    assert (first.method, first.config.train.steps, first.config.data.ctx_len, first.config.loss.q) == ("ard", 8, 32, 1.0)
    assert (second.method, second.config.train.steps, second.config.data.ctx_len, second.config.loss.lm) == (
        "cpt", 2, 128, 1.0)
    assert second.config.train.batch_size == 2 and second.config.loss.q == 0.0
    assert (first.first_step, second.first_step, both.steps) == (0, 8, 10)
    assert first.run_name.endswith("-ard") and second.run_name.endswith("-cpt")


def test_resolves_once_and_travels_as_it_is(tiny_model, tmp_path):
    plan = _plan(tiny_model, ["--model.rope", "yarn:4", "--loss.layers", "[-1]", "--train.output_dir",
                              str(tmp_path / "out"), "--tracking.uri", "sqlite:///rel/mlflow.db"])
    assert plan.models.native_window == 64 and plan.models.num_layers == 2 and plan.models.student_window == 256
    assert plan.models.student_rope["rope_type"] == "yarn" and plan.models.student_rope["original_max_position_embeddings"] == 64
    assert plan.stages[0].config.loss.layers == [1] and plan.stages[0].config.loss.hidden_layers == [0, 1]
    assert plan.eval.ctx_len == 64 and plan.eval.lengths == [64, 128, 256]
    assert plan.output.model_dir == tmp_path / "out" / "model"
    assert plan.config.tracking.uri.startswith("sqlite:////") and plan.output.storage_path == str(tmp_path / "out" / "ray")
    assert pickle.loads(pickle.dumps(plan)) == plan


def test_resolve_layers():
    assert resolve_layers(None, 4, "k") == [0, 1, 2, 3]
    assert resolve_layers([-1, 0, 3], 4, "k") == [0, 3]
    with pytest.raises(ConfigError, match="k: layer index 4 is out of range"):
        resolve_layers([4], 4, "k")
