"""``kernels/`` is imported as ``linearard.kernels`` only: from the repository root (on sys.path under
``python -m`` and ``ray job submit --working-dir .``) a bare ``import kernels`` finds Hugging Face's package or
nothing of ours, and transformers still sees no hub-kernels package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import sys, kernels
print(getattr(kernels, "HF", "-"), getattr(kernels, "__file__", None), hasattr(kernels, "relation_kl"))
from transformers.utils.import_utils import is_kernels_available
import transformers.modeling_utils  # probes the `kernels` package on import
import linearard.kernels as ours
print(is_kernels_available(), ours.relation_kl.__module__)
"""


def _probe(extra_path: str = "") -> list[str]:
    env = {"PATH": "", "PYTHONPATH": extra_path, "HOME": "/tmp"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    return out.split()


def test_bare_import_from_the_root_finds_nothing_of_ours():
    hf, file, has_op, available, module = _probe()
    assert (hf, file, has_op) == ("-", "None", "False")  # an empty module: no file, none of the op
    assert available == "False" and module == "linearard.kernels.op"


def test_bare_import_from_the_root_finds_hugging_faces(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("HF = 'yes'\n")  # stands in for Hugging Face's package
    hf, file, has_op, _, module = _probe(str(tmp_path))
    assert (hf, has_op) == ("yes", "False") and file == str(tmp_path / "kernels" / "__init__.py")
    assert module == "linearard.kernels.op"
