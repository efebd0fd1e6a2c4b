"""The restore job end to end on a real local Ray (2 CPU workers, gloo, FSDP2) and a real MLflow server.

One job restores the tiny model while a worker dies once mid-run and then the driver is killed (the test
hooks); its rerun must resume from the last checkpoint in the same MLflow run, finish the planned steps, and
register a model that loads back from the registry with the scaled RoPE. The output folder belongs to that one
run (a second job and a changed config are refused). Bad input must fail fast with one error line, a run that
diverges stops at once, and neither registers anything. The end-to-end runs carry marker secrets (in the
tracking URI, or MLflow's and the hub's variables, and Ray's token) that must be found nowhere in the output
folder, the MLflow store or the job's output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 4


def restore_args(model: Path, corpus: Path, output: Path, uri: str, name: str, student: Path | None = None) -> list[str]:
    """A tiny restore: 2 workers, ctx 32, 4 steps of 2 blocks (2 micro-batches), checkpoints every 2 steps; the
    student is ``student`` (an extended checkpoint, its own RoPE) or the teacher's weights with RoPE linear ×4."""
    extended = ["--student", str(student)] if student else ["--student", "none", "--rope", "linear:4"]
    return ["--teacher", str(model), *extended, "--output", str(output), "--tracking-uri", uri,
            "--workers", "2", "--data.source", str(corpus), "--data.ctx_len", "32", "--data.mode", "packed",
            "--train.steps", str(STEPS), "--train.batch_size", "2", "--train.grad_accum", "2",
            "--train.checkpoint_every", "2", "--optim.warmup_steps", "1", "--optim.lr", "1e-3",
            "--lora.r", "4", "--lora.alpha", "8", "--eval.ctx_len", "32", "--eval.length_multipliers", "[1, 2]",
            "--eval.ppl_tokens", "128", "--eval.batch_size", "2", "--eval.passkey_trials", "1",
            "--tracking.registered_model_name", name]


def check_registered(uri: str, name: str, rope_factor: float) -> dict:
    """The newest version of ``name`` loads back from the registry with the scaled RoPE; returns its tags."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1
    version = versions[0]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    components = mlflow.transformers.load_model(f"models:/{name}/{version.version}", return_type="components")
    rope = components["model"].config.rope_parameters
    assert rope["rope_type"] == "linear" and rope["factor"] == rope_factor
    assert components["model"].config.max_position_embeddings == 64 * rope_factor
    assert components["tokenizer"].eos_token_id == 1
    return {**version.tags, "run_id": version.run_id}


def leaked(secrets: list[str], folders: list[Path], output: str) -> list[str]:
    """Where any of ``secrets`` shows: a file under ``folders`` (its bytes), or the job's ``output``."""
    found = [f"output: {s}" for s in secrets if s in output]
    for folder in folders:
        for path in (p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def registered_names(uri: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    return [m.name for m in MlflowClient(uri, registry_uri=uri).search_registered_models()]


def output_runs(uri: str, output: Path) -> list:
    """The MLflow runs of the restore job(s) in ``output``."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import OUTPUT_TAG

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("linearard")
    return client.search_runs([experiment.experiment_id], f"tags.`{OUTPUT_TAG}` = '{output}'")


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The command's error line: there is one, its message appears once in the output, and no Ray wrapper does."""
    output = proc.stdout + proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("linearard restore: error: ")]
    assert output.count(line.split(": ", 3)[-1]) == 1, output[-3000:]
    assert "WorkerGroupError" not in output and "RayTaskError" not in output, output[-3000:]
    return line


def test_a_killed_job_resumes_in_its_output_folder(ray_cluster, mlflow_server, mlflow_root, tiny_model, word_corpus,
                                                  tmp_path):
    """A worker dies after step 3 (the driver restarts the workers from the step-2 checkpoint), then the driver
    is killed after step 4, before its checkpoint. Meanwhile a second job on the output is refused; afterwards a
    rerun with another config is refused, and Ray Train's checkpoint record is damaged (0 bytes, as a full disk
    leaves it). The rerun with the same config resumes from the step-2 checkpoint, continues the killed job's
    MLflow run with each step logged once, and registers the model; one more rerun is refused. The tracking URI
    carries a password that must reach nothing saved, logged or printed (the user name is no secret: MLflow
    records it as the run's user, as an authenticating server would)."""
    from mlflow.tracking import MlflowClient

    from pipelines.train import SNAPSHOT_FILE

    name, out = "tiny-restored-local", tmp_path / "out"
    uri_with_secret = mlflow_server.replace("http://", "http://marker-user:MARKER-URI-PASSWORD@")
    command = [sys.executable, "-m", "pipelines.cli", "restore",
               *restore_args(tiny_model("llama"), word_corpus, out, uri_with_secret, name), "--ray.max_failures", "1"]
    hooks = {"LINEARARD_FAIL_ONCE_AT_STEP": "3", "LINEARARD_KILL_DRIVER_AT_STEP": "4"}
    first = subprocess.Popen(command, cwd=REPO, env={**os.environ, **hooks}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / ".lock").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"is in use by another job (pid {first.pid} on" in second.stderr
        _, stderr = first.communicate(timeout=420)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL, stderr[-3000:]
    assert "restarting from the last checkpoint (retry 1 of 1)" in stderr

    changed = subprocess.run([*command, "--lora.r", "8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1, changed.stderr
    assert "another config (lora.r 4 -> 8): rerun with its config to resume it, or give another --output" in \
        changed.stderr
    record = out / "ray" / "train-out" / SNAPSHOT_FILE
    record.write_bytes(b"")

    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{STEPS} steps" in proc.stdout and f"registered {name} version 1" in proc.stdout
    assert f"checkpoint record {record} is damaged" in proc.stderr
    assert "linearard restore: llama: 2 of 2 layers distilled; targets q_proj, k_proj, v_proj" in proc.stdout
    printed = stderr + second.stdout + second.stderr + changed.stdout + changed.stderr + proc.stdout + proc.stderr
    assert not leaked(["MARKER-URI-PASSWORD", ray_cluster["token"]], [out, mlflow_root], printed)

    tags = check_registered(mlflow_server, name, 4.0)
    assert tags["teacher"] == str(tiny_model("llama")) and tags["rope"] == "linear:4"
    assert int(tags["tokens_seen"]) == STEPS * 2 * 2 * 32  # steps x blocks per worker x workers x ctx_len
    (run,) = output_runs(mlflow_server, out)  # the killed job's run, continued and closed
    assert run.info.run_id == tags["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(STEPS)
    client = MlflowClient(mlflow_server)
    # Each step once, although steps 3 and 4 were trained three and two times
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "step")] == [
        (step, float(step)) for step in range(1, STEPS + 1)]
    # Both restarts (the workers', the killed driver's) resumed from the step-2 checkpoint, not from scratch
    assert [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")] == [2.0, 2.0]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.json", "report/ppl_vs_length.png"} <= artifacts
    assert {"eval/teacher/ppl_32", "eval/extended/ppl_64", "eval/restored/passkey_32",
            "eval/restored_vs/ppl_n_over_teacher"} <= set(run.data.metrics)
    checkpoints = sorted(p.name for p in (out / "ray").glob("*/step-*"))
    assert checkpoints == ["step-00000002", f"step-{STEPS:08d}"]
    assert (out / "model" / "model.safetensors").exists()

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)  # its model is registered
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert f"holds a finished run (MLflow run {run.info.run_id})" in again.stderr


def test_a_diverging_run_stops_at_once_and_registers_nothing(ray_cluster, mlflow_server, tiny_model, word_corpus,
                                                              tmp_path):
    """A non-finite loss stops the run at its step, as one line without Ray's wrappers, not retried although
    retries are allowed; the MLflow run is FAILED and nothing is registered."""
    name = "never-diverged"
    args = restore_args(tiny_model("llama"), word_corpus, tmp_path / "out", mlflow_server, name)
    args += ["--workers", "1", "--optim.lr", "1e30", "--optim.warmup_steps", "0", "--ray.max_failures", "2"]
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "restore", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error_line(proc)
    assert "NonFiniteError: training diverged at step 2: loss" in line
    assert "restarting" not in proc.stderr
    (run,) = output_runs(mlflow_server, tmp_path / "out")
    assert run.info.status == "FAILED" and "resumed_from_step" not in run.data.metrics
    assert name not in registered_names(mlflow_server)


def test_ard_then_cpt_restores_a_student_checkpoint_in_two_stages(ray_cluster, mlflow_server, mlflow_root,
                                                                  tiny_model, tiny_extended, word_corpus, tmp_path):
    """The extended-model scenario: the student is its own checkpoint (RoPE in its config); two stages on one
    step axis; the registered model is that long-context model restored."""
    from mlflow.tracking import MlflowClient

    name = "tiny-ard-cpt"
    args = restore_args(tiny_model("llama"), word_corpus, tmp_path / "out", mlflow_server, name, tiny_extended)
    args += ["--workers", "1", "--train.method", "ard+cpt", "--train.cpt_steps", "1", "--train.batch_size", "4",
             "--train.grad_accum", "1", "--train.checkpoint_every", "0"]
    secrets = {"HF_TOKEN": "hf_MARKERHUBTOKEN", "MLFLOW_TRACKING_USERNAME": "marker-mlflow-user",
               "MLFLOW_TRACKING_PASSWORD": "MARKER-MLFLOW-PASSWORD"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "restore", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=420, env={**os.environ, **secrets})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not leaked([secrets["HF_TOKEN"], secrets["MLFLOW_TRACKING_PASSWORD"], ray_cluster["token"]],
                      [tmp_path / "out", mlflow_root], proc.stdout + proc.stderr)
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    # 3 ARD steps of 4 x 32 tokens, then 1 CPT step of 1 x 128 (4n) tokens, the CPT stage from the ARD weights
    run = report["run"]
    assert run["method"] == "ard+cpt" and run["steps"] == STEPS and run["tokens"] == 3 * 4 * 32 + 128
    assert sorted(p.parent.name for p in (tmp_path / "out" / "ray").glob("*/step-*")) == [
        "train-out-ard", "train-out-cpt"]
    cpt_checkpoint = next((tmp_path / "out" / "ray").glob("train-out-cpt/step-*"))
    assert yaml.safe_load((cpt_checkpoint / "config.yaml").read_text())["loss"]["lm"] == 1.0
    assert torch.load(cpt_checkpoint / "trainer.pt", weights_only=True)["init_from"].endswith("step-00000003")
    tags = check_registered(mlflow_server, name, 4.0)
    assert tags["student"] == str(tiny_extended) and tags["rope"].startswith("linear:4")
    assert set(report["models"]) == {"teacher", "extended", "restored"} and report["run"]["student"] == str(tiny_extended)
    client = MlflowClient(mlflow_server)
    assert [int(m.step) for m in client.get_metric_history(tags["run_id"], "ard_q")] == [1, 2, 3]
    assert [int(m.step) for m in client.get_metric_history(tags["run_id"], "lm")] == [4]


def runs_of(uri: str, output: Path) -> list:
    """The MLflow runs a restore into ``output`` opened."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("linearard")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"params.`train.output_dir` = '{output}'")


# case -> (what the command line adds, what the one error line must name). A few representatives of each kind of
# check before Ray starts (the rest are tested on RunConfig / resolve / check_evaluation / pipelines.restore.check).
BAD_INPUT = {
    "bad_key": ([], "stepz"),
    "bad_value": ([], "loss.q"),
    "missing_model": (["--teacher", "{tmp}/no-such-model"], "no-such-model"),
    "missing_data": (["--data.source", "{tmp}/no-such-corpus.jsonl"], "no-such-corpus"),
    "truncated_weights": (["--teacher", "{tmp}/truncated"], "model.teacher: cannot read the weights"),
    "null_text": (["--data.source", "{tmp}/null.jsonl"], "data.source: cannot read"),
    "too_many_workers": (["--workers", "1000"], "ray.num_workers: 1000 workers"),
    "no_tracking_server": (["--tracking-uri", "http://user:SECRET@127.0.0.1:9"],
                           "tracking.uri: no MLflow server answers at http://***@127.0.0.1:9"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_with_one_line(mlflow_server, tiny_model, word_corpus, tmp_path, case):
    """Exit 2 in seconds with one line naming the cause: before Ray starts, nothing written, no MLflow run."""
    import shutil
    import time

    name = f"never-{case}"
    args = restore_args(tiny_model("llama"), word_corpus, tmp_path / "out", mlflow_server, name)
    config = tmp_path / "run.yaml"
    config.write_text({"bad_key": "train:\n  stepz: 3\n", "bad_value": "loss:\n  q: -1\n"}.get(case, "{}\n"))
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model("llama"), truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:1000])
    (tmp_path / "null.jsonl").write_text('{"text": null}\n')
    extra, expected = BAD_INPUT[case]
    start = time.time()
    proc = subprocess.run([str(BIN / "linearard"), "restore", "--config", str(config), *args,
                           *(arg.format(tmp=tmp_path) for arg in extra)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("linearard restore: error: "), proc.stderr
    assert expected in lines[0] and "SECRET" not in proc.stderr + proc.stdout, lines[0]
    assert time.time() - start < 60  # seconds (imports included), not a Ray start and a worker's failure
    assert name not in registered_names(mlflow_server) and not runs_of(mlflow_server, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_usage():
    proc = subprocess.run([str(BIN / "linearard"), "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr
    proc = subprocess.run([str(BIN / "linearard"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "restore" in proc.stdout and "evaluate" in proc.stdout
    # The shortcut's help names every method and the config's default (it once named a default it no longer had)
    proc = subprocess.run([str(BIN / "linearard"), "restore", "--help"], capture_output=True, text=True)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "logits_kd | ard | cpt | hidden_cosine | ard+cpt (default: logits_kd)" in text


@pytest.mark.parametrize("path", sorted((REPO / "cluster" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_cluster_run_configs_follow_the_recipe(path):
    from linearard.config import RunConfig

    cfg = RunConfig.from_yaml(path)  # the schema only: no hub access here
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (1024, 2048.0, ["q_proj", "k_proj", "v_proj"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio) == (2e-5, 4, 0.9)
    assert (cfg.train.steps, cfg.data.ctx_len, cfg.ray.num_workers, cfg.ray.use_gpu) == (144, 4096, 2, True)
    assert cfg.train.batch_size // cfg.train.grad_accum == 1 and cfg.train.grad_accum == 2
    assert "pg19" in cfg.data.source and cfg.ray.max_failures > 0
    assert cfg.model.rope == {"llama2": "linear:8"}.get(path.stem.split("-")[0], "linear:4")


def test_method_flag_is_the_train_method_key(tiny_model, tmp_path):
    from pipelines.cli import parse_plan

    plan, _ = parse_plan(["--teacher", str(tiny_model("llama")), "--student", "none", "--data.ctx_len", "32",
                          "--rope", "linear:4", "--method", "cpt",
                          "--output", str(tmp_path / "out")])
    (stage,) = plan.stages
    assert stage.method == "cpt" and stage.config.loss.lm == 1.0 and stage.config.data.ctx_len == 128
