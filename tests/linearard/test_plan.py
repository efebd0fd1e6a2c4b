"""The plan: a config resolved once against the teacher's config.json, every problem one ConfigError line."""

from __future__ import annotations

import pickle

import pytest

from linearard.config import ConfigError, RunConfig
from linearard.plan import resolve, resolve_layers


def _plan(tiny_model, overrides):
    return resolve(RunConfig.from_yaml(None, ["--model.teacher", str(tiny_model()), "--model.student", "null",
                                              "--model.rope", "linear:4", "--data.ctx_len", "32", *overrides]))


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
    (["--train.method", "ard", "--loss.q", "0", "--loss.k", "0", "--loss.v", "0"], "every term has weight 0"),
    (["--data.source", "/no/such/corpus.jsonl"], "data.source: no such file or folder"),
])
def test_bad_plans_one_line(tiny_model, overrides, words):
    with pytest.raises(ConfigError) as err:
        _plan(tiny_model, overrides)
    message = str(err.value)
    assert words in message and "\n" not in message, message


def test_methods_are_presets_at_equal_tokens(tiny_model):
    (default,) = _plan(tiny_model, []).stages  # the default: logits KD, at 3e-3 for a RoPE-only extension
    assert default.method == "logits_kd" and default.config.optim.lr == 3e-3 and default.config.loss.q == 0.0
    base = ["--train.batch_size", "8"]
    ard = _plan(tiny_model, base + ["--train.method", "ard"]).stages
    assert ard[0].config.optim.lr == 3e-3 and (ard[0].config.loss.qk, ard[0].config.loss.logits_kd) == (0.0, 0.0)
    (mine,) = _plan(tiny_model, base + ["--train.method", "ard", "--optim.lr", "1e-3"]).stages
    assert mine.config.optim.lr == 1e-3  # the user's lr wins over the method's
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
    with pytest.raises(ConfigError, match="every term has weight 0"):
        _plan(tiny_model, ["--loss.logits_kd", "0"])

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


def _student_plan(teacher, student, *overrides):
    return resolve(RunConfig.from_yaml(None, ["--model.teacher", str(teacher), "--model.student", str(student),
                                              "--model.rope", "null", "--data.ctx_len", "32", *overrides]))


def test_a_student_checkpoint_brings_its_own_rope(tiny_model, tiny_extended):
    plan = _student_plan(tiny_model(), tiny_extended)
    assert plan.stages[0].config.optim.lr == 1e-4  # an extended checkpoint is restored gently
    assert plan.models.student == str(tiny_extended) and not plan.models.same_weights
    assert plan.models.student_rope == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert plan.models.student_window == 256 and plan.models.native_window == 64
    assert plan.models.rope.startswith("linear:4") and plan.eval.lengths == [64, 128, 256]
    # model.rope overrides the checkpoint's own RoPE, composed on the teacher's native window
    yarn = _student_plan(tiny_model(), tiny_extended, "--model.rope", "yarn:8").models
    assert yarn.student_rope["rope_type"] == "yarn" and yarn.student_window == 512 and yarn.rope == "yarn:8"


def _variant(tmp_path, source, **changes):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    for key, value in changes.items():
        setattr(config, key, value)
    config.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("changes, words", [
    ({"num_hidden_layers": 3}, "its num_hidden_layers is 3, the teacher's 2"),
    ({"num_key_value_heads": 4}, "its num_key_value_heads is 4, the teacher's 2"),
    ({"vocab_size": 65}, "its vocab_size is 65, the teacher's 64"),
    ({"hidden_size": 64}, "its hidden_size is 64, the teacher's 32"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "max_position_embeddings": 64},
     "has the teacher's own RoPE"),
])
def test_a_student_that_does_not_extend_the_teacher_is_refused(tiny_model, tiny_extended, tmp_path, changes, words):
    student = _variant(tmp_path, tiny_extended, **changes)
    with pytest.raises(ConfigError) as err:
        _student_plan(tiny_model(), student)
    assert words in str(err.value) and "\n" not in str(err.value), err.value


def test_a_student_of_another_family_is_refused(tiny_model):
    with pytest.raises(ConfigError, match="its model_type is 'qwen2', the teacher's 'llama'"):
        _student_plan(tiny_model("llama"), tiny_model("qwen2"))


def test_without_a_student_the_rope_is_needed(tiny_model):
    with pytest.raises(ConfigError, match="model.rope must be set when model.student is null"):
        resolve(RunConfig.from_yaml(None, ["--model.teacher", str(tiny_model()), "--model.student", "null",
                                           "--model.rope", "null"]))
