"""The tracking server checked before a run starts (one line within seconds, not minutes of MLflow retries), and
credentials in a tracking URI kept from MLflow's URI (which it prints and puts in its errors)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from linearard.config import ConfigError
from pipelines.tracking import check_server, client_uri


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri, words", [
    (f"http://127.0.0.1:{_closed_port()}", "Connection refused"),
    ("http://user:SECRET@no-such-host.invalid:5000", "no MLflow server answers at http://***@no-such-host.invalid:5000"),
    ("http://10.255.255.1:5000", "no MLflow server answers at"),  # unroutable: no answer, refused or timed out
])
def test_no_server_is_one_line_in_seconds(uri, words):
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
