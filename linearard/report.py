"""The evaluation report (``linearard.evaluate.evaluate_models`` output) as a user reads it: the numbers that
judge a restore, Markdown tables, PNG plots, and the files.

What judges a restore (``judge``): the restored model's perplexity at n over the teacher's, its passkey
retrieval at n, and, at the longest length, its perplexity over the extended model's and its retrieval as a
share of the extended model's (what the extended model could do there that it still can).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def judge(report: Mapping[str, Any], model: str = "restored", teacher: str = "teacher",
          extended: str = "extended") -> dict[str, float | None]:
    """The ratios that judge ``model`` (None where a model or the passkey test is missing, or a ratio has a
    zero denominator)::

        ppl_n_over_teacher        PPL@n of model / PPL@n of teacher           (1 = back to the teacher)
        passkey_n                 passkey accuracy of model at n
        ppl_long_over_extended    PPL@longest of model / of extended          (1 = the long range kept)
        passkey_long_over_extended  passkey@longest of model / of extended   (1 = the long range kept)
    """
    models, n, longest = report["models"], str(report["lengths"][0]), str(report["lengths"][-1])

    def value(name: str, metric: str, length: str) -> float | None:
        return models.get(name, {}).get(metric, {}).get(length)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    return {"ppl_n_over_teacher": ratio(value(model, "ppl", n), value(teacher, "ppl", n)),
            "passkey_n": value(model, "passkey", n),
            "ppl_long_over_extended": ratio(value(model, "ppl", longest), value(extended, "ppl", longest)),
            "passkey_long_over_extended": ratio(value(model, "passkey", longest),
                                                value(extended, "passkey", longest))}


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: perplexity and passkey accuracy by length, one row per model, then the ratios
    that judge the restored model (when there is one)."""
    lengths = [str(n) for n in report["lengths"]]
    models = report["models"]
    run = report.get("run") or {}
    facts = [f"{label} {run[key]:,}" if isinstance(run.get(key), int) else f"{label} {run[key]}"
             for key, label in (("method", "method"), ("tokens", "training tokens"),
                                ("train_seconds", "training seconds")) if run.get(key) is not None]
    lines = ["# Evaluation report", "", f"Native context n = {report['native_ctx']}" +
             "".join(f"; {item}" for item in facts) + ".", "",
             "| model | " + " | ".join(f"PPL@{n}" for n in lengths) + " | " +
             " | ".join(f"passkey@{n}" for n in lengths) + " |",
             "|---|" + "---:|" * (2 * len(lengths))]
    for name, result in models.items():
        passkey = result.get("passkey", {})
        lines.append(f"| {name} | " + " | ".join(f"{result['ppl'][n]:.3f}" for n in lengths) + " | " +
                     " | ".join(f"{passkey[n]:.2f}" if n in passkey else "—" for n in lengths) + " |")
    lines.append("")
    lines.append("Perplexity on held-out text (lower is better); passkey: share of keys retrieved, mean over depths.")
    if "restored" in models:
        verdict = judge(report)
        shown = {"PPL@n / teacher": verdict["ppl_n_over_teacher"], "passkey@n": verdict["passkey_n"],
                 f"PPL@{lengths[-1]} / extended": verdict["ppl_long_over_extended"],
                 f"passkey@{lengths[-1]} / extended": verdict["passkey_long_over_extended"]}
        lines += ["", "Restored: " + "; ".join(f"{k} **{v:.3f}**" for k, v in shown.items() if v is not None) + "."]
    for name, result in models.items():
        if "lm_eval" in result:
            lines += ["", f"## lm-evaluation-harness: {name}", "", "```", json.dumps(result["lm_eval"], indent=1),
                      "```"]
    return "\n".join(lines) + "\n"


def _plot_perplexity(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    for name, result in report["models"].items():
        ax.plot(report["lengths"], [result["ppl"][str(n)] for n in report["lengths"]], marker="o", label=name)
    ax.axvline(report["native_ctx"], color="grey", linestyle="--", linewidth=1, label="native n")
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

    names, lengths = list(report["models"]), [str(n) for n in report["lengths"]]
    depths = list(report["models"][names[0]]["passkey_by_depth"][lengths[0]])
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names) + 1.2, 3.6), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, name in zip(axes[0], names):
        by_depth = report["models"][name]["passkey_by_depth"]
        grid = [[by_depth[n][d] for n in lengths] for d in depths]
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
    if not all("passkey_by_depth" in result for result in report["models"].values()):
        del writers["passkey_heatmap.png"]  # passkey_trials = 0: nothing to draw
    written = []
    for name, write in writers.items():
        tmp = out / f".{name}.tmp{Path(name).suffix}"  # keep the suffix: matplotlib picks the format from it
        write(tmp)
        os.replace(tmp, out / name)
        written.append(out / name)
    return written
