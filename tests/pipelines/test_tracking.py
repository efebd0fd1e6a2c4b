"""MLflow tracking: the server checked before a run starts (one line within seconds, not minutes of MLflow
retries); credentials in a tracking URI kept from MLflow's URI (which it prints and puts in its errors); step
metrics each logged once and never blocking training (also when the server dies); registration only on a finite
evaluation; Ray's error wrappers peeled off to the cause."""

from __future__ import annotations

import math
import os
import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from linearard.config import ConfigError
from pipelines.tracking import StepLogger, check_server, client_uri, require_finite_evaluation
from tests.conftest import running_mlflow_server


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_is_one_line_in_seconds():
    with socket.socket() as silent:  # listens on loopback and never answers: the check times out
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        cases = [(f"http://127.0.0.1:{_closed_port()}", "Connection refused"),
                 ("http://user:SECRET@no-such-host.invalid:5000",
                  "no MLflow server answers at http://***@no-such-host.invalid:5000"),
                 (f"http://127.0.0.1:{silent.getsockname()[1]}", "timed out")]
        for uri, words in cases:
            start = time.time()
            with pytest.raises(ConfigError) as err:
                check_server(uri, timeout=2.0)
            message = str(err.value)
            assert time.time() - start < 10 and message.startswith("tracking.uri: ") and words in message, message
            assert "SECRET" not in message and "\n" not in message


def test_a_server_or_a_local_store_passes(mlflow_server):
    check_server(mlflow_server)
    check_server(mlflow_server.replace("http://", "http://user:pw@"))  # /health needs no credentials
    check_server("sqlite:///outputs/mlflow.db")


def test_uri_credentials_go_to_mlflows_variables(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert client_uri("http://mlflow:5000") == "http://mlflow:5000" and "MLFLOW_TRACKING_USERNAME" not in os.environ
    assert client_uri("https://alice:p%40ss@mlflow.example/prefix") == "https://mlflow.example/prefix"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "p@ss")


def test_step_metrics_are_logged_once_and_never_wait_for_the_server(tmp_path, capfd):
    with running_mlflow_server(tmp_path) as (uri, stop):
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("steps")).info.run_id
        log = StepLogger(uri, run_id)
        for step in (1, 2, 3):
            log({"loss": 1.0 / step, "step": step}, step)
        log.close()
        # A resumed run re-trains steps 2-3 after its step-1 checkpoint: they are not logged again.
        log = StepLogger(uri, run_id)
        log.mark_resume(1)
        for step in (2, 3, 4, 5):
            log({"loss": 1.0 / step, "step": step}, step)
        log.close()
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "step")] == [
            (step, float(step)) for step in range(1, 6)]
        assert [m.value for m in client.get_metric_history(run_id, "resumed_from_step")] == [1.0]

        stop()  # the server dies mid-run: logging costs training nothing, and the end waits a bounded time
        log = StepLogger(uri, run_id, close_timeout=2)
        start = time.monotonic()
        for step in range(6, 1006):
            log({"loss": 0.5, "step": step}, step)
        assert time.monotonic() - start < 1.0
        log.close()
        assert time.monotonic() - start < 5.0
    assert "metrics were not logged to MLflow" in capfd.readouterr().err


def test_registration_needs_a_finite_evaluation():
    def report(restored_ppl: float) -> dict:
        return {"models": {"teacher": {"ppl": {"32": 3.0}, "passkey": {"32": 1.0}},
                           "restored": {"ppl": {"32": restored_ppl, "64": 2.5}, "passkey": {"32": 1.0}}}}

    require_finite_evaluation(report(3.1))
    for value in (math.nan, math.inf):
        with pytest.raises(ValueError, match=f"not finite \\(restored ppl at 32 tokens: {value}\\): not registered"):
            require_finite_evaluation(report(value))
    with pytest.raises(ValueError, match="the restored model was not evaluated"):
        require_finite_evaluation({"models": {"teacher": {"ppl": {"32": 3.0}}}})


def test_a_ray_task_error_is_its_cause(ray_driver):
    import ray

    from pipelines.ray_runtime import is_deterministic, root_cause

    @ray.remote(max_retries=0)
    def fails(kind: type) -> None:
        raise kind("the real error")

    for kind, deterministic in ((ValueError, True), (RuntimeError, False)):
        with pytest.raises(ray.exceptions.RayTaskError) as caught:
            ray.get(fails.remote(kind))
        cause = root_cause(caught.value)
        assert type(cause) is kind and str(cause) == "the real error"
        assert is_deterministic(caught.value) == deterministic


def test_a_deleted_output_folder_starts_a_new_run(mlflow_server, tiny_model, tmp_path):
    """A rerun into a folder that holds a finished run is refused, and the refusal says to delete the folder:
    once it is deleted, the next job opens a new MLflow run although MLflow remembers the folder's last one."""
    from pipelines.tracking import OUTPUT_TAG, close_run, open_run
    from tests.linearard.test_plan import plan_of_tiny_model

    plan = plan_of_tiny_model(tiny_model, ["--tracking.uri", mlflow_server, "--tracking.experiment", "deleted-output",
                                           "--train.output_dir", str(tmp_path / "out")])
    first = open_run(plan, restore=True)
    close_run(True)
    with pytest.raises(ConfigError, match=f"holds a finished run \\(MLflow run {first}\\).*delete the folder"):
        open_run(plan, restore=True, rerun=True)
    second = open_run(plan, restore=True, rerun=False)  # the folder deleted, then made anew
    close_run(True)
    assert second != first and MlflowClient(mlflow_server).get_run(second).data.tags[OUTPUT_TAG] == \
        str(tmp_path / "out")
