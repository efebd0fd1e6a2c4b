"""The main job: restore a long-context model with LinearARD on Ray, tracked in MLflow, ending in the registry.

``linearard restore`` (``pipelines.cli``) resolves the config into a plan on the driver and calls ``check``
(nothing starts on a bad one, in seconds), then ``run``:

    the output folder locked, its config checked -> the plan's config.yaml written -> the MLflow run opened (or
       the folder's unfinished run continued) -> Ray started or joined (``pipelines.ray_runtime``)
    -> per stage: Ray Data streams blocks to Ray Train FSDP2 workers (``pipelines.train``: per-step metrics to
       MLflow, checkpoints through Ray Train, restarts on worker failure); a stage starts from the last one's
       weights
    -> one Ray task on a GPU (or CPU) evaluates teacher / extended / restored on held-out text, writes the report
       and the merged model (``linearard.evaluate.evaluate_restore``), logs them, and registers the model if the
       evaluation is finite (the last step: a failed run registers nothing)
    -> the run closed (FAILED on any error, which is raised as its root cause, not as Ray's wrapper of it).

The output folder belongs to one run. A rerun into it resumes that run (from its last checkpoint, in the same
MLflow run) if its config is the same; another config is refused, and so is a second job while one holds the
folder (``own_output``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.data
import yaml

from linearard.config import ConfigError
from linearard.data import heldout_texts
from linearard.evaluate import check_evaluation
from linearard.plan import Plan
from pipelines import ray_runtime, tracking

LOCK_FILE = ".lock"  # in the output folder: held by the job that runs there
# What a rerun may change: how the job runs, not what it computes.
RERUN_FREE_KEYS = ("ray.address", "ray.max_failures", "train.progress_bar")


def check(plan: Plan) -> None:
    """What the driver can tell before anything starts, beyond the plan (``linearard.plan.resolve``): the local
    machine can host the workers, the tracking server answers, the evaluation can run on the held-out data.
    ``ConfigError`` (one line, naming the key) otherwise."""
    ray_runtime.check_resources(plan.config.ray)
    if plan.config.tracking.enabled:
        tracking.check_server(plan.config.tracking.uri)
    check_evaluation(plan)


def run(plan: Plan) -> dict[str, Any]:
    """Run the whole job for a resolved plan. Returns a summary (run id, steps, model version, report).

    Raises ``ConfigError`` if the output folder holds another run (another config, a finished run) or another
    job holds it; any other error is raised as its root cause (``ray_runtime.root_cause``)."""
    from pipelines.data import training_blocks
    from pipelines.train import train_stage

    cfg = plan.config
    with own_output(plan.output.root):
        check_rerun(plan)
        rerun = plan.output.config_file.is_file()
        cfg.to_yaml(plan.output.config_file)
        run_id = tracking.open_run(plan, restore=True, rerun=rerun) if cfg.tracking.enabled else None
        try:
            ray_runtime.start(cfg.ray)
            ray_runtime.warn_if_short(cfg.ray)
            # One bar in the console: the training steps' (rank 0's). Ray Data's per-operator bars of the
            # streaming read would interleave with it for the whole run.
            ray.data.DataContext.get_current().enable_progress_bars = False
            start, tokens, result = time.time(), 0, None
            for index, stage in enumerate(plan.stages):
                # One Ray Train run per stage (ard+cpt has two); each resumes on its own, the next starts from
                # the weights the last one ended with, and the metrics continue one step axis.
                dataset = training_blocks(stage.config, plan.models.tokenizer, plan.models.revision)
                result = train_stage(plan, index, dataset, run_id=run_id,
                                     init_from=result.checkpoint.path if result is not None else None)
                done = int(result.metrics.get("step", 0))
                if done != stage.config.train.steps or result.checkpoint is None:
                    raise RuntimeError(f"training stopped at step {done} of {stage.config.train.steps}")
                tokens += int(result.metrics.get("tokens", 0))
            run_info = {"method": cfg.train.method, "steps": plan.steps, "tokens": tokens,
                        "train_seconds": round(time.time() - start, 1)}
            finish = ray.remote(_finish).options(num_cpus=1, num_gpus=1 if cfg.ray.use_gpu else 0)
            summary = ray.get(finish.remote(plan, result.checkpoint, run_id, run_info))
        except BaseException as err:
            if run_id:
                tracking.close_run(success=False)
            raise ray_runtime.root_cause(err) from None
        if run_id:
            tracking.close_run(success=True)
    return {"run_id": run_id, "steps": plan.steps, **summary}


@contextlib.contextmanager
def own_output(root: Path) -> Iterator[None]:
    """Hold the output folder for this job: an exclusive ``flock`` on its ``LOCK_FILE``, which the OS releases
    when the process ends, however it ends. ``ConfigError`` if another job holds it (on this host: ``flock``
    does not reach across machines on every network filesystem)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ConfigError(f"--output {root} is in use by another job ({lock.read().strip() or 'unknown'}): "
                              "wait for it to end, or give another --output") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        yield


def check_rerun(plan: Plan) -> None:
    """A rerun into an output folder must have the config of the run there (``RERUN_FREE_KEYS`` aside): then it
    resumes that run; else ``ConfigError`` saying how to resume or start fresh."""
    if not plan.output.config_file.is_file():
        return
    saved = tracking.flatten(yaml.safe_load(plan.output.config_file.read_text()) or {})
    new = tracking.flatten(yaml.safe_load(plan.config.yaml_text()))
    changed = [key for key in sorted(saved.keys() | new.keys())
               if key not in RERUN_FREE_KEYS and saved.get(key) != new.get(key)]
    if changed:
        shown = ", ".join(f"{key} {saved.get(key)!r} -> {new.get(key)!r}" for key in changed[:3])
        raise ConfigError(f"--output {plan.output.root} holds a run with another config ({shown}"
                          f"{', ...' if len(changed) > 3 else ''}): rerun with its config to resume it, or give "
                          "another --output (or delete the folder) to start a new run")


def _finish(plan: Plan, checkpoint: Any, run_id: str | None, run_info: dict[str, Any]) -> dict[str, Any]:
    """Ray task: evaluate and merge, then (if tracked) log the report and, if the evaluation is finite, register
    the model, in that order."""
    from linearard.evaluate import evaluate_restore

    data = plan.config.data
    texts = heldout_texts(data.source, data.text_field, data.eval_fraction)
    with checkpoint.as_directory() as directory:
        report = evaluate_restore(plan, directory, texts, run_info)
    summary: dict[str, Any] = {"model_dir": str(plan.output.model_dir), "report": report}
    if run_id is not None:
        tracking.log_evaluation(plan, run_id, report)  # logged even when not finite: it shows what went wrong
    tracking.require_finite_evaluation(report)
    if run_id is not None and plan.config.tracking.registered_model_name:
        version = tracking.register_model(plan, run_id, run_info)
        summary.update(registered_model=version.name, version=version.version)
    return summary
