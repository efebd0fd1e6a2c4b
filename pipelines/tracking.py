"""MLflow: one run per restore job, per-step metrics, artifacts, and the restored model in the registry.

The driver opens the run (params = the whole config, the config file as an artifact); the rank-0 Ray Train
worker appends per-step metrics to that run by id (:class:`StepLogger`); when training and evaluation have
succeeded the driver logs the merged model (transformers flavour, with its tokenizer) and registers a new
version with tags. Registration is the very last step, so a failed or rejected run registers nothing.

The tracking URI is anything MLflow accepts: ``http://host:5000`` for a server, or the default local
``sqlite:///<output>/mlflow.db`` store (the registry needs a database backend) with artifacts in
``<output>/mlartifacts``.
"""

from __future__ import annotations

import time
from importlib.metadata import version
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

MODEL_ARTIFACT = "model"


def local_tracking_uri(output_dir: str | Path) -> str:
    """The default store: a sqlite database inside the run's output folder (works offline, has a registry)."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and ``None`` become strings (MLflow params are strings)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def start_run(
    tracking_uri: str,
    experiment: str,
    *,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    artifact_dir: str | Path | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Open (and make active) one MLflow run; log ``params`` flattened. Returns the run id.

    ``artifact_dir`` is where a new experiment keeps its artifacts when the store is a local database
    (a tracking server decides that itself).
    """
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = Path(artifact_dir).resolve().as_uri() if artifact_dir and _is_local(tracking_uri) else None
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_name=run_name, tags=dict(tags or {}))
    if params:
        flat = flatten(params)
        items = list(flat.items())
        for i in range(0, len(items), 100):  # log_params takes at most 100 per call
            mlflow.log_params(dict(items[i : i + 100]))
    return run.info.run_id


def end_run(success: bool) -> None:
    """Close the active run as FINISHED or FAILED."""
    mlflow.end_run(status="FINISHED" if success else "FAILED")


def log_artifacts(paths: list[str | Path], artifact_path: str | None = None) -> None:
    """Log files and folders (config, report, plots) to the active run; missing paths are skipped."""
    for p in map(Path, paths):
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=artifact_path)
        elif p.is_file():
            mlflow.log_artifact(str(p), artifact_path=artifact_path)


class StepLogger:
    """Appends per-step metrics to an existing run by id; used from the rank-0 training worker."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)


def log_and_register_model(
    model_dir: str | Path,
    registered_name: str,
    tags: Mapping[str, Any],
    task: str = "text-generation",
) -> Any:
    """Log the merged HF checkpoint in ``model_dir`` (transformers flavour, tokenizer included) to the active
    run and register it as a new version of ``registered_name`` with ``tags``. Returns the ``ModelVersion``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # MLflow's "log a checkpoint folder" path does not support transformers 5 (it reads the pipeline
    # registry's old layout), so the model is loaded once, in the dtype it was saved in.
    components = {
        "model": AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto"),
        "tokenizer": AutoTokenizer.from_pretrained(model_dir),
    }
    info = mlflow.transformers.log_model(
        transformers_model=components,
        name=MODEL_ARTIFACT,
        task=task,
        tags=_str_values(tags),
        # Pinned explicitly: MLflow's default list wants torchvision, which a text model does not need.
        pip_requirements=[f"{pkg}=={version(pkg)}" for pkg in ("transformers", "torch", "safetensors")],
    )
    return mlflow.register_model(info.model_uri, registered_name, tags=_str_values(tags))


def _str_values(tags: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in tags.items()}


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri
