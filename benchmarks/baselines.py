"""Run every restoring method through the main job on the same model, data and tokens, and tabulate them.

    python benchmarks/baselines.py [--out runs/baselines] [--table docs/baselines.md] [-- extra restore args]

Each method is one ``linearard restore --train.method M`` run (the same Ray pipeline, data, evaluation and
MLflow store, one registered model per method); CPT runs again at 10x the tokens. Finished runs (their
``report/report.json`` exists) are not run again, so an interrupted sweep resumes. The table has short-text
perplexity at n, long perplexity and passkey accuracy at the longest evaluated length, training tokens and
training wall time; the raw reports are gathered into ``<out>/baselines.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import markdown_table

# (row name, restore arguments); "cpt x10" trains 10x the steps of the others.
RUNS = [
    ("ard", ["--method", "ard"]),
    ("cpt", ["--method", "cpt"]),
    ("logits_kd", ["--method", "logits_kd"]),
    ("hidden_cosine", ["--method", "hidden_cosine"]),
    ("ard+cpt", ["--method", "ard+cpt"]),
    ("cpt x10", ["--method", "cpt", "--train.steps", "{steps10}"]),
]


def run_all(out: Path, extra: list[str], steps: int, only: list[str] | None) -> dict[str, dict]:
    reports = {}
    for name, args in RUNS:
        if only and name not in only:
            continue
        folder = out / name.replace(" ", "_").replace("+", "_")
        report_path = folder / "report" / "report.json"
        if not report_path.exists():
            args = [a.format(steps10=10 * steps) for a in args]
            command = [sys.executable, "-m", "pipelines.cli", "restore", "--output", str(folder),
                       "--tracking-uri", f"sqlite:///{(out / 'mlflow.db').resolve()}",
                       "--tracking.registered_model_name", f"linearard-{folder.name}", "--train.steps", str(steps),
                       *args, *extra]
            print(f"[baselines] {name}: {' '.join(command[2:])}", flush=True)
            start = time.time()
            subprocess.run(command, check=True)
            print(f"[baselines] {name}: done in {time.time() - start:.0f}s", flush=True)
        reports[name] = json.loads(report_path.read_text())
    return reports


def table(reports: dict[str, dict]) -> str:
    first = next(iter(reports.values()))
    n, longest = str(first["lengths"][0]), str(first["lengths"][-1])

    def row(name: str, result: dict, run: dict) -> list:
        passkey = result.get("passkey", {})
        return [name, f"{result['ppl'][n]:.3f}", f"{result['ppl'][longest]:.3f}", f"{passkey.get(n, 0):.2f}",
                f"{passkey.get(longest, 0):.2f}", f"{run.get('tokens', 0):,}", f"{run.get('train_seconds', 0):.0f}"]

    rows = [row("teacher (native RoPE)", first["models"]["teacher"], {}),
            row("extended, not restored", first["models"]["extended"], {})]
    rows += [row(name, report["models"]["restored"], report["run"]) for name, report in reports.items()]
    return markdown_table(["method", f"PPL@{n}", f"PPL@{longest}", f"passkey@{n}", f"passkey@{longest}", "tokens",
                           "train s"], rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/baselines", help="one folder per method, plus mlflow.db")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of each method (CPT x10: 10x)")
    parser.add_argument("--only", nargs="*", help="run only these rows (e.g. ard cpt)")
    parser.add_argument("--table", help="also write the Markdown table to this file")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    reports = run_all(out, extra, args.steps, args.only)
    (out / "baselines.json").write_text(json.dumps(reports, indent=1) + "\n")
    text = table(reports)
    print(text)
    if args.table:
        Path(args.table).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
