"""Which restoring recipe gives back short-text ability and keeps the long range: every candidate at equal
tokens, on both scenarios, judged as a user would (``linearard.report.judge``). Prints a table, writes JSON.

    python benchmarks/restore_study.py --jobs 12                  # on a GPU box: every row, 12 processes
    python benchmarks/restore_study.py --rows ard:pi --steps 20   # one row, on the CPU

Scenarios: ``extended`` restores the bundled extended model (RoPE ×4 + continual pre-training at 4n) against the
bundled teacher; ``pi`` restores the teacher's own weights with RoPE ×4 (position interpolation, no training).
Each row is one restore through the library's own path, in one process: ``plan.resolve`` of the restore job's
config with the row's overrides, ``build_teacher_student``, ``Trainer.fit`` on blocks of the job's data
(``linearard.data.block_batches``: the bundled corpus without its held-out documents, no passkey documents), then
the job's evaluation (``evaluate_restore``: teacher / extended / restored on the held-out documents). Rows differ
only in their overrides; every row of a scenario reads the same number of tokens. A row whose name gives no
learning rate runs at 3e-3 (the rate ARD was tuned at on this model, docs/tiny-model.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import environment, markdown_table, results_path, write_json  # noqa: E402  (also: the import path)

SCENARIOS = {
    "extended": [],  # the restore job's default: the bundled extended model
    "pi": ["--model.student", "null", "--model.rope", "linear:4"],
}
RELATIONS_OFF = ["--loss.q", "0", "--loss.k", "0", "--loss.v", "0"]
EVERY_LINEAR = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"
ATTENTION_KD = ["--train.method", "ard", "--loss.q", "0", "--loss.k", "0", "--loss.qk", "1", "--loss.logits_kd", "1"]
# name -> overrides of the restore job's defaults (run on every scenario)
ROWS = {
    "ard (paper: Q/Q+K/K+V/V)": ["--train.method", "ard"],
    "ard, V/V weight 3": ["--train.method", "ard", "--loss.v", "3"],
    "attention map Q/K": ["--train.method", "ard", *RELATIONS_OFF, "--loss.qk", "1"],
    "Q/K + V/V": ["--train.method", "ard", "--loss.q", "0", "--loss.k", "0", "--loss.qk", "1"],
    "ard + Q/K": ["--train.method", "ard", "--loss.qk", "1"],
    "ard + logits KD": ["--train.method", "ard", "--loss.logits_kd", "1"],
    "Q/K + V/V + logits KD": ["--train.method", "ard", "--loss.q", "0", "--loss.k", "0", "--loss.qk", "1",
                              "--loss.logits_kd", "1"],
    "Q/K + V/V, lr 1e-3": ["--train.method", "ard", "--loss.q", "0", "--loss.k", "0", "--loss.qk", "1",
                           "--optim.lr", "1e-3"],
    "Q/K + V/V, lr 1e-2": ["--train.method", "ard", "--loss.q", "0", "--loss.k", "0", "--loss.qk", "1",
                           "--optim.lr", "1e-2"],
    "Q/K + V/V, LoRA r 16": ["--train.method", "ard", "--loss.q", "0", "--loss.k", "0", "--loss.qk", "1",
                             "--lora.r", "16", "--lora.alpha", "32"],
    "Q/K + V/V, layers 0-1": ["--train.method", "ard", "--loss.q", "0", "--loss.k", "0", "--loss.qk", "1",
                              "--loss.layers", "[0, 1]"],
    "Q/K + V/V, full q/k/v": ["--train.method", "ard", "--loss.q", "0", "--loss.k", "0", "--loss.qk", "1",
                              "--model.trainable", "qkv"],
    "ard + Q/K + logits KD": ["--train.method", "ard", "--loss.qk", "1", "--loss.logits_kd", "1"],
    "logits KD": ["--train.method", "logits_kd", "--optim.lr", "3e-3"],
    "logits KD, lr 3e-4": ["--train.method", "logits_kd", "--optim.lr", "3e-4"],
    "logits KD, lr 1e-3": ["--train.method", "logits_kd", "--optim.lr", "1e-3"],
    "logits KD, lr 1e-4": ["--train.method", "logits_kd", "--optim.lr", "1e-4"],
    "logits KD, lr 1e-4, LoRA on every linear": ["--train.method", "logits_kd", "--optim.lr", "1e-4",
                                                 "--lora.target_modules", EVERY_LINEAR],
    "logits KD, lr 3e-4, LoRA on every linear": ["--train.method", "logits_kd", "--optim.lr", "3e-4",
                                                 "--lora.target_modules", EVERY_LINEAR],
    "logits KD, LoRA on every linear": ["--train.method", "logits_kd", "--optim.lr", "3e-3",
                                        "--lora.target_modules", EVERY_LINEAR],
    "Q/K + V/V + logits KD, LoRA on every linear": [*ATTENTION_KD, "--lora.target_modules", EVERY_LINEAR],
    "logits KD, lr 1e-3, whole model": ["--train.method", "logits_kd", "--optim.lr", "1e-3",
                                        "--model.trainable", "full"],
    "logits KD, lr 1e-4, whole model": ["--train.method", "logits_kd", "--optim.lr", "1e-4",
                                        "--model.trainable", "full"],
    "logits KD, lr 3e-5, whole model": ["--train.method", "logits_kd", "--optim.lr", "3e-5",
                                        "--model.trainable", "full"],
    "logits KD, lr 3e-4, 2000 steps": ["--train.method", "logits_kd", "--optim.lr", "3e-4", "--train.steps", "2000"],
    "logits KD, lr 3e-5, whole model, 2000 steps": ["--train.method", "logits_kd", "--optim.lr", "3e-5",
                                                    "--model.trainable", "full", "--train.steps", "2000"],
    "logits KD + LM at n, lr 3e-4": ["--train.method", "logits_kd", "--loss.lm", "1", "--optim.lr", "3e-4"],
    "logits KD + LM at n, lr 1e-3": ["--train.method", "logits_kd", "--loss.lm", "1", "--optim.lr", "1e-3"],
    "ard + logits KD, lr 3e-4": ["--train.method", "ard", "--loss.logits_kd", "1", "--optim.lr", "3e-4"],
    "Q/K + logits KD, lr 3e-4": [*ATTENTION_KD, "--loss.v", "0", "--optim.lr", "3e-4"],
    "Q/K + V/V + logits KD, lr 3e-4": [*ATTENTION_KD, "--optim.lr", "3e-4"],
    "Q/K + V/V + logits KD, lr 1e-3": [*ATTENTION_KD, "--optim.lr", "1e-3"],
    "Q/K + logits KD, lr 1e-3": [*ATTENTION_KD, "--loss.v", "0", "--optim.lr", "1e-3"],
    "Q/K + V/V + logits KD, lr 1e-3, LoRA r 8": [*ATTENTION_KD, "--optim.lr", "1e-3", "--lora.r", "8",
                                                 "--lora.alpha", "16"],
    "Q/K + V/V + logits KD, lr 1e-3, full q/k/v": [*ATTENTION_KD, "--optim.lr", "1e-3", "--model.trainable", "qkv"],
    "Q/K + V/V + logits KD, 950 steps": [*ATTENTION_KD, "--train.steps", "950"],
    "Q/K + V/V + logits KD + hidden cosine": [*ATTENTION_KD, "--loss.hidden_cosine", "1"],
    "Q/K + hidden cosine": ["--train.method", "ard", *RELATIONS_OFF, "--loss.qk", "1", "--loss.hidden_cosine", "1"],
    "hidden cosine, lr 1e-3": ["--train.method", "hidden_cosine", "--optim.lr", "1e-3"],
    "hidden cosine": ["--train.method", "hidden_cosine"],
    "CPT": ["--train.method", "cpt"],
    "ard+cpt": ["--train.method", "ard+cpt"],
}


def run_row(task: tuple[str, str, list[str], str]) -> dict:
    """One restore, in this process: its report (``evaluate_restore``) plus the row's name and wall time."""
    name, scenario, overrides, device = task
    import torch

    from linearard.checkpoint import LocalCheckpoints, latest
    from linearard.config import RunConfig
    from linearard.data import block_batches, is_heldout, read_texts
    from linearard.evaluate import evaluate_restore
    from linearard.models import build_teacher_student
    from linearard.plan import resolve
    from linearard.train import Trainer, seed_everything

    torch.set_num_threads(1)
    start = time.time()
    with tempfile.TemporaryDirectory() as out:
        plan = resolve(RunConfig.from_yaml(None, [*overrides, "--train.output_dir", out, "--train.progress_bar",
                                                  "false", "--train.autocast_bf16", "false",
                                                  "--loss.backend", "torch"]))
        data = plan.config.data
        texts = [t for t in read_texts(data.source, data.text_field) if not is_heldout(t, data.eval_fraction)]
        init_from = None
        for stage in plan.stages:
            cfg = stage.config
            seed_everything(cfg.train.seed)
            teacher, student, tokenizer = build_teacher_student(plan.models, cfg.lora, device)
            stream = ({k: torch.from_numpy(v) for k, v in batch.items()} for batch in block_batches(
                texts, tokenizer, cfg.data.ctx_len, cfg.data.mode, cfg.train.batch_size, cfg.data.shuffle_seed))
            store = LocalCheckpoints(Path(out) / stage.run_name)
            Trainer(cfg, teacher, student, device=device, init_from=init_from).fit(stream, store)
            init_from = latest(store.root)
        held_out = [t for t in read_texts(data.source, data.text_field) if is_heldout(t, data.eval_fraction)][:64]
        report = evaluate_restore(plan, init_from, held_out, {"method": plan.config.train.method,
                                                              "steps": plan.steps})
    report.update(row=name, scenario=scenario, overrides=overrides, seconds=round(time.time() - start, 1),
                  tokens=sum(s.config.train.steps * s.config.train.batch_size * s.config.data.ctx_len
                             for s in plan.stages))
    print(json.dumps({"row": name, "scenario": scenario, "seconds": report["seconds"],
                      "restored_vs": report.get("restored_vs")}), flush=True)
    return report


def table(reports: list[dict]) -> str:
    """One row per (scenario, recipe): the numbers that judge a restore, then the raw ones; each scenario starts
    with its extended model before restoring."""
    from linearard.report import judge

    def cell(value, digits=3):
        return "—" if value is None else f"{value:.{digits}f}"

    def row(scenario: str, name: str, report: dict, model: str, tokens: str) -> list:
        n, longest = str(report["lengths"][0]), str(report["lengths"][-1])
        verdict, result = judge(report, model=model), report["models"][model]
        return [scenario, name, cell(verdict["ppl_n_over_teacher"]), cell(verdict["passkey_n"], 2),
                cell(verdict["ppl_long_over_extended"]), cell(result.get("passkey", {}).get(longest), 2),
                cell(result["ppl"][n], 2), cell(result["ppl"][longest], 2), tokens]

    rows, seen = [], set()
    for report in reports:
        if report["scenario"] not in seen:
            seen.add(report["scenario"])
            rows.append(row(report["scenario"], "**extended, not restored**", report, "extended", "0"))
        rows.append(row(report["scenario"], report["row"], report, "restored", f"{report['tokens']:,}"))
    return markdown_table(["scenario", "recipe", "PPL@n / teacher", "passkey@n", "PPL@4n / extended", "passkey@4n",
                           "PPL@n", "PPL@4n", "tokens"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="*", help="row:scenario pairs, or row names (both scenarios); default all")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    parser.add_argument("--steps", type=int, help="optimizer steps of every row (default: the job's)")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once, one process each")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="overrides added to every row")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/restore_study-<date>-<card>.json)")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="merge result files (of one card and code) "
                        "into --out and print one table")
    args = parser.parse_args(argv)
    if args.combine:
        parts = [json.loads(Path(p).read_text()) for p in args.combine]
        reports = [report for part in parts for report in part["reports"]]
        merged = {**{k: v for k, v in parts[0].items() if k not in ("reports", "argv")},
                  "runs": [run for part in parts for run in part.get("runs", [part.get("argv")])],
                  "reports": reports}
        if args.out:
            write_json(Path(args.out), merged)
        print(table(sorted(reports, key=lambda r: (r["scenario"] != "extended", list(ROWS).index(r["row"])))))
        return 0
    tasks = []
    for scenario in args.scenarios:
        for name, overrides in ROWS.items():
            wanted = not args.rows or name in args.rows or f"{name}:{scenario}" in args.rows
            if wanted:
                steps = ["--train.steps", str(args.steps)] if args.steps else []
                tasks.append((name, scenario, [*SCENARIOS[scenario], *overrides, *steps, *args.extra], args.device))
    print(f"{len(tasks)} rows, {args.jobs} at a time on {args.device}", flush=True)
    import torch

    device = torch.device(args.device)
    path, reports = results_path("restore_study", device, args.out), []
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for report in pool.imap_unordered(run_row, tasks):
            reports.append(report)  # written as rows finish: a run cut short keeps what it has
            write_json(path, {**environment(device), "argv": sys.argv[1:], "reports": reports})
    order = {(name, scenario): i for i, (name, scenario, *_) in enumerate(tasks)}
    reports.sort(key=lambda r: order[r["row"], r["scenario"]])
    write_json(path, {**environment(device), "argv": sys.argv[1:], "reports": reports})
    print(table(reports))
    print(f"wrote {path}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
