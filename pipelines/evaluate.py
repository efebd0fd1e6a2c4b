"""The evaluation job: teacher vs scaled vs restored on held-out text, and the merged restored checkpoint.

``evaluate_restore`` is plain PyTorch (one process, one device): it builds the teacher and a fresh student
(scaled RoPE, LoRA at its zero init, i.e. exactly the scaled model), measures both, loads the trained weights
of a checkpoint into the student, measures it again, writes the report (``linearard.evaluate``: json, md,
PNG plots) and saves the merged student as a plain HF checkpoint. The restore job runs it as a Ray task on
one GPU (or CPU); ``linearard evaluate --config X --checkpoint DIR`` runs it on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from linearard.config import ConfigError, EvalConfig, RunConfig
from linearard.evaluate import evaluate_models, write_report
from linearard.models import build_teacher_student, save_merged
from linearard.train import load_trainable, seed_everything
from pipelines.cli import error_line


def eval_config(cfg: RunConfig, teacher: torch.nn.Module) -> EvalConfig:
    """The run's ``eval`` section with the native context n resolved: ``eval.ctx_len`` or the teacher's
    ``max_position_embeddings`` (short-text quality is measured where the teacher is at home)."""
    n = cfg.eval.ctx_len or int(teacher.config.get_text_config().max_position_embeddings)
    return dataclasses.replace(cfg.eval, ctx_len=n)


def evaluate_restore(
    cfg: RunConfig, checkpoint_dir: str | Path | None, texts: list[str], out_dir: str | Path,
    run_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate teacher, scaled and (with ``checkpoint_dir``) restored; write ``out_dir/report`` and, with a
    checkpoint, the merged model to ``out_dir/model``. ``run_info`` (e.g. ``method``, ``tokens``,
    ``train_seconds``) is copied into the report. Returns the report dict."""
    out_dir = Path(out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(cfg.train.seed)
    teacher, student, tokenizer = build_teacher_student(cfg.model, cfg.lora, device)
    models = {"teacher": teacher, "scaled": student}
    eval_cfg = eval_config(cfg, teacher)
    report = None
    if texts:
        report = evaluate_models(models, tokenizer, texts, eval_cfg)
    if checkpoint_dir is not None:
        load_trainable(student, Path(checkpoint_dir) / "trainable.safetensors")
        if texts:
            restored = evaluate_models({"restored": student}, tokenizer, texts, eval_cfg)
            report = _merge_reports(report, restored)
        save_merged(student, tokenizer, out_dir / "model")
    if report is not None:
        report.update(run_info or {})
        write_report(report, out_dir / "report")
    return report or {}


def _merge_reports(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Add the models of ``extra`` to ``base`` and recompute the gap recovery (same texts, same config)."""
    from linearard.evaluate import gap_recovery

    for key in ("ppl", "short_ppl", "long_ppl", "passkey", "passkey_grid", "lm_eval"):
        if key in extra:
            base.setdefault(key, {}).update(extra[key])
    base["models"] = list(base["models"]) + list(extra["models"])
    short = base["short_ppl"]
    base["gap_recovery"] = gap_recovery(short["teacher"], short["scaled"], short["restored"])
    return base


def main(argv: list[str] | None = None) -> int:
    """``linearard evaluate --config X.yaml [--checkpoint DIR] [--output DIR] [--key value ...]``."""
    parser = argparse.ArgumentParser(prog="linearard evaluate", allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="run config YAML (defaults: the bundled tiny model and corpus)")
    parser.add_argument("--checkpoint", help="a training checkpoint folder (trainable.safetensors, ...)")
    parser.add_argument("--output", help="where report/ and model/ go (default: train.output_dir)")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = RunConfig.from_yaml(args.config, overrides)
        if args.checkpoint and not (Path(args.checkpoint) / "trainable.safetensors").exists():
            raise ConfigError(f"--checkpoint: no trainable.safetensors in {args.checkpoint!r}")
        from pipelines.data import check_source, heldout_texts
        from pipelines.restore import init_ray

        check_source(cfg.data.source)
        init_ray(cfg)
        texts = heldout_texts(cfg)
        report = evaluate_restore(cfg, args.checkpoint, texts, args.output or cfg.train.output_dir)
    except ConfigError as err:
        print(f"linearard evaluate: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one line for the user, the traceback is in the logs
        print(f"linearard evaluate: error: {error_line(err)}", file=sys.stderr)
        return 1
    print(f"short-text perplexity: {report.get('short_ppl')}, gap recovery: {report.get('gap_recovery')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
