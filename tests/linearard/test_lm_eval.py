"""lm-evaluation-harness on the bundled tiny model: the bundled tasks run offline through ``lm_eval_scores``, their
scores equal the ones computed here from the model's own log-likelihoods, and they see the RoPE-scaling damage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from linearard.evaluate import LM_EVAL_TASKS, lm_eval_scores

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the `eval` extra)")

N = 256  # the bundled model's native context
PASSKEY, CODE = "linearard_passkey_mc", "linearard_stdlib_code"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (LM_EVAL_TASKS / f"{name}.jsonl").read_text().splitlines()]


@torch.no_grad()
def continuation_logprobs(model, context: list[int], continuations: list[list[int]]) -> list[float]:
    """log p(continuation | context) of each continuation (all of one length), summed over its tokens, in
    float64, from one batched forward pass."""
    ids = torch.tensor([context + c for c in continuations])
    logp = model(input_ids=ids[:, :-1]).logits.double().log_softmax(-1)[:, len(context) - 1:]
    return logp.gather(-1, ids[:, len(context):, None]).sum((1, 2)).tolist()


def passkey_accuracy_by_hand(model) -> float:
    """Share of examples whose right key has the highest log-likelihood as the continuation " <key>"."""
    hits = []
    for row in rows("passkey_mc"):
        context = list(row["context"].encode())  # the bundled tokenizer is byte level: a byte is a token
        lls = continuation_logprobs(model, context, [list(f" {c}".encode()) for c in row["choices"]])
        hits.append(max(range(len(lls)), key=lls.__getitem__) == row["label"])
    return sum(hits) / len(hits)


def code_bits_per_byte_by_hand(model, bos: int) -> float:
    """Bits per byte over all snippets: each one is read whole after lm-eval's prefix token (the BOS)."""
    texts = [list(row["text"].encode()) for row in rows("stdlib_code")]
    ll = sum(continuation_logprobs(model, [bos], [text])[0] for text in texts)
    return -ll / sum(map(len, texts)) / math.log(2)


@pytest.fixture(scope="module")
def scores(teacher, scaled, tokenizer):
    return {name: lm_eval_scores(model, tokenizer, ["linearard"], max_length=N)
            for name, model in (("teacher", teacher), ("scaled", scaled))}


def test_bundled_tasks_give_plain_json_scores(scores):
    for name in scores:
        assert json.loads(json.dumps(scores[name], allow_nan=False)) == scores[name]
        assert set(scores[name]) == {PASSKEY, CODE}
        assert {"acc", "acc_stderr"} <= set(scores[name][PASSKEY])
        assert {"bits_per_byte", "byte_perplexity"} <= set(scores[name][CODE])
        assert scores[name][PASSKEY]["sample_len"] == len(rows("passkey_mc")) == 40
        assert scores[name][CODE]["sample_len"] == len(rows("stdlib_code")) == 32


def test_scores_equal_the_models_own_loglikelihoods(scores, teacher, scaled, tokenizer):
    for name, model in (("teacher", teacher), ("scaled", scaled)):
        assert scores[name][PASSKEY]["acc"] == pytest.approx(passkey_accuracy_by_hand(model), abs=1e-12)
        bpb = code_bits_per_byte_by_hand(model, tokenizer.bos_token_id)
        assert scores[name][CODE]["bits_per_byte"] == pytest.approx(bpb, rel=1e-4)
        assert scores[name][CODE]["byte_perplexity"] == pytest.approx(2 ** bpb, rel=1e-4)


def test_scaling_rope_x4_shows_on_the_bundled_tasks(scores):
    teacher, scaled = scores["teacher"], scores["scaled"]
    assert teacher[PASSKEY]["acc"] >= 0.95, "the bundled model retrieves pass keys at n"
    assert 0.0 <= scaled[PASSKEY]["acc"] <= teacher[PASSKEY]["acc"] - 0.2
    assert 1.0 < teacher[CODE]["bits_per_byte"] < 2.0, "held-out stdlib code is predictable to the teacher"
    assert scaled[CODE]["bits_per_byte"] > 2 * teacher[CODE]["bits_per_byte"]


def test_max_length_is_the_window_lm_eval_reads(scores, teacher, tokenizer):
    # Snippets of 100-240 bytes in windows of 64 tokens: later windows see at most 63 tokens of context.
    short = lm_eval_scores(teacher, tokenizer, [CODE], max_length=64)[CODE]
    assert short["bits_per_byte"] > scores["teacher"][CODE]["bits_per_byte"] + 0.05


def test_include_path_adds_a_task_folder(teacher, tokenizer, tmp_path):
    # A user's task elsewhere, by name: it includes the bundled one (whose data loader resolves beside it).
    (tmp_path / "mine.yaml").write_text(f"include: {LM_EVAL_TASKS / (PASSKEY + '.yaml')}\ntask: my_passkey\n")
    mine = lm_eval_scores(teacher, tokenizer, ["my_passkey"], limit=8, max_length=N, include_path=tmp_path)
    assert set(mine) == {"my_passkey"}
    assert mine["my_passkey"]["sample_len"] == 8
    assert mine["my_passkey"]["acc"] == 1.0


def test_unknown_task_names_are_refused_before_the_run(tiny_model, word_corpus):
    """``check_evaluation`` looks the names up in the task index the evaluation reads (built once per session)."""
    from linearard.config import ConfigError, RunConfig
    from linearard.evaluate import check_evaluation
    from linearard.plan import resolve

    def plan(*overrides):
        return resolve(RunConfig.from_yaml(None, [
            "--model.teacher", str(tiny_model()), "--model.student", "null", "--model.rope", "linear:4",
            "--data.ctx_len", "32", "--data.source", str(word_corpus), "--data.eval_fraction", "0.5",
            "--eval.length_multipliers", "[1, 2]", *overrides]))

    check_evaluation(plan("--eval.lm_eval_tasks", f"[{PASSKEY}, linearard]"))  # a task and a tag
    with pytest.raises(ConfigError, match="^eval.lm_eval_long_tasks: no lm-eval task, group or tag is named 'rulr'"):
        check_evaluation(plan("--eval.lm_eval_tasks", f"[{CODE}]", "--eval.lm_eval_long_tasks", "[rulr]"))
