"""LinearARD: attention-relation distillation for RoPE-extended LLMs (no Ray imports in this package).

Public API (imported lazily, so ``import linearard.kernels`` stays light)::

    cfg = RunConfig.from_yaml("run.yaml", ["--train.steps", "20"])         # validated, ConfigError on bad input
    family = resolve_family(teacher_config, cfg.model.trainable, cfg.lora.target_modules)  # or ConfigError
    seed_everything(cfg.train.seed)
    teacher, student, tokenizer = build_teacher_student(cfg.model, cfg.lora, device)
    trainer = Trainer(cfg, teacher, student, callback=lambda step, metrics: ...)
    trainer.fit(batches)                                                     # or trainer.train_step(batch)
    save_merged(student, tokenizer, "restored/")
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

_EXPORTS = {
    "RunConfig": "linearard.config",
    "ConfigError": "linearard.config",
    "parse_rope_spec": "linearard.rope",
    "scaled_config": "linearard.rope",
    "resolve_family": "linearard.families",
    "build_teacher_student": "linearard.models",
    "save_merged": "linearard.models",
    "DistillationLoss": "linearard.losses",
    "Trainer": "linearard.train",
    "latest_checkpoint": "linearard.train",
    "seed_everything": "linearard.train",
}
__all__ = sorted(_EXPORTS)


# ``linearard.kernels`` lives in the top-level ``kernels/`` folder and is mapped into the package by the install
# (pyproject's ``package-dir``). An uninstalled copy of the repository (a job sent with ``ray job submit
# --working-dir .``, a benchmark run from a bare checkout) has no such mapping: the finder below maps
# ``linearard.kernels`` to the ``kernels/`` folder beside whichever ``linearard`` was imported, so the code uses
# the op of the same copy, installed or not. An installed wheel (``linearard/kernels/`` inside the package) is
# left alone.
class _SiblingKernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 - importlib protocol
        if fullname != "linearard.kernels" or not path:
            return None
        package_dir = Path(next(iter(path)))
        if (package_dir / "kernels" / "__init__.py").exists():
            return None  # a regular install: the normal import finds it
        kernels = package_dir.parent / "kernels"
        if not (kernels / "__init__.py").exists():
            return None
        return importlib.util.spec_from_file_location(
            fullname, kernels / "__init__.py", submodule_search_locations=[str(kernels)]
        )


if not any(isinstance(f, _SiblingKernelsFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _SiblingKernelsFinder())


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'linearard' has no attribute {name!r}")
