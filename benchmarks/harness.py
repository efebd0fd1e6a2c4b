"""What every benchmark shares: the import path of a bare checkout, timing on any device, the machine's
description, where results go, and Markdown tables.

    from harness import ROOT, environment, markdown_table, results_path, timed, write_json

Results are JSON files ``benchmarks/results/<benchmark>-<date>-<card>.json`` (under ``$OUT`` when it is set, as on
the GPU box), each with the ``environment`` of the run; the tables printed go into
``benchmarks/results/README.md`` by hand, with the date and the card.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a bare checkout works too (linearard maps its kernels/)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, budget_s: float = 1.0, max_reps: int = 30) -> float:
    """Median seconds of ``fn()`` after one warm-up call (which also compiles and autotunes); CUDA events on GPU."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = time.perf_counter() - t0
    reps = max(2, min(max_reps, int(budget_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def card(device: torch.device) -> str:
    """The accelerator's name (``"cpu"`` without one)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    """Date, card and library versions: what a result must say about where it was measured."""
    info: dict[str, Any] = {"date": datetime.date.today().isoformat(), "card": card(device),
                            "torch": torch.__version__}
    for name in ("triton", "transformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def results_path(benchmark: str, device: torch.device, out: str | os.PathLike | None = None) -> Path:
    """``out`` if given; else ``$OUT/<benchmark>.json`` on the GPU box; else
    ``benchmarks/results/<benchmark>-<date>-<card>.json``."""
    if out is not None:
        return Path(out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / f"{benchmark}.json"
    name = card(device).replace(" ", "-")
    return ROOT / "benchmarks" / "results" / f"{benchmark}-{datetime.date.today().isoformat()}-{name}.json"


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
