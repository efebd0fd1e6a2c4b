"""MLflow, every call of it: one run per restore job, per-step metrics, the evaluation, and the registry.

The driver opens the run (params = the whole config, config.yaml as an artifact, ``open_run``); the rank-0
Ray Train worker appends per-step metrics to it by id (``StepLogger``); the evaluation task logs the report and
its numbers (``log_evaluation``) and, last, logs the merged model (transformers flavour, with its tokenizer) and
registers a new version with tags (``register_model``). Registration is the very last step, so a failed or
rejected run registers nothing. The driver closes the run (``close_run``).

The tracking URI is anything MLflow accepts: ``http://host:5000`` for a server, or a local
``sqlite:///<path>/mlflow.db`` store (the registry needs a database backend), whose artifacts then go to
``<path>/mlartifacts``. A server's credentials come from MLflow's variables (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``) or the URI (``http://user:pw@host``); MLflow only ever sees the URI without them
(``client_uri``), so nothing it prints, raises or stores carries them, and the params hold the config redacted.
"""

from __future__ import annotations

import os
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from linearard.config import ConfigError, redact
from linearard.plan import SQLITE, Plan
from linearard.report import judge

MODEL_ARTIFACT = "model"


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


def client_uri(uri: str) -> str:
    """The tracking URI as MLflow is given it: credentials written in it move to MLflow's own variables
    (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``) of this process, which it sends from."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password or "")
    return _without_credentials(parts)


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise ``ConfigError`` within about ``timeout`` seconds when no MLflow server answers the health check of an
    http(s) tracking URI (MLflow's own client retries for minutes). Other URIs name a local store."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    health = _without_credentials(parts).rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout):  # unauthenticated, also on a basic-auth server
            pass
    except (OSError, ValueError) as err:  # refused, unresolvable, timed out, or an HTTP error status
        reason = getattr(err, "reason", None) or err
        raise ConfigError(f"tracking.uri: no MLflow server answers at {redact(uri)} ({reason}): start it, or "
                          "give a local store such as sqlite:///outputs/mlflow.db") from None


def open_run(plan: Plan) -> str:
    """Open the job's MLflow run: params = the whole config, the config file as an artifact. Returns its id."""
    cfg = plan.config
    uri = cfg.tracking.uri
    _use(uri)
    if uri.startswith(SQLITE):
        Path(uri[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        location = None
        if uri.startswith(SQLITE):  # a tracking server decides where artifacts go itself
            location = (Path(uri[len(SQLITE):]).parent / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.tracking.experiment)
    run = mlflow.start_run(run_name=cfg.tracking.run_name or f"restore-{plan.output.root.name}",
                           tags={"teacher": plan.models.teacher, "rope": plan.models.rope})
    items = list(flatten(cfg.to_dict()).items())
    for i in range(0, len(items), 100):  # log_params takes at most 100 per call
        mlflow.log_params(dict(items[i:i + 100]))
    if plan.output.config_file.is_file():
        mlflow.log_artifact(str(plan.output.config_file))
    return run.info.run_id


def close_run(success: bool) -> None:
    """Close the active run as FINISHED or FAILED."""
    mlflow.end_run(status="FINISHED" if success else "FAILED")


class StepLogger:
    """Appends per-step metrics to an existing run by id; used from the rank-0 training worker."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client, self.run_id = MlflowClient(client_uri(tracking_uri)), run_id

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)


def log_evaluation(plan: Plan, run_id: str, report: Mapping[str, Any]) -> None:
    """Log the report folder and its numbers to the run: ``eval/<model>/ppl_<length>``,
    ``eval/<model>/passkey_<length>`` and ``eval/restored_vs/<ratio>`` (``linearard.report.judge``)."""
    metrics = {}
    for name, result in report["models"].items():
        for metric in ("ppl", "passkey"):
            for length, value in result.get(metric, {}).items():
                metrics[f"eval/{name}/{metric}_{length}"] = value
    if "restored" in report["models"]:
        metrics.update({f"eval/restored_vs/{k}": v for k, v in judge(report).items() if v is not None})
    # By id through the client: the run may be the active run of this very process (``linearard evaluate``).
    client = MlflowClient(client_uri(plan.config.tracking.uri))
    client.log_artifacts(run_id, str(plan.output.report_dir), artifact_path="report")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def register_model(plan: Plan, run_id: str, run: Mapping[str, Any]) -> Any:
    """Log the merged model in ``plan.output.model_dir`` (transformers flavour, tokenizer included) to the run
    and register it as a new version of ``tracking.registered_model_name`` with tags. Returns the
    ``ModelVersion``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = plan.config
    _use(cfg.tracking.uri)
    tags = {"teacher": plan.models.teacher, "student": plan.models.student, "rope": plan.models.rope,
            "trainable": plan.models.trainable,
            "method": run["method"], "tokens_seen": run["tokens"], "steps": run["steps"], "run_id": run_id}
    tags = {k: str(v) for k, v in tags.items()}
    # MLflow's "log a checkpoint folder" path does not support transformers 5 (it reads the pipeline
    # registry's old layout), so the model is loaded once, in the dtype it was saved in.
    components = {"model": AutoModelForCausalLM.from_pretrained(plan.output.model_dir, dtype="auto"),
                  "tokenizer": AutoTokenizer.from_pretrained(plan.output.model_dir)}
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model=components, name=MODEL_ARTIFACT, task="text-generation", tags=tags,
            # Pinned explicitly: MLflow's default list wants torchvision, which a text model does not need.
            pip_requirements=[f"{pkg}=={version(pkg)}" for pkg in ("transformers", "torch", "safetensors")])
        return mlflow.register_model(info.model_uri, cfg.tracking.registered_model_name, tags=tags)


def _without_credentials(parts: urllib.parse.SplitResult) -> str:
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _use(uri: str) -> None:
    uri = client_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
