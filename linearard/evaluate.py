"""Evaluation of a context-extended model before and after restoring: perplexity by length, passkey retrieval,
optional lm-evaluation-harness tasks, and the report (``report.json``, ``report.md``, PNG plots).

The usual call compares three models side by side on the same text and the same pass keys::

    report = evaluate_models({"teacher": t, "scaled": s, "restored": r}, tokenizer, texts, EvalConfig(ctx_len=256))
    write_report(report, "outputs/run1")

Lengths are ``ctx_len × length_multipliers`` (n, 2n, 4n by default). ``short_ppl`` is the perplexity at n, the
native length, where the scaled RoPE hurts and restoring should help; ``long_ppl`` and ``passkey`` are taken at
the longest length, which the scaled model exists for. ``gap_recovery`` = (PPL_scaled − PPL_restored) /
(PPL_scaled − PPL_teacher) at n.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from linearard.config import EvalConfig
from linearard.data import cut_per_document, tokenize

# The passkey format (the classic one of Mohtashami & Jaggi, 2023, with a shorter needle so that a prompt
# of a 256-token native length still has room for filler). The bundled model is pretrained on examples of
# exactly this format, made by `passkey_example`, so the evaluation asks it nothing it has not seen at n.
PASSKEY_FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
                  "There and back again. ")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_ANSWER = " {key}"

MODEL_ORDER = ("teacher", "scaled", "restored")


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
    for start in tqdm(range(0, len(blocks), batch_size), desc=f"perplexity@{blocks.shape[1]}", leave=False):
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
    for length, depth in tqdm(cells, desc="passkey", leave=False):
        examples = [passkey_example(tokenizer, length, depth, rng.randint(10000, 99999)) for _ in range(trials)]
        answer_len = examples[0][1]
        ids = torch.stack([e[0] for e in examples])
        correct = 0
        for start in range(0, trials, batch_size):
            batch = ids[start:start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, length - answer_len - 1:length - 1]
            correct += (logits.argmax(-1) == batch[:, length - answer_len:]).all(-1).sum().item()
        grid.setdefault(length, {})[depth] = correct / trials
    return grid


def gap_recovery(ppl_teacher: float, ppl_scaled: float, ppl_restored: float) -> float | None:
    """Share of the perplexity gap the restore closed: (PPL_scaled − PPL_restored) / (PPL_scaled − PPL_teacher).

    1.0 means back to the teacher, 0.0 no better than the scaled model; ``None`` when there is no gap to close.
    """
    gap = ppl_scaled - ppl_teacher
    return None if gap <= 0 else (ppl_scaled - ppl_restored) / gap


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


def evaluate_models(models: Mapping[str, torch.nn.Module], tokenizer: Any, texts: Sequence[str],
                    cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate each named model on the same held-out ``texts`` and the same pass keys.

    Names are free, but ``teacher`` / ``scaled`` / ``restored`` fill ``gap_recovery``. Returns the report
    dict (JSON-ready, lengths and depths as string keys): ``ppl`` {model: {length: ppl}}, ``short_ppl`` and
    ``long_ppl`` {model: ppl at n / at the longest length}, ``passkey`` {model: mean accuracy at the longest
    length}, ``passkey_grid`` {model: {length: {depth: accuracy}}} (both empty when ``passkey_trials`` is 0),
    ``gap_recovery``, ``lm_eval`` (when asked) and ``eval`` (the config). ``cfg.ctx_len`` must be set.
    """
    lengths = cfg.lengths
    docs = tokenize(texts, tokenizer)
    blocks = {n: _first_blocks(docs, n, max(1, cfg.ppl_tokens // n)) for n in lengths}
    report: dict[str, Any] = {"ctx_len": cfg.ctx_len, "lengths": lengths, "models": list(models), "ppl": {},
                              "short_ppl": {}, "long_ppl": {}, "passkey": {}, "passkey_grid": {}}
    for name, model in models.items():
        ppl = {str(n): perplexity(model, blocks[n], cfg.batch_size) for n in lengths}
        report["ppl"][name] = ppl
        report["short_ppl"][name] = ppl[str(lengths[0])]
        report["long_ppl"][name] = ppl[str(lengths[-1])]
        if cfg.passkey_trials > 0:
            grid = passkey_accuracy(model, tokenizer, lengths, cfg.passkey_depths, cfg.passkey_trials, cfg.seed,
                                    cfg.batch_size)
            report["passkey_grid"][name] = {str(n): {str(d): a for d, a in row.items()} for n, row in grid.items()}
            report["passkey"][name] = sum(grid[lengths[-1]].values()) / len(cfg.passkey_depths)
        if cfg.lm_eval_tasks:
            report.setdefault("lm_eval", {})[name] = lm_eval_scores(model, tokenizer, cfg.lm_eval_tasks,
                                                                    cfg.lm_eval_limit, cfg.batch_size)
    short = report["short_ppl"]
    report["gap_recovery"] = (gap_recovery(short["teacher"], short["scaled"], short["restored"])
                              if all(k in short for k in MODEL_ORDER) else None)
    report["eval"] = asdict(cfg)
    return report


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown tables: perplexity and passkey accuracy by length, one row per model."""
    lengths = [str(n) for n in report["lengths"]]
    run = [f"{label} {report[key]:,}" if isinstance(report.get(key), int) else f"{label} {report[key]}"
           for key, label in (("method", "method"), ("tokens", "training tokens"),
                              ("train_seconds", "training seconds")) if report.get(key) is not None]
    lines = ["# Evaluation report", "", f"Native context n = {report['ctx_len']}" +
             "".join(f"; {item}" for item in run) + ".", "",
             "## Perplexity on held-out text (lower is better)", "",
             "| model | " + " | ".join(f"PPL@{n}" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for name in report["models"]:
        lines.append(f"| {name} | " + " | ".join(f"{report['ppl'][name][n]:.3f}" for n in lengths) + " |")
    if report["passkey_grid"]:
        lines += ["", "## Passkey retrieval accuracy (mean over depths)", "",
                  "| model | " + " | ".join(f"@{n}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for name in report["models"]:
            grid = report["passkey_grid"][name]
            lines.append(f"| {name} | " + " | ".join(
                f"{sum(grid[n].values()) / len(grid[n]):.2f}" for n in lengths) + " |")
    if report.get("gap_recovery") is not None:
        lines += ["", f"Gap recovery at n: **{100 * report['gap_recovery']:.1f}%** "
                      "= (PPL_scaled − PPL_restored) / (PPL_scaled − PPL_teacher)."]
    for name, scores in report.get("lm_eval", {}).items():
        lines += ["", f"## lm-evaluation-harness: {name}", "", "```", json.dumps(scores, indent=1), "```"]
    return "\n".join(lines) + "\n"


def _plot_perplexity(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    for name in report["models"]:
        ax.plot(report["lengths"], [report["ppl"][name][str(n)] for n in report["lengths"]], marker="o", label=name)
    ax.axvline(report["ctx_len"], color="grey", linestyle="--", linewidth=1, label="native n")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xticks(report["lengths"], [str(n) for n in report["lengths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity on held-out text")
    ax.set_title("Perplexity vs length")
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_passkey(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    names, lengths = report["models"], [str(n) for n in report["lengths"]]
    depths = list(report["passkey_grid"][names[0]][lengths[0]])
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names) + 1.2, 3.6), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, name in zip(axes[0], names):
        grid = [[report["passkey_grid"][name][n][d] for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, acc in enumerate(row):
                ax.text(j, i, f"{acc:.1f}", ha="center", va="center", color="white" if acc < 0.5 else "black")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("context length")
        ax.set_title(name)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``report.json``, ``report.md``, ``ppl_vs_length.png`` and ``passkey_heatmap.png`` (when the passkey
    test ran) into ``out_dir``.

    Each file is written beside its final name and renamed into place, so a crash leaves no half-written file.
    Returns the paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers = {
        "report.json": lambda p: p.write_text(json.dumps(report, indent=2) + "\n"),
        "report.md": lambda p: p.write_text(report_markdown(report)),
        "ppl_vs_length.png": lambda p: _plot_perplexity(report, p),
        "passkey_heatmap.png": lambda p: _plot_passkey(report, p),
    }
    if not report["passkey_grid"]:  # passkey_trials = 0: nothing to draw
        del writers["passkey_heatmap.png"]
    written = []
    for name, write in writers.items():
        tmp = out / f".{name}.tmp{Path(name).suffix}"  # keep the suffix: matplotlib picks the format from it
        write(tmp)
        os.replace(tmp, out / name)
        written.append(out / name)
    return written
