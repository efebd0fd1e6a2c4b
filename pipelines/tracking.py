"""MLflow, every call of it: one run per restore job, per-step metrics, the evaluation, and the registry.

The driver opens the run (params = the whole config, config.yaml as an artifact, ``open_run``), or continues
the unfinished run of the same output folder (a rerun of a killed job: tag ``OUTPUT_TAG``); the rank-0 Ray
Train worker appends per-step metrics to it by id, off the training's critical path and each step once
(``StepLogger``); the evaluation task logs the report and its numbers (``log_evaluation``) and, last, logs the
merged model (transformers flavour, with its tokenizer) and registers a new version with tags
(``register_model``), only for a finite evaluation. Registration is the very last step, so a failed or
rejected run registers nothing. The driver closes the run (``close_run``).

The tracking URI is anything MLflow accepts: ``http://host:5000`` for a server, or a local
``sqlite:///<path>/mlflow.db`` store (the registry needs a database backend), whose artifacts then go to
``<path>/mlartifacts``. A server's credentials come from MLflow's variables (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``) or the URI (``http://user:pw@host``); MLflow only ever sees the URI without them
(``client_uri``), so nothing it prints, raises or stores carries them, and the params hold the config redacted.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
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
OUTPUT_TAG = "linearard.output_dir"  # the restore run's output folder: a rerun into it continues the run


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


def open_run(plan: Plan, restore: bool = False, rerun: bool = False) -> str:
    """Open the job's MLflow run: params = the whole config, the config file as an artifact. Returns its id.

    The restore job's run (``restore``) is tagged with its output folder. A rerun into a folder that holds a run
    (``rerun``) continues the folder's last run if it did not finish (a killed job), or raises ``ConfigError`` if
    it did; a folder made anew (none, or deleted since) starts a new run, whatever MLflow remembers of it."""
    cfg = plan.config
    uri = cfg.tracking.uri
    _use(uri)
    if uri.startswith(SQLITE):
        Path(uri[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        location = None
        if uri.startswith(SQLITE):  # a tracking server decides where artifacts go itself
            location = (Path(uri[len(SQLITE):]).parent / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.tracking.experiment)
    earlier = _output_run(experiment.experiment_id, plan.output.root) if rerun and experiment else None
    if earlier is not None:
        if earlier.info.status == "FINISHED":
            raise ConfigError(f"--output {plan.output.root} holds a finished run (MLflow run {earlier.info.run_id}):"
                              " give another --output, or delete the folder, to start a new one")
        return mlflow.start_run(run_id=earlier.info.run_id).info.run_id  # RUNNING again, until closed
    run = mlflow.start_run(run_name=cfg.tracking.run_name or f"restore-{plan.output.root.name}",
                           tags={"teacher": plan.models.teacher, "rope": plan.models.rope,
                                 **({OUTPUT_TAG: str(plan.output.root)} if restore else {})})
    items = list(flatten(cfg.to_dict()).items())
    for i in range(0, len(items), 100):  # log_params takes at most 100 per call
        mlflow.log_params(dict(items[i:i + 100]))
    if plan.output.config_file.is_file():
        mlflow.log_artifact(str(plan.output.config_file))
    return run.info.run_id


def _output_run(experiment_id: str, root: Path) -> Any:
    """The newest restore run of the output folder ``root``, or None."""
    runs = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`{OUTPUT_TAG}` = '{root}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def close_run(success: bool) -> None:
    """Close the active run as FINISHED or FAILED. Closing a failed run never raises (a tracking server that
    is gone must not hide why the run failed): it warns instead."""
    if success:
        mlflow.end_run(status="FINISHED")
        return
    try:
        mlflow.end_run(status="FAILED")
    except Exception as err:  # noqa: BLE001 - the run's own error is the one to report
        print(f"linearard: could not mark the MLflow run FAILED ({type(err).__name__})", file=sys.stderr)


class StepLogger:
    """Appends per-step metrics to an existing run by id; used from the rank-0 training worker.

    Never on the training's critical path: a call only queues the metrics, a background thread sends them
    (MLflow's client retries a failing request itself). A tracking server that is slow or gone costs training
    nothing: metrics beyond ``max_pending`` waiting steps are dropped, and ``close`` waits for the queue at
    most ``close_timeout`` seconds, then warns about what was not sent.

    Each step is logged once: steps the run already has (its ``step`` metric) are skipped. A resumed run
    re-trains the steps after its last checkpoint, and resume is exact, so their values are those already
    logged. (A step that was trained but not yet sent when a run was killed stays missing.)
    """

    def __init__(self, tracking_uri: str, run_id: str, max_pending: int = 1000, close_timeout: float = 30.0):
        self.client, self.run_id = MlflowClient(client_uri(tracking_uri)), run_id
        self.close_timeout = close_timeout
        self.pending: queue.Queue = queue.Queue(max_pending)
        self.dropped, self.failed = 0, 0
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._send_all, name="mlflow-step-logger", daemon=True)
        self.thread.start()

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue one step's metrics (those the run has not logged at ``step`` yet)."""
        self._queue(dict(metrics), step, once=True)

    def mark_resume(self, step: int) -> None:
        """Queue ``resumed_from_step`` = ``step``: a restart from the checkpoint of ``step`` shows in the run."""
        self._queue({"resumed_from_step": step}, step, once=False)

    def close(self) -> None:
        """Send what is queued, waiting at most ``close_timeout`` seconds; warn about what was not sent."""
        self.closing.set()
        self.thread.join(self.close_timeout)
        lost = self.dropped + self.failed + self.pending.qsize()
        if lost:
            print(f"linearard: {lost} steps' metrics were not logged to MLflow (the tracking server was slow or "
                  "unreachable)", file=sys.stderr, flush=True)

    def _queue(self, metrics: dict[str, float], step: int, once: bool) -> None:
        try:
            self.pending.put_nowait((metrics, step, once))
        except queue.Full:
            self.dropped += 1

    def _send_all(self) -> None:
        try:
            logged = self.client.get_run(self.run_id).data.metrics.get("step", 0)  # the run's last logged step
        except Exception:  # noqa: BLE001 - unreachable: send everything, as to a new run
            logged = 0
        while not (self.closing.is_set() and self.pending.empty()):
            try:
                metrics, step, once = self.pending.get(timeout=0.1)
            except queue.Empty:
                continue
            if once and step <= logged:
                continue
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception:  # noqa: BLE001 - best effort: counted and reported by close()
                self.failed += 1


def require_finite_evaluation(report: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless the report measured the restored model and every number in it is finite: a
    model is registered only on a finite evaluation."""
    restored = report.get("models", {}).get("restored", {})
    if not restored.get("ppl"):
        raise ValueError("the restored model was not evaluated: not registered")
    for name, result in report["models"].items():
        for metric in ("ppl", "passkey"):
            for length, value in result.get(metric, {}).items():
                if not math.isfinite(value):
                    raise ValueError(f"the evaluation is not finite ({name} {metric} at {length} tokens: {value}): "
                                     "not registered")


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
