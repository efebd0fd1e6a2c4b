"""Shared test fixtures."""

from __future__ import annotations

import os
import secrets

import torch

# Triton reads TRITON_INTERPRET when its kernels are first compiled: set it before any test imports the op,
# so that without a GPU the Triton backend's numerics are checked on CPU tensors by the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never download: set before any test module imports huggingface_hub / datasets (via transformers or
# lm-eval), which read these once, so a stray hub call fails at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Ray token authentication for the whole session, set before any test module imports Ray: a process reads its
# auth mode once, so a module that imports Ray at collection would otherwise talk to the token-auth head of
# `ray_cluster` (and start any private local Ray) without a token. The token is what `ray get-auth-token
# --generate` makes.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import contextlib
from pathlib import Path

import pytest

# ------------------------------------------------------------------------------ tiny random models (model side)
# family -> (config class name, extra kwargs). All have GQA (4 query heads over 2 KV heads) and 2 layers.
TINY_FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {"use_sliding_window": False}),
}
TINY_VOCAB = 64
TINY_WINDOW = 64  # native max_position_embeddings


def build_tiny_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a random tiny causal LM of ``family`` (GQA, 2 layers, window 64) with a word-level tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, extra = TINY_FAMILIES[family]
    config = getattr(transformers, class_name)(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=TINY_WINDOW, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra)
    torch.manual_seed(seed)
    return save_random_model(AutoModelForCausalLM.from_config(config), out_dir)


def save_random_model(model, out_dir: Path) -> Path:
    """Save ``model`` with its weights widened (std 0.3) and a word-level tokenizer (words ``w2``..``w63``, ``<eos>``
    = 1) beside it. The default init is tiny (std 0.02): widened, attention maps are far from uniform."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    model.save_pretrained(out_dir)
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, TINY_VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                            pad_token="<eos>").save_pretrained(out_dir)
    return Path(out_dir)


def train_steps(objective, teacher, student, batch, steps: int = 6, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps of ``objective`` (attached) on one batch; the losses before each step."""
    import torch

    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = objective(teacher, student, batch)
        loss.backward()
        objective.release()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def perturb_lora(model) -> None:
    """Make a fresh LoRA model's adapters non-trivial, as after training (``lora_B`` starts at zero)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def plan_for(model_path: Path, **sections):
    """A resolved plan for a tiny model: ``sections`` are config sections as dicts (``model={"rope": "yarn:4"}``);
    blocks default to 16 tokens."""
    from linearard.config import RunConfig
    from linearard.plan import resolve

    data = {name: dict(values) for name, values in sections.items()}
    data.setdefault("model", {}).setdefault("teacher", str(model_path))
    data["model"].setdefault("student", None)  # the teacher's weights, extended by model.rope
    data["model"].setdefault("rope", "linear:4")
    data.setdefault("data", {}).setdefault("ctx_len", 16)
    return resolve(RunConfig.from_dict(data))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(family="llama") -> Path`` of a saved random tiny model (built once per session)."""
    built: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_extended(tiny_model, tmp_path_factory):
    """A long-context model made from the tiny llama, as users bring one: its config says RoPE linear ×4 (window
    256), and continual pre-training changed some of its weights (layer 0's MLP and q_proj here); the rest is
    still the teacher's. Returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(teacher)
    model.config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    model.config.max_position_embeddings = 4 * TINY_WINDOW
    torch.manual_seed(1)
    with torch.no_grad():
        layer = model.model.layers[0]
        for weight in (layer.mlp.up_proj.weight, layer.self_attn.q_proj.weight):
            weight.add_(0.05 * torch.randn_like(weight))
    out = tmp_path_factory.mktemp("tiny-llama-4x")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return out


# ------------------------------------------------------------------ pipelines: a local Ray head and an MLflow server
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2):
                return
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(f"nothing answered at {url} within {timeout:.0f}s") from None
            time.sleep(0.5)


def _stop_group(process) -> None:
    """Stop a process we started (and only its own process group)."""
    import os
    import signal
    import subprocess

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_job_agent(dashboard: str, timeout: float = 120) -> None:
    """The dashboard answers before its job agent is up: wait until a trivial job is accepted and succeeds."""
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    deadline = time.time() + timeout
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError:
            if time.time() > deadline:
                raise
            time.sleep(1)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            raise TimeoutError("the Ray job agent did not run a trivial job")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray head with token authentication, shared by the session (`ray start --head --block`).

    The token is the session's (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, set when this file is imported). For the
    session, os.environ also gets RAY_ADDRESS, so drivers (`ray.init()`, `python -m pipelines.restore`,
    `ray job submit`) join this cluster. Yields ``{"address", "dashboard", "token"}``; the head and everything it
    started are stopped at the end.
    """
    import os
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    token = os.environ["RAY_AUTH_TOKEN"]
    port, dashboard_port = _free_port(), _free_port()
    env_updates = {
        "RAY_ADDRESS": f"127.0.0.1:{port}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # the job driver finds `linearard`, `python`
    }
    saved = {k: os.environ.get(k) for k in env_updates}
    os.environ.update(env_updates)
    temp_dir = Path(f"/tmp/lard-ray-{os.getpid()}")  # short: Ray's unix sockets live under it
    log = open(tmp_path_factory.mktemp("ray-log") / "head.log", "w")
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=6",
         "--object-store-memory=400000000", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # Ports that default to fixed numbers: free ones, so another Ray on this machine cannot collide.
         *(f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "runtime-env-agent-port", "metrics-export-port",
                                                   "ray-client-server-port"))],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})  # stop at once at the end (no Serve)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_http(f"{dashboard}/api/version", 120, {"Authorization": f"Bearer {token}"})
        _wait_job_agent(dashboard)
        yield {"address": env_updates["RAY_ADDRESS"], "dashboard": dashboard, "token": token}
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _stop_group(head)
        log.close()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def ray_driver(ray_cluster):
    """This test process connected to the session's Ray cluster as a driver."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], logging_level="WARNING", log_to_driver=False)
    return ray_cluster


@contextlib.contextmanager
def running_mlflow_server(root: Path):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend in ``root`` (so the Model Registry works) and
    served artifacts. Yields ``(uri, stop)``: ``stop()`` stops it early (a server that dies mid-run)."""
    import os
    import subprocess
    import sys

    port = _free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # No background job runner (a pool of huey consumers we do not use, on a 2-core machine).
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", 120)
        yield uri, lambda: _stop_group(server)
    finally:
        _stop_group(server)
        log.close()


@pytest.fixture(scope="session")
def mlflow_root(tmp_path_factory) -> Path:
    """The folder of the session's MLflow server: its store (mlflow.db), artifacts and log."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="session")
def mlflow_server(mlflow_root):
    """A real MLflow server (``running_mlflow_server``, in ``mlflow_root``) shared by the session. Yields its
    tracking URI."""
    with running_mlflow_server(mlflow_root) as (uri, _):
        yield uri


@pytest.fixture(scope="session")
def word_corpus(tmp_path_factory) -> Path:
    """A jsonl corpus in the `tiny_model` tokenizer's words (40 documents of 40-200 words, seeded)."""
    import json
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("word-corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for _ in range(40):
            words = [f"w{rng.randint(2, TINY_VOCAB - 1)}" for _ in range(rng.randint(40, 200))]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path
