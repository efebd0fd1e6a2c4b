"""The plan: a config resolved once against the teacher's config.json, every problem one ConfigError line."""

from __future__ import annotations

import gzip
import json
import pickle
import random
import shutil

import pytest

from linearard.config import ConfigError, RunConfig
from linearard.plan import resolve, resolve_layers


def plan_of_tiny_model(tiny_model, overrides):
    """A plan for the tiny llama (native 64) with RoPE ×4 and 32-token blocks, plus ``overrides``."""
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
    (["--model.rope", "llama3:8,low_freq_factor=4"], "llama3 needs low_freq_factor < high_freq_factor"),
])
def test_bad_plans_one_line(tiny_model, overrides, words):
    with pytest.raises(ConfigError) as err:
        plan_of_tiny_model(tiny_model, overrides)
    message = str(err.value)
    assert words in message and "\n" not in message, message


def _broken_model(tiny_model, folder, case):
    """A copy of the tiny model broken as ``case`` says; returns its folder."""
    shutil.copytree(tiny_model(), folder)
    weights = folder / "model.safetensors"
    if case == "no weights":
        weights.unlink()
    elif case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "not safetensors":
        weights.write_text("<html>Rate limited</html>")
    elif case == "a missing shard":
        weights.rename(folder / "model-00001-of-00002.safetensors")
        index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                                "model.norm.weight": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif case == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    return folder


@pytest.mark.parametrize("case, words", [
    ("no weights", "no weights in"),
    ("truncated weights", "incomplete metadata, file not fully covered"),
    ("not safetensors", "cannot read the weights"),
    ("a missing shard", "model-00002-of-00002.safetensors"),
    ("no tokenizer", "model.teacher: no tokenizer loads from"),
])
def test_a_model_folder_that_cannot_load_is_refused(tiny_model, tmp_path, case, words):
    """Found on the driver from the files (headers, not weights), not in a worker after Ray started."""
    folder = _broken_model(tiny_model, tmp_path / "model", case)
    with pytest.raises(ConfigError) as err:
        plan_of_tiny_model(tiny_model, ["--model.teacher", str(folder)])
    message = str(err.value)
    assert words in message and "\n" not in message, message
    assert message.startswith("model.teacher: "), message


def test_a_broken_student_or_tokenizer_is_named(tiny_model, tiny_extended, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(tiny_extended, student)
    (student / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="^model.student: no weights in"):
        _student_plan(tiny_model(), student)
    tokenizer = _broken_model(tiny_model, tmp_path / "tokenizer", "no tokenizer")
    with pytest.raises(ConfigError, match="^model.tokenizer: no tokenizer loads from"):
        plan_of_tiny_model(tiny_model, ["--model.tokenizer", str(tokenizer)])


def _lines(*rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


def _corpus(folder, case):
    """A corpus broken as ``case`` says; returns its path."""
    words = " ".join(f"w{i % 60 + 2}" for i in range(300))
    if case == "binary":
        rng = random.Random(0)
        (folder / "binary").mkdir()
        for i in range(3):
            (folder / "binary" / f"{i}.txt").write_bytes(bytes(rng.randrange(256) for _ in range(2000)))
        return folder / "binary"
    path = folder / {"truncated gzip": "corpus.jsonl.gz"}.get(case, "corpus.jsonl")
    if case == "truncated gzip":
        whole = gzip.compress(_lines(*[{"text": words}] * 4).encode())
        path.write_bytes(whole[: len(whole) // 2])
    else:
        path.write_text({"empty": "",
                         "no text field": _lines(*[{"body": words}] * 20),
                         "empty texts": _lines(*[{"text": " "}] * 20),
                         "null text": _lines({"text": words}, {"text": None}),
                         "not json": "text,label\nhello,1\n",
                         "all held out": _lines(*[{"text": words}] * 20)}[case])
    return path


@pytest.mark.parametrize("case, words", [
    ("empty", "holds no documents"),
    ("no text field", "have no 'text' field (data.text_field); fields: ['body']"),
    ("empty texts", "have no text (data.text_field 'text' is empty)"),
    ("null text", "has no text ('text' is null)"),
    ("binary", "holds binary data, not text"),
    ("truncated gzip", "EOFError: Compressed file ended before the end-of-stream marker was reached"),
    ("not json", "cannot read"),
    ("all held out", "data.eval_fraction 0.9999 holds out all of the first 16 documents"),
])
def test_a_corpus_that_cannot_train_is_refused_from_its_first_documents(tiny_model, tmp_path, case, words):
    source = _corpus(tmp_path, case)
    with pytest.raises(ConfigError) as err:
        plan_of_tiny_model(tiny_model, ["--data.source", str(source), "--data.eval_fraction", "0.9999"])
    message = str(err.value)
    assert words in message and "\n" not in message, message
    assert message.startswith(("data.source: ", "data.eval_fraction ")), message


def test_longrope_factor_lists_must_have_one_factor_per_frequency(tiny_model, tmp_path):
    spec = tmp_path / "longrope.json"
    spec.write_text(json.dumps({"short_factor": [1.0] * 3, "long_factor": [4.0] * 3, "factor": 4.0}))
    with pytest.raises(ConfigError, match=r"model.rope: the LongRoPE short_factor must be a list of 4 finite"):
        plan_of_tiny_model(tiny_model, ["--model.rope", f"longrope:{spec}"])
    spec.write_text(json.dumps({"short_factor": [1.0] * 4, "long_factor": [4.0, 4.0, float("nan"), 4.0]}))
    with pytest.raises(ConfigError, match=r"the LongRoPE long_factor must be a list of 4 finite numbers > 0"):
        plan_of_tiny_model(tiny_model, ["--model.rope", f"longrope:{spec}"])
    spec.write_text(json.dumps({"short_factor": [1.0] * 4, "long_factor": [4.0] * 4, "factor": 4.0}))
    assert plan_of_tiny_model(tiny_model, ["--model.rope", f"longrope:{spec}"]).models.student_window == 256


def test_methods_are_presets_at_equal_tokens(tiny_model):
    (default,) = plan_of_tiny_model(tiny_model, []).stages  # the default: logits KD, at 3e-3 for a RoPE-only extension
    assert default.method == "logits_kd" and default.config.optim.lr == 3e-3 and default.config.loss.q == 0.0
    base = ["--train.batch_size", "8"]
    ard = plan_of_tiny_model(tiny_model, base + ["--train.method", "ard"]).stages
    assert ard[0].config.optim.lr == 3e-3 and (ard[0].config.loss.qk, ard[0].config.loss.logits_kd) == (0.0, 0.0)
    (mine,) = plan_of_tiny_model(tiny_model, base + ["--train.method", "ard", "--optim.lr", "1e-3"]).stages
    assert mine.config.optim.lr == 1e-3  # the user's lr wins over the method's
    assert [s.method for s in ard] == ["ard"] and (ard[0].config.loss.q, ard[0].config.loss.lm) == (1.0, 0.0)
    # CPT reads 4n-token blocks (past the teacher's window of 64: allowed, no term reads the teacher there),
    # 4x fewer per step: the same tokens per step as ARD.
    (cpt,) = plan_of_tiny_model(tiny_model, base + ["--train.method", "cpt"]).stages
    c = cpt.config
    assert (c.loss.q, c.loss.k, c.loss.v, c.loss.lm) == (0, 0, 0, 1.0) and not c.loss.reads_teacher
    assert (c.data.ctx_len, c.train.batch_size) == (128, 2)  # n = 32 as the user set it: 4n blocks
    assert c.data.ctx_len * c.train.batch_size == ard[0].config.data.ctx_len * ard[0].config.train.batch_size
    (kd,) = plan_of_tiny_model(tiny_model, base + ["--train.method", "logits_kd", "--loss.v", "3"]).stages  # the user's key wins
    assert (kd.config.loss.logits_kd, kd.config.loss.q, kd.config.loss.v) == (1.0, 0.0, 3.0)
    (hidden,) = plan_of_tiny_model(tiny_model, base + ["--train.method", "hidden_cosine"]).stages
    assert hidden.config.loss.hidden_cosine == 1.0 and hidden.config.loss.q == 0.0
    with pytest.raises(ConfigError, match="longer than the teacher's native window"):  # ARD must stay at <= n
        plan_of_tiny_model(tiny_model, ["--data.ctx_len", "128"])
    with pytest.raises(ConfigError, match="every term has weight 0"):
        plan_of_tiny_model(tiny_model, ["--loss.logits_kd", "0"])

    both = plan_of_tiny_model(tiny_model, base + ["--train.method", "ard+cpt", "--train.steps", "10"])
    first, second = both.stages
    assert (first.method, first.config.train.steps, first.config.data.ctx_len, first.config.loss.q) == ("ard", 8, 32, 1.0)
    assert (second.method, second.config.train.steps, second.config.data.ctx_len, second.config.loss.lm) == (
        "cpt", 2, 128, 1.0)
    assert second.config.train.batch_size == 2 and second.config.loss.q == 0.0
    assert (first.first_step, second.first_step, both.steps) == (0, 8, 10)
    assert first.run_name.endswith("-ard") and second.run_name.endswith("-cpt")


def test_resolves_once_and_travels_as_it_is(tiny_model, tmp_path):
    plan = plan_of_tiny_model(tiny_model, ["--model.rope", "yarn:4", "--loss.layers", "[-1]", "--train.output_dir",
                              str(tmp_path / "out"), "--tracking.uri", "sqlite:///rel/mlflow.db"])
    assert plan.models.native_window == 64 and plan.models.num_layers == 2 and plan.models.student_window == 256
    assert plan.models.student_rope["rope_type"] == "yarn" and plan.models.student_rope["original_max_position_embeddings"] == 64
    assert plan.stages[0].config.loss.layers == [1] and plan.stages[0].config.loss.hidden_layers == [0, 1]
    assert plan.eval.ctx_len == 64 and plan.eval.lengths == [64, 128, 256]
    assert plan.output.model_dir == tmp_path / "out" / "model"
    assert plan.config.tracking.uri.startswith("sqlite:////") and plan.output.storage_path == str(tmp_path / "out" / "ray")
    assert pickle.loads(pickle.dumps(plan)) == plan


def test_local_paths_travel_absolute(tiny_model, tmp_path, monkeypatch):
    """Ray Train runs its workers in another folder: a model, tokenizer or corpus given relative to the driver's
    folder reaches them absolute; a hub id stays as it is."""
    from linearard.plan import _absolute_paths

    shutil.copytree(tiny_model(), tmp_path / "base")
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"text": "def f(x):\n    return x\n" * 40})
                                                     for _ in range(20)))
    monkeypatch.chdir(tmp_path)
    plan = plan_of_tiny_model(lambda: "base", ["--model.tokenizer", "./base", "--data.source", "corpus.jsonl",
                                               "--data.eval_fraction", "0"])
    assert (plan.models.teacher, plan.models.student, plan.models.tokenizer) == (str(tmp_path / "base"),) * 3
    assert plan.config.data.source == str(tmp_path / "corpus.jsonl")
    hub = RunConfig.from_yaml(None, ["--model.teacher", "meta-llama/Llama-2-7b-hf", "--data.source", "emozilla/pg19"])
    assert (_absolute_paths(hub).model.teacher, _absolute_paths(hub).data.source) == ("meta-llama/Llama-2-7b-hf",
                                                                                      "emozilla/pg19")


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
