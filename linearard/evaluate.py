"""Evaluation of models side by side: perplexity by length, passkey retrieval, optional lm-evaluation-harness
tasks, on the same held-out text and the same pass keys for every model.

    report = evaluate_models({"teacher": t, "extended": e, "restored": r}, tokenizer, texts, plan.eval)
    linearard.report.write_report(report, "outputs/run/report")

Lengths are ``ctx_len × length_multipliers`` (n, 2n, 4n by default): n is the teacher's native length, where
scaling RoPE hurts and restoring should help; the longer ones are what the extended model exists for.
``evaluate_restore`` is the restore job's evaluation: teacher, extended (the student before training) and
restored (after) from a plan and a checkpoint, then the merged restored model.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from linearard.config import ConfigError, EvalConfig
from linearard.data import HELDOUT_DOCUMENTS, cut_per_document, iter_heldout, tokenize
from linearard.plan import Plan

# The passkey format (the classic one of Mohtashami & Jaggi, 2023, with a shorter needle so that a prompt
# of a 256-token native length still has room for filler). The bundled model is pretrained on examples of
# exactly this format, made by `passkey_example`, so the evaluation asks it nothing it has not seen at n.
PASSKEY_FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
                  "There and back again. ")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_ANSWER = " {key}"

def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def text_blocks(texts: Sequence[str], tokenizer: Any, ctx_len: int, max_blocks: int) -> torch.Tensor:
    """Cut documents into non-overlapping blocks of ``ctx_len`` tokens, each document on its own (its remainder
    dropped, so no block spans two documents), in order, keeping the first ``max_blocks``.

    Returns a LongTensor ``[N, ctx_len]`` with ``1 <= N <= max_blocks``; raises ``ValueError`` when no document
    is as long as ``ctx_len``.
    """
    return _first_blocks(tokenize(texts, tokenizer), ctx_len, max_blocks)


def _first_blocks(docs: Sequence[Sequence[int]], ctx_len: int, max_blocks: int) -> torch.Tensor:
    blocks = cut_per_document(docs, ctx_len)["input_ids"][:max_blocks]
    if len(blocks) == 0:
        raise ValueError(f"no document has {ctx_len} tokens; cannot measure perplexity at that length")
    return torch.from_numpy(blocks)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity of ``model`` on token blocks ``[N, T]``: exp of the mean next-token NLL over all N·(T−1)
    predicted tokens (each block is read on its own from position 0).

    The logits of a batch are materialised (``[batch_size, T, vocab]``): lower ``batch_size`` for long T.
    """
    model.eval()
    device = _device(model)
    total_nll, total_tokens = 0.0, 0
    # disable=None: a bar on a terminal, none in a log (a Ray task's output is forwarded line by line)
    for start in tqdm(range(0, len(blocks), batch_size), desc=f"perplexity@{blocks.shape[1]}", leave=False,
                      disable=None):
        ids = blocks[start:start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total_nll += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def passkey_example(tokenizer: Any, length: int, depth: float, key: int) -> tuple[torch.Tensor, int]:
    """One passkey-retrieval sequence of exactly ``length`` tokens: filler with the needle at relative ``depth``
    (snapped to a sentence start), then the question, then the answer, whose token count is returned too.

    Returns ``(ids LongTensor[length], answer_len)``: the last ``answer_len`` tokens are the answer. Starts with
    BOS only for a tokenizer that adds one by default. Pieces are tokenised apart, so with a subword tokenizer
    the answer tokens are those of ``" {key}"`` on its own.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None and tokenizer("a")["input_ids"][0] == bos else []
    needle = _encode(tokenizer, PASSKEY_NEEDLE.format(key=key))
    question = _encode(tokenizer, PASSKEY_QUESTION)
    answer = _encode(tokenizer, PASSKEY_ANSWER.format(key=key))
    n_filler = length - len(head) - len(needle) - len(question) - len(answer)
    if n_filler < 0:
        raise ValueError(f"a passkey prompt needs at least {length - n_filler} tokens, got length {length}")
    filler: list[int] = []
    starts = [0]  # token offsets where a filler sentence starts
    sentences = [_encode(tokenizer, s) for s in PASSKEY_FILLER]
    while len(filler) < n_filler:
        filler += sentences[(len(starts) - 1) % len(sentences)]
        starts.append(len(filler))
    filler = filler[:n_filler]
    starts = [s for s in starts if s < n_filler] + [n_filler]
    cut = min(starts, key=lambda s: abs(s - depth * n_filler))
    ids = head + filler[:cut] + needle + filler[cut:] + question + answer
    return torch.tensor(ids, dtype=torch.long), len(answer)


@torch.inference_mode()
def answer_argmax(model: torch.nn.Module, ids: torch.Tensor, answer_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted, answer)``, both ``[B, answer_len]``: the model's argmax at each answer position of passkey
    sequences ``ids [B, T]`` (``passkey_example``'s), given the prompt and the answer so far, and the answer."""
    length = ids.shape[1]
    logits = model(input_ids=ids).logits[:, length - answer_len - 1:length - 1]
    return logits.argmax(-1), ids[:, length - answer_len:]


@torch.inference_mode()
def passkey_accuracy(model: torch.nn.Module, tokenizer: Any, lengths: Sequence[int], depths: Sequence[float],
                     trials: int, seed: int = 0, batch_size: int = 8) -> dict[int, dict[float, float]]:
    """Passkey retrieval accuracy per (length, depth): the share of ``trials`` random 5-digit keys whose every
    answer token is the model's argmax given the prompt and the answer so far (= greedy decoding gets it right).

    The keys depend only on ``seed``, so models compared with the same seed answer the same questions.
    Returns ``{length: {depth: accuracy in [0, 1]}}``.
    """
    model.eval()
    device = _device(model)
    rng = random.Random(seed)
    grid: dict[int, dict[float, float]] = {}
    cells = [(length, depth) for length in lengths for depth in depths]
    for length, depth in tqdm(cells, desc="passkey", leave=False, disable=None):
        examples = [passkey_example(tokenizer, length, depth, rng.randint(10000, 99999)) for _ in range(trials)]
        answer_len = examples[0][1]
        ids = torch.stack([e[0] for e in examples])
        correct = 0
        for start in range(0, trials, batch_size):
            predicted, answer = answer_argmax(model, ids[start:start + batch_size].to(device), answer_len)
            correct += (predicted == answer).all(-1).sum().item()
        grid.setdefault(length, {})[depth] = correct / trials
    return grid


# The bundled lm-eval tasks (YAML + jsonl, offline): see docs/tiny-model.md.
LM_EVAL_TASKS = Path(__file__).resolve().parent / "assets" / "lm_eval"


@functools.lru_cache(maxsize=4)
def _lm_eval_task_manager(include_paths: tuple[str, ...]) -> Any:
    """An lm-eval ``TaskManager`` over its own tasks and ``include_paths``, made once per paths: indexing its
    ~15k task YAMLs takes seconds, and ``evaluate_models`` asks once per model."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths))


def lm_eval_scores(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], limit: int | None = None,
                   batch_size: int = 8, max_length: int | None = None,
                   include_path: str | os.PathLike | None = None) -> dict[str, dict[str, float | None]]:
    """Scores of lm-evaluation-harness ``tasks`` on an in-memory HF causal LM: ``{task: {metric: value}}``.

    ``tasks`` are lm-eval task, group or tag names: its own, the bundled ones (``linearard_passkey_mc``,
    ``linearard_stdlib_code``, tag ``linearard``: local data, offline) and any under ``include_path``.
    ``max_length`` is the window lm-eval cuts inputs to (default: the model's ``max_position_embeddings``);
    give a context-extended model its length for long tasks and the native one for short tasks. Metric names
    drop lm-eval's ``,none`` filter suffix (``"acc"``, ``"acc_stderr"``); values are floats, ``None`` where not
    finite; non-numeric entries (aliases, ``"N/A"`` stderrs) are left out, so the result is plain JSON.
    Needs the ``eval`` extra (``pip install 'linearard[eval]'``); lm-eval's own tasks need their data sets
    downloadable or cached.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError("lm-evaluation-harness is not installed: pip install 'linearard[eval]'") from e
    paths = (str(LM_EVAL_TASKS),) + ((str(include_path),) if include_path is not None else ())
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=False,
                                      task_manager=_lm_eval_task_manager(paths))
    return {task: {key.removesuffix(",none"): float(value) if math.isfinite(value) else None
                   for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for task, metrics in results["results"].items()}


def evaluate_models(models: Mapping[str, Any], tokenizer: Any, texts: Sequence[str],
                    cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate each named model on the same held-out ``texts`` and the same pass keys, in order.

    A value is a model or a zero-argument callable that returns one (called when its turn comes: a model can
    then be built, or changed, just before it is measured). ``cfg.ctx_len`` must be set. Returns the report
    (JSON-ready; lengths and depths as string keys)::

        {"native_ctx": n, "lengths": [n, 2n, 4n], "eval": {...cfg},
         "models": {name: {"ppl": {length: ppl}, "passkey": {length: mean accuracy over depths},
                           "passkey_by_depth": {length: {depth: accuracy}}, "lm_eval": {...}}}}

    ``passkey`` and ``passkey_by_depth`` are left out when ``passkey_trials`` is 0, ``lm_eval`` unless
    ``lm_eval_tasks`` (read at n) or ``lm_eval_long_tasks`` (read at the longest length) name tasks.
    """
    lengths = cfg.lengths
    docs = tokenize(texts, tokenizer)
    blocks = {n: _first_blocks(docs, n, max(1, cfg.ppl_tokens // n)) for n in lengths}
    results: dict[str, dict[str, Any]] = {}
    for name, source in models.items():
        model = source() if callable(source) and not isinstance(source, torch.nn.Module) else source
        result: dict[str, Any] = {"ppl": {str(n): perplexity(model, blocks[n], cfg.batch_size) for n in lengths}}
        if cfg.passkey_trials > 0:
            grid = passkey_accuracy(model, tokenizer, lengths, cfg.passkey_depths, cfg.passkey_trials, cfg.seed,
                                    cfg.batch_size)
            result["passkey"] = {str(n): sum(row.values()) / len(row) for n, row in grid.items()}
            result["passkey_by_depth"] = {str(n): {str(d): a for d, a in row.items()} for n, row in grid.items()}
        for tasks, window in ((cfg.lm_eval_tasks, lengths[0]), (cfg.lm_eval_long_tasks, lengths[-1])):
            if tasks:  # short tasks read at the native length, long ones (RULER) at the longest
                result.setdefault("lm_eval", {}).update(lm_eval_scores(model, tokenizer, tasks, cfg.lm_eval_limit,
                                                                       cfg.batch_size, max_length=window))
        results[name] = result
    return {"native_ctx": cfg.ctx_len, "lengths": lengths, "models": results, "eval": asdict(cfg)}


def check_evaluation(plan: Plan) -> None:
    """Raise ``ConfigError`` (one line, naming the key) when the evaluation a run ends with could not run, before
    anything starts: the held-out split (``data.eval_fraction``) must hold a document as long as the longest
    evaluation length (perplexity reads a block of each length), a passkey prompt must fit the shortest, and the
    lm-eval tasks must exist. Reads held-out documents only until one is long enough."""
    from linearard.models import load_tokenizer

    cfg, data = plan.eval, plan.config.data
    if data.eval_fraction == 0:
        raise ConfigError("data.eval_fraction is 0: no held-out documents to evaluate the restored model on; set it "
                          "> 0 (e.g. 0.05)")
    tokenizer = load_tokenizer(plan.models)
    longest, read, most = cfg.lengths[-1], 0, 0
    for text in itertools.islice(iter_heldout(data.source, data.text_field, data.eval_fraction), HELDOUT_DOCUMENTS):
        read += 1
        most = max(most, len(tokenize([text], tokenizer)[0]))
        if most >= longest:
            break
    if read == 0:
        raise ConfigError(f"data.eval_fraction {data.eval_fraction} holds out none of the documents of "
                          f"{data.source!r}: nothing to evaluate on; raise it, or use more documents")
    if most < longest:
        raise ConfigError(f"eval.length_multipliers: no held-out document has {longest} tokens (eval.ctx_len "
                          f"{cfg.ctx_len} x {cfg.length_multipliers[-1]}, the longest evaluation length); the longest "
                          f"of the {read} held out has {most}: lower eval.length_multipliers or eval.ctx_len, or use "
                          "longer documents")
    if cfg.passkey_trials > 0:
        try:
            passkey_example(tokenizer, cfg.lengths[0], 0.0, 10000)
        except ValueError as err:
            raise ConfigError(f"eval.ctx_len {cfg.ctx_len} is too short for the passkey test ({err}): raise it, or "
                              "set eval.passkey_trials 0") from None
    for key, tasks in (("eval.lm_eval_tasks", cfg.lm_eval_tasks), ("eval.lm_eval_long_tasks", cfg.lm_eval_long_tasks)):
        if not tasks:
            continue
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ConfigError(f"{key} needs lm-evaluation-harness: pip install 'linearard[eval]'") from None
        known = set(_lm_eval_task_manager((str(LM_EVAL_TASKS),)).all_tasks)
        unknown = [task for task in tasks if task not in known]
        if unknown:
            raise ConfigError(f"{key}: no lm-eval task, group or tag is named {unknown[0]!r}")


def evaluate_restore(plan: Plan, checkpoint_dir: str | Path, texts: Sequence[str],
                     run: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The restore job's evaluation, on one device: teacher, extended (the student as built, before training)
    and restored (the student with ``checkpoint_dir``'s trained weights) on ``texts``; then the report
    (``write_run_report``) and the merged restored model in ``plan.output.model_dir``. Returns the report."""
    from linearard.models import build_teacher_student, save_merged
    from linearard.train import load_trainable, seed_everything

    _check_texts(texts)
    seed_everything(plan.config.train.seed)  # the LoRA init, as in training: the extended model is the same
    teacher, student, tokenizer = build_teacher_student(plan.models, plan.config.lora, _eval_device())

    def restored() -> torch.nn.Module:
        load_trainable(student, checkpoint_dir)
        return student

    report = evaluate_models({"teacher": teacher, "extended": student, "restored": restored}, tokenizer, texts,
                             plan.eval)
    write_run_report(report, plan, run)
    save_merged(student, tokenizer, plan.output.model_dir)
    return report


def evaluate_checkpoints(plan: Plan, texts: Sequence[str], restored: str | None = None) -> dict[str, Any]:
    """Any models side by side, as they are on disk or on the hub: the plan's teacher, its extended model (the
    student checkpoint with its own RoPE, or the teacher's weights with ``model.rope``) and, given, a restored
    model (a merged checkpoint: its config carries its RoPE). One at a time on one device; the report as the
    restore job writes it (``write_run_report``). Returns the report."""
    from transformers import AutoModelForCausalLM

    from linearard.models import load_config, load_tokenizer
    from linearard.rope import with_rope

    _check_texts(texts)
    m, device = plan.models, _eval_device()

    def load(path: str, config: Any = None) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, revision=m.revision, dtype=m.dtype,
                                                     trust_remote_code=m.trust_remote_code)
        return model.to(device).eval()

    models = {"teacher": lambda: load(m.teacher),
              "extended": lambda: load(m.student, with_rope(load_config(m, m.student), m.student_rope,
                                                            m.student_window))}
    if restored is not None:
        models["restored"] = lambda: load(restored)
    report = evaluate_models(models, load_tokenizer(m), texts, plan.eval)
    write_run_report(report, plan, {"restored": restored} if restored else None)
    return report


def write_run_report(report: dict[str, Any], plan: Plan, run: Mapping[str, Any] | None = None) -> None:
    """Add what judges the restore (``restored_vs``, when there is a restored model) and the run's facts to the
    report, and write it to ``plan.output.report_dir``."""
    from linearard.report import judge, write_report

    if "restored" in report["models"]:
        report["restored_vs"] = judge(report)
    report["run"] = {"teacher": plan.models.teacher, "student": plan.models.student, "rope": plan.models.rope,
                     **(run or {})}
    write_report(report, plan.output.report_dir)


def _check_texts(texts: Sequence[str]) -> None:
    if not texts:
        raise ValueError("no held-out documents to evaluate on (data.eval_fraction selects none of the corpus)")


def _eval_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
