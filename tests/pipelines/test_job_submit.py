"""`ray job submit --working-dir .` of the restore job to a local Ray head with token authentication.

The job runs from Ray's uploaded copy of the repository (first on sys.path), so it also checks that
``linearard.kernels`` resolves to that copy's ``kernels/`` folder, then restores the tiny model and registers it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.pipelines.test_restore import check_registered, restore_args

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IMPORT_CHECK = ("import os, kernels, pipelines, linearard, linearard.kernels as k; assert getattr(kernels, \"__file__\", None) is None; "
                "assert k.__file__.startswith(os.getcwd()) and linearard.__file__.startswith(os.getcwd()), k.__file__")


def test_ray_job_submit_with_token_auth(ray_cluster, mlflow_server, tiny_model, word_corpus, tmp_path):
    name = "tiny-restored-job"
    args = restore_args(tiny_model("llama"), word_corpus, tmp_path / "out", mlflow_server, name)
    submit = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", "."]

    # Without the token the cluster refuses the job.
    no_token = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    refused = subprocess.run([*submit, "--", "true"], cwd=REPO, env={**no_token, "HOME": str(tmp_path)},
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

    entrypoint = f"python -c '{IMPORT_CHECK}' && linearard restore " + " ".join(f"'{a}'" for a in args)
    proc = subprocess.run([*submit, "--", "bash", "-c", entrypoint], cwd=REPO, capture_output=True, text=True,
                          timeout=480)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"registered {name} version 1" in proc.stdout
    tags = check_registered(mlflow_server, name, 4.0)
    assert tags["rope"] == "linear:4" and int(tags["steps"]) == 4
