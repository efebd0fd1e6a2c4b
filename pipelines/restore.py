"""The main job: restore a long-context model with LinearARD on Ray, tracked in MLflow, ending in the registry.

``linearard restore`` (``pipelines.cli``) resolves the config into a plan on the driver and calls ``check``
(nothing starts on a bad one, in seconds), then ``run``:

    the plan's config.yaml written -> Ray started or joined (``pipelines.ray_runtime``) -> the MLflow run opened
    -> per stage: Ray Data streams blocks to Ray Train FSDP2 workers (``pipelines.train``: per-step metrics to
       MLflow, checkpoints through Ray Train, restarts on worker failure); a stage starts from the last one's
       weights
    -> one Ray task on a GPU (or CPU) evaluates teacher / extended / restored on held-out text, writes the report
       and the merged model (``linearard.evaluate.evaluate_restore``), logs them, and registers the model (the
       last step: a failed run registers nothing)
    -> the run closed.
"""

from __future__ import annotations

import time
from typing import Any

import ray
import ray.data

from linearard.data import heldout_texts
from linearard.evaluate import check_evaluation
from linearard.plan import Plan
from pipelines import ray_runtime, tracking


def check(plan: Plan) -> None:
    """What the driver can tell before anything starts, beyond the plan (``linearard.plan.resolve``): the local
    machine can host the workers, the tracking server answers, the evaluation can run on the held-out data.
    ``ConfigError`` (one line, naming the key) otherwise."""
    ray_runtime.check_resources(plan.config.ray)
    if plan.config.tracking.enabled:
        tracking.check_server(plan.config.tracking.uri)
    check_evaluation(plan)


def run(plan: Plan) -> dict[str, Any]:
    """Run the whole job for a resolved plan. Returns a summary (run id, steps, model version, report)."""
    from pipelines.data import training_blocks
    from pipelines.train import make_trainer

    cfg = plan.config
    plan.output.root.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(plan.output.config_file)
    ray_runtime.start(cfg.ray)
    # One bar in the console: the training steps' (rank 0's). Ray Data's per-operator bars of the streaming read
    # would interleave with it for the whole run.
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_id = tracking.open_run(plan) if cfg.tracking.enabled else None
    try:
        start, tokens, result = time.time(), 0, None
        for index, stage in enumerate(plan.stages):
            # One Ray Train run per stage (ard+cpt has two); each resumes on its own, the next starts from the
            # weights the last one ended with, and the metrics continue one step axis.
            dataset = training_blocks(stage.config, plan.models.tokenizer, plan.models.revision)
            trainer = make_trainer(plan, index, dataset, run_id=run_id,
                                   init_from=result.checkpoint.path if result is not None else None)
            result = trainer.fit()
            done = int(result.metrics.get("step", 0))
            if done != stage.config.train.steps or result.checkpoint is None:
                raise RuntimeError(f"training stopped at step {done} of {stage.config.train.steps}")
            tokens += int(result.metrics.get("tokens", 0))
        run_info = {"method": cfg.train.method, "steps": plan.steps, "tokens": tokens,
                    "train_seconds": round(time.time() - start, 1)}
        finish = ray.remote(_finish).options(num_cpus=1, num_gpus=1 if cfg.ray.use_gpu else 0)
        summary = ray.get(finish.remote(plan, result.checkpoint, run_id, run_info))
    except BaseException:
        if run_id:
            tracking.close_run(success=False)
        raise
    if run_id:
        tracking.close_run(success=True)
    return {"run_id": run_id, "steps": plan.steps, **summary}


def _finish(plan: Plan, checkpoint: Any, run_id: str | None, run_info: dict[str, Any]) -> dict[str, Any]:
    """Ray task: evaluate and merge, then (if tracked) log the report and register the model, in that order."""
    from linearard.evaluate import evaluate_restore

    data = plan.config.data
    texts = heldout_texts(data.source, data.text_field, data.eval_fraction)
    with checkpoint.as_directory() as directory:
        report = evaluate_restore(plan, directory, texts, run_info)
    summary: dict[str, Any] = {"model_dir": str(plan.output.model_dir), "report": report}
    if run_id is not None:
        tracking.log_evaluation(plan, run_id, report)
        if plan.config.tracking.registered_model_name:
            version = tracking.register_model(plan, run_id, run_info)
            summary.update(registered_model=version.name, version=version.version)
    return summary
