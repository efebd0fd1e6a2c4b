"""``linearard evaluate``: any teacher / extended / restored models side by side, in one process (no Ray), the
report as the restore job writes it, logged to MLflow only when a tracking URI is given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
EVAL = ["--data.ctx_len", "32", "--eval.ctx_len", "32", "--eval.length_multipliers", "[1, 4]", "--eval.ppl_tokens", "256",
        "--eval.batch_size", "4", "--eval.passkey_trials", "0", "--data.eval_fraction", "0.5"]


def _evaluate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "evaluate", *args, *EVAL], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_any_models_side_by_side(tiny_model, tiny_extended, word_corpus, mlflow_server, tmp_path):
    # the extended model stands in for a restored one (any merged checkpoint with its own RoPE)
    proc = _evaluate("--teacher", str(tiny_model()), "--student", str(tiny_extended), "--restored",
                     str(tiny_extended), "--output", str(tmp_path / "out"), "--data.source", str(word_corpus),
                     "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "extended", "restored"] and report["lengths"] == [32, 128]
    assert report["models"]["restored"] == report["models"]["extended"]  # the same checkpoint, the same numbers
    assert report["models"]["teacher"]["ppl"]["32"] != report["models"]["extended"]["ppl"]["32"]
    assert report["restored_vs"]["ppl_n_over_teacher"] > 0 and report["run"]["restored"] == str(tiny_extended)
    assert {"report.md", "ppl_vs_length.png"} <= {p.name for p in (tmp_path / "out" / "report").iterdir()}
    assert "| extended |" in proc.stdout
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("linearard").experiment_id],
                                f"params.`train.output_dir` = '{tmp_path / 'out'}'")
    assert run.info.status == "FINISHED" and "eval/restored_vs/ppl_n_over_teacher" in run.data.metrics


def test_bad_models_fail_in_one_line_before_anything_loads(tiny_model, tiny_extended, tmp_path):
    checkpoint = tmp_path / "step-1"
    checkpoint.mkdir()
    (checkpoint / "trainable.safetensors").touch()
    for args, words in ((["--student", str(tiny_model("qwen2"))], "model.student: its model_type is 'qwen2'"),
                        (["--student", str(tiny_extended), "--restored", str(tmp_path / "nope")],
                         "--restored: no such model path"),
                        (["--restored", str(tiny_extended), "--checkpoint", str(tmp_path)], "not both"),
                        (["--student", str(tiny_extended), "--eval.restored", str(tiny_extended),  # from a config
                          "--checkpoint", str(checkpoint)], "not both")):
        proc = _evaluate("--teacher", str(tiny_model()), *args, "--output", str(tmp_path / "out"), cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
