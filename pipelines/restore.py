"""The main job: restore a RoPE-scaled model with LinearARD on Ray, tracked in MLflow, ending in the registry.

    python -m pipelines.restore [--config X.yaml] [--model PATH_OR_ID] [--rope SPEC] [--method M] [--output DIR]
                                [--tracking-uri URI] [--address RAY] [--workers N] [--section.key value ...]

``linearard restore`` is the same command. With no arguments it restores the bundled tiny model on the bundled
corpus, on CPU, with a local Ray and a local MLflow sqlite store. Under ``ray job submit --working-dir . -- ...``
it joins that cluster (``RAY_ADDRESS``); run by hand it joins a running local Ray or starts one.

Steps: validate the config (nothing starts on a bad one) -> open the MLflow run (params = the whole config)
-> Ray Data streams blocks to Ray Train FSDP2 workers (per-step metrics to MLflow, checkpoints through Ray
Train, restarts on worker failure) -> one Ray task on a GPU (or CPU) evaluates teacher / scaled / restored on
held-out text, writes the report and the merged model, logs them -> the model is registered (last step: a
failed run registers nothing) -> the run is closed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray

from linearard.config import ConfigError, RunConfig
from pipelines.cli import error_line

# Shortcut flags -> config keys (every other `--section.key value` passes through as an override).
SHORTCUTS = {
    "model": "model.teacher",
    "rope": "model.rope",
    "method": "train.method",
    "output": "train.output_dir",
    "tracking_uri": "tracking.uri",
    "address": "ray.address",
    "workers": "ray.num_workers",
}


def parse_config(argv: list[str] | None, prog: str = "linearard restore") -> RunConfig:
    """Command line -> validated ``RunConfig`` (raises ``ConfigError``; argparse exits 2 on unknown usage)."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description="Restore a RoPE-scaled model "
                                     "with LinearARD on Ray; every other --section.key value overrides the config.")
    parser.add_argument("--config", help="run config YAML (default: the embedded tiny model and corpus)")
    parser.add_argument("--model", help="teacher: local path or hub id (model.teacher)")
    parser.add_argument("--rope", help="the student's RoPE, e.g. linear:8, yarn:4 (model.rope)")
    parser.add_argument("--method", help="ard (default) | cpt | logits_kd | hidden_cosine | ard+cpt (train.method)")
    parser.add_argument("--output", help="output folder: checkpoints, report, merged model (train.output_dir)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (tracking.uri)")
    parser.add_argument("--address", help="Ray address (ray.address); default: RAY_ADDRESS or a local Ray")
    parser.add_argument("--workers", help="Ray Train workers (ray.num_workers)")
    args, overrides = parser.parse_known_args(argv)
    for name, key in SHORTCUTS.items():
        value = getattr(args, name)
        if value is not None:
            overrides += [f"--{key}", value]
    cfg = RunConfig.from_yaml(args.config, overrides)
    cfg.train.output_dir = str(Path(cfg.train.output_dir).expanduser().resolve())
    cfg.tracking.uri = _absolute_sqlite(cfg.tracking.uri)
    from pipelines.data import check_source

    check_source(cfg.data.source)
    return cfg


def init_ray(cfg: RunConfig) -> None:
    """Join ``ray.address`` (or ``RAY_ADDRESS`` / a running local Ray); otherwise start a local Ray with enough
    logical CPUs for the workers plus the data and evaluation stages."""
    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        # The dashboard (on 127.0.0.1) also serves the state API that Ray Train's controller polls.
        ray.init(num_cpus=max(os.cpu_count() or 1, cfg.ray.num_workers + 2), include_dashboard=True)


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run the whole job for a validated config. Returns a summary (run id, model version, report)."""
    from pipelines import tracking
    from pipelines.data import training_blocks
    from pipelines.train import make_trainer

    output = Path(cfg.train.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(output / "config.yaml")
    init_ray(cfg)
    run_id = None
    if cfg.tracking.enabled:
        _make_sqlite_parent(cfg.tracking.uri)
        run_id = tracking.start_run(
            cfg.tracking.uri, cfg.tracking.experiment,
            run_name=cfg.tracking.run_name or f"restore-{output.name}",
            params=cfg.to_dict(),
            artifact_dir=_sqlite_artifact_dir(cfg.tracking.uri),
            tags={"teacher": cfg.model.teacher, "rope": cfg.model.rope},
        )
        tracking.log_artifacts([output / "config.yaml"])
    try:
        # One Ray Train run per stage (ard+cpt has two); each resumes on its own, the next starts from the
        # weights the last one ended with, and metrics continue the step count.
        start, steps, tokens, result = time.time(), 0, 0, None
        stages = cfg.stages()
        for stage in stages:
            if result is not None:
                stage.train.init_from = result.checkpoint.path
            suffix = f"-{stage.train.method}" if len(stages) > 1 else ""
            trainer = make_trainer(
                stage, {"train": training_blocks(stage)},
                run_name=f"train-{output.name}{suffix}",
                storage_path=_storage_path(cfg.ray.storage_path, output),
                tracking={"uri": cfg.tracking.uri, "run_id": run_id, "step_offset": steps} if run_id else None,
            )
            result = trainer.fit()
            done = int(result.metrics.get("step", 0))
            if done != stage.train.steps or result.checkpoint is None:
                raise RuntimeError(f"training stopped at step {done} of {stage.train.steps}")
            steps, tokens = steps + done, tokens + int(result.metrics.get("tokens", 0))
        run_info = {"method": cfg.train.method, "steps": steps, "tokens": tokens,
                    "train_seconds": round(time.time() - start, 1)}
        finish = ray.remote(_finish).options(num_cpus=1, num_gpus=1 if cfg.ray.use_gpu else 0)
        summary = ray.get(finish.remote(cfg.to_dict(), result.checkpoint, run_id, run_info))
    except BaseException:
        if run_id:
            tracking.end_run(success=False)
        raise
    if run_id:
        tracking.end_run(success=True)
    return {"run_id": run_id, "steps": steps, **summary}


def _finish(cfg_dict: dict[str, Any], checkpoint: Any, run_id: str | None, run_info: dict[str, Any]) -> dict:
    """Ray task: evaluate, merge, then (if tracked) log the report and register the model, in that order."""
    import mlflow

    from pipelines import tracking
    from pipelines.data import heldout_texts
    from pipelines.evaluate import evaluate_restore

    cfg = RunConfig.from_dict(cfg_dict)
    output = Path(cfg.train.output_dir)
    with checkpoint.as_directory() as directory:
        report = evaluate_restore(cfg, directory, heldout_texts(cfg), output, run_info)
    summary: dict[str, Any] = {"model_dir": str(output / "model"), "gap_recovery": report.get("gap_recovery"),
                               "short_ppl": report.get("short_ppl")}
    if run_id is None:
        return summary
    mlflow.set_tracking_uri(cfg.tracking.uri)
    mlflow.set_registry_uri(cfg.tracking.uri)
    with mlflow.start_run(run_id=run_id):
        tracking.log_artifacts([output / "report"], artifact_path="report")
        for name, value in (report.get("short_ppl") or {}).items():
            mlflow.log_metric(f"eval/short_ppl/{name}", value)
        for name, value in (report.get("long_ppl") or {}).items():
            mlflow.log_metric(f"eval/long_ppl/{name}", value)
        if report.get("gap_recovery") is not None:
            mlflow.log_metric("eval/gap_recovery", report["gap_recovery"])
        if cfg.tracking.registered_model_name:
            tags = {"teacher": cfg.model.teacher, "rope": cfg.model.rope, "trainable": cfg.model.trainable,
                    "method": run_info["method"], "tokens_seen": run_info["tokens"], "steps": run_info["steps"],
                    "run_id": run_id}
            version = tracking.log_and_register_model(output / "model", cfg.tracking.registered_model_name, tags)
            summary.update(registered_model=version.name, version=version.version)
    return summary


def main(argv: list[str] | None = None, prog: str = "linearard restore") -> int:
    """Entry point: one clear error line and a non-zero exit on bad input or a failed run."""
    start = time.time()
    try:
        cfg = parse_config(argv, prog)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg)
    except Exception as err:  # noqa: BLE001 - the traceback is in Ray's and MLflow's logs; the user gets one line
        print(f"{prog}: error: {error_line(err)}", file=sys.stderr)
        return 1
    report_md = Path(cfg.train.output_dir) / "report" / "report.md"
    if report_md.exists():
        print(report_md.read_text())
    registered = (f"registered {summary['registered_model']} version {summary['version']}"
                  if "version" in summary else "not registered")
    print(f"{prog}: done in {time.time() - start:.0f}s: {summary['steps']} steps, gap recovery "
          f"{summary.get('gap_recovery')}, model in {summary['model_dir']}, {registered}")
    return 0


def _storage_path(configured: str | None, output: Path) -> str:
    """Ray Train's storage: ``ray.storage_path`` (a URI such as ``s3://...`` as is) or ``<output>/ray``."""
    if configured and "://" in configured:
        return configured
    return str(Path(configured or output / "ray").expanduser().resolve())


def _absolute_sqlite(uri: str) -> str:
    """``sqlite:///relative.db`` -> an absolute path (so Ray tasks in other folders write the same store)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _make_sqlite_parent(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_artifact_dir(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]).parent / "mlartifacts" if uri.startswith("sqlite:///") else None


if __name__ == "__main__":
    sys.exit(main(prog="python -m pipelines.restore"))
