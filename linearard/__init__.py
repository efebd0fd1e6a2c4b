"""LinearARD: attention-relation distillation for RoPE-extended LLMs (no Ray imports in this package).

Public API (imported lazily, so ``import linearard.kernels`` stays light)::

    cfg = RunConfig.from_yaml("run.yaml", ["--train.steps", "20"])         # validated, ConfigError on bad input
    seed_everything(cfg.train.seed)
    teacher, student, tokenizer = build_teacher_student(cfg.model, cfg.lora, device)
    trainer = Trainer(cfg, teacher, student, callback=lambda step, metrics: ...)
    trainer.fit(batches)                                                     # or trainer.train_step(batch)
    save_merged(student, tokenizer, "restored/")
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RunConfig": "linearard.config",
    "ConfigError": "linearard.config",
    "parse_rope_spec": "linearard.rope",
    "scaled_config": "linearard.rope",
    "build_teacher_student": "linearard.models",
    "save_merged": "linearard.models",
    "DistillationLoss": "linearard.losses",
    "Trainer": "linearard.train",
    "latest_checkpoint": "linearard.train",
    "seed_everything": "linearard.train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'linearard' has no attribute {name!r}")
