"""Evaluation on the bundled tiny model: perplexity against a hand computation, the scaled-RoPE damage, passkey
retrieval, the report files."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from PIL import Image

from linearard.config import ConfigError, EvalConfig
from linearard.evaluate import (check_evaluation, evaluate_models, lm_eval_scores, passkey_accuracy, passkey_example,
                                perplexity, text_blocks)
from linearard.report import judge, write_report
from linearard.tiny import bundled_corpus
from tests.linearard.test_plan import plan_of_tiny_model

N = 256  # the bundled model's native context


@pytest.fixture(scope="module")
def eval_texts():
    return bundled_corpus("eval")


def test_perplexity_is_exp_of_mean_token_nll(teacher, tokenizer, eval_texts):
    blocks = text_blocks(eval_texts, tokenizer, 64, max_blocks=5)
    assert blocks.shape == (5, 64)
    nll = []
    with torch.no_grad():
        for block in blocks:  # one block at a time, float64 log-softmax, gather: a different route from the op
            logp = teacher(input_ids=block[None]).logits[0].double().log_softmax(-1)
            nll += (-logp[:-1].gather(-1, block[1:, None])).flatten().tolist()
    assert len(nll) == 5 * 63
    assert perplexity(teacher, blocks, batch_size=2) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_scaling_rope_x4_hurts_the_bundled_model_at_native_length(teacher, scaled, tokenizer, eval_texts):
    blocks = text_blocks(eval_texts, tokenizer, N, max_blocks=8)
    ppl_teacher, ppl_scaled = perplexity(teacher, blocks), perplexity(scaled, blocks)
    assert ppl_teacher < 3.0, "the bundled model should predict held-out stdlib code well"
    assert ppl_scaled > 5 * ppl_teacher, (ppl_teacher, ppl_scaled)


def test_passkey_teacher_retrieves_at_native_length(teacher, tokenizer):
    grid = passkey_accuracy(teacher, tokenizer, lengths=[N], depths=[0.0, 0.5, 1.0], trials=3, seed=1)
    assert set(grid) == {N} and set(grid[N]) == {0.0, 0.5, 1.0}
    # chance is 1e-5 (five random digits); the bundled model was trained on this format at length <= n
    assert sum(grid[N].values()) / 3 >= 0.8, grid


def test_passkey_example_layout(tokenizer):
    lengths = set()
    positions = []
    for depth in (0.0, 0.5, 1.0):
        ids, answer_len = passkey_example(tokenizer, 200, depth, key=71432)
        lengths.add(len(ids))
        text = tokenizer.decode(ids)
        assert text.endswith("What is the pass key? The pass key is 71432")
        assert tokenizer.decode(ids[-answer_len:]) == " 71432"
        positions.append(text.index("The pass key is 71432. Remember it."))
    assert lengths == {200}
    assert positions[0] == 0 and positions[0] < positions[1] < positions[2]
    with pytest.raises(ValueError, match="at least"):
        passkey_example(tokenizer, 40, 0.5, key=71432)
    with pytest.raises(ValueError, match="depth"):
        passkey_example(tokenizer, 200, 1.5, key=71432)


def test_text_blocks_needs_a_long_enough_document(tokenizer):
    with pytest.raises(ValueError, match="no document has 64 tokens"):
        text_blocks(["short", "texts"], tokenizer, 64, max_blocks=4)


def test_judge_gives_the_ratios_a_user_checks():
    report = {"lengths": [128, 512], "models": {
        "teacher": {"ppl": {"128": 2.0, "512": 9.0}, "passkey": {"128": 1.0, "512": 0.0}},
        "extended": {"ppl": {"128": 3.0, "512": 4.0}, "passkey": {"128": 0.2, "512": 0.8}},
        "restored": {"ppl": {"128": 2.1, "512": 4.4}, "passkey": {"128": 0.9, "512": 0.6}}}}
    assert judge(report) == pytest.approx({"ppl_n_over_teacher": 1.05, "passkey_n": 0.9,
                                           "ppl_long_over_extended": 1.1, "passkey_long_over_extended": 0.75})
    del report["models"]["extended"]["passkey"]
    assert judge(report)["passkey_long_over_extended"] is None  # a missing number is None, not a guess


def test_evaluate_models_writes_report_and_plots(teacher, scaled, tokenizer, eval_texts, tmp_path):
    cfg = EvalConfig(ctx_len=128, length_multipliers=[1, 2], ppl_tokens=512, batch_size=4,
                     passkey_depths=[0.0, 1.0], passkey_trials=2)
    calls = []

    def restored():  # a model may be built just before it is measured
        calls.append("restored")
        return teacher

    # the teacher stands in for a perfectly restored student: its ratio to the teacher is then exactly 1
    report = evaluate_models({"teacher": teacher, "extended": scaled, "restored": restored}, tokenizer,
                             eval_texts, cfg)
    assert calls == ["restored"] and report["lengths"] == [128, 256] and report["native_ctx"] == 128
    models = report["models"]
    assert list(models) == ["teacher", "extended", "restored"]
    assert set(models["teacher"]) == {"ppl", "passkey", "passkey_by_depth"}
    assert set(models["teacher"]["ppl"]) == set(models["teacher"]["passkey"]) == {"128", "256"}
    assert models["extended"]["ppl"]["128"] > models["teacher"]["ppl"]["128"]
    assert models["teacher"]["passkey"]["128"] == sum(models["teacher"]["passkey_by_depth"]["128"].values()) / 2
    assert models["teacher"] == models["restored"]  # same text and the same keys for every model
    assert judge(report)["ppl_n_over_teacher"] == 1.0

    paths = write_report(report, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["passkey_heatmap.png", "ppl_vs_length.png", "report.json", "report.md"]
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == json.loads(json.dumps(report))
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| extended |" in markdown and "PPL@n / teacher **1.000**" in markdown
    for name in ("ppl_vs_length.png", "passkey_heatmap.png"):
        with Image.open(tmp_path / "out" / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)  # no temp left


def test_passkey_trials_zero_skips_the_passkey_test(teacher, tokenizer, eval_texts, tmp_path):
    cfg = EvalConfig(ctx_len=128, length_multipliers=[1], ppl_tokens=256, batch_size=4, passkey_trials=0)
    report = evaluate_models({"teacher": teacher}, tokenizer, eval_texts, cfg)
    assert set(report["models"]["teacher"]) == {"ppl"} and report["models"]["teacher"]["ppl"]["128"] > 1
    report["run"] = {"method": "ard", "tokens": 204800}
    paths = write_report(report, tmp_path)
    assert sorted(p.name for p in paths) == ["ppl_vs_length.png", "report.json", "report.md"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| teacher | " in markdown and "method ard; training tokens 204,800." in markdown


def test_lm_eval_without_the_extra_says_how_to_install(teacher, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails, as without the extra (CI has it)
    with pytest.raises(ImportError, match=r"linearard\[eval\]"):
        lm_eval_scores(teacher, tokenizer, ["hellaswag"])


def _eval_plan(tiny_model, word_corpus, *overrides):
    """A plan for the tiny model (native 64) on the word corpus (40 documents of 40-200 words)."""
    return plan_of_tiny_model(tiny_model, ["--data.source", str(word_corpus), "--data.eval_fraction", "0.5",
                                           "--eval.length_multipliers", "[1, 2]", *overrides])


@pytest.mark.parametrize("overrides, words", [
    (["--data.eval_fraction", "0"], "data.eval_fraction is 0: no held-out documents"),
    (["--data.eval_fraction", "0.001"], "data.eval_fraction 0.001 holds out none of the documents of"),
    (["--eval.length_multipliers", "[1, 4]"], "eval.length_multipliers: no held-out document has 256 tokens"),
    (["--eval.ctx_len", "8"], "eval.ctx_len 8 is too short for the passkey test"),
    (["--eval.lm_eval_tasks", "[linearard_passkey_mc]"], "eval.lm_eval_tasks needs lm-evaluation-harness"),
])
def test_an_evaluation_that_cannot_run_is_refused_before_the_run(tiny_model, word_corpus, monkeypatch, overrides,
                                                                 words):
    """What the evaluation at the end of a run needs, checked on the driver: held-out documents as long as the
    longest evaluation length, room for a passkey prompt, lm-eval (its task names: tests/linearard/test_lm_eval)."""
    plan = _eval_plan(tiny_model, word_corpus, *overrides)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails, as without the extra
    with pytest.raises(ConfigError) as err:
        check_evaluation(plan)
    assert words in str(err.value) and "\n" not in str(err.value), err.value


def test_an_evaluation_that_can_run_passes(tiny_model, word_corpus):
    check_evaluation(_eval_plan(tiny_model, word_corpus))
    check_evaluation(_eval_plan(tiny_model, word_corpus, "--eval.passkey_trials", "0", "--eval.ctx_len", "8"))
