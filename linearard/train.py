"""The plain-process trainer: one optimizer step = one batch, split into ``grad_accum`` micro-batches.

AdamW on the student's trainable parameters, linear warmup then cosine to ``min_lr_ratio`` (transformers'
schedule), gradient-norm clipping, bf16 autocast on CUDA, a tqdm bar, metrics to a callback, and checkpoints
with exact resume (trainable weights, optimizer, scheduler, step, data position, RNG states).

It runs unchanged when a Ray Train worker has wrapped teacher and student with FSDP2 ``fully_shard``:
clipping uses ``torch.nn.utils.clip_grad_norm_`` (DTensor-aware), and state goes through
``torch.distributed.checkpoint.state_dict`` with full (gathered) state dicts, which also works on plain models.
Metrics are the local rank's values; the caller may all-reduce them.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from linearard.config import RunConfig
from linearard.losses import DistillationLoss
from linearard.models import compile_layers

Batch = dict[str, Tensor]
MetricsCallback = Callable[[int, dict[str, float]], None]
CHECKPOINT_PREFIX = "step-"
KEEP_CHECKPOINTS = 2


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Trainer:
    """Trains ``student`` to match ``teacher`` under ``cfg.loss``.

    Args:
        cfg: the run config (uses ``loss``, ``optim``, ``train``).
        teacher, student: from ``build_teacher_student`` (optionally FSDP2-wrapped).
        callback: ``callback(step, metrics)`` after every optimizer step; ``metrics`` has ``loss``, the
            per-term values (``ard_q``, ``ard_k``, ``ard_v``, ``lm``, ``logits_kd``, ``hidden_cosine`` when on),
            ``lr``, ``grad_norm``, ``tokens_per_s`` and ``tokens`` (cumulative).
        device: where batches go; default the student's device.

    With ``train.compile`` both models' decoder-layer norms and MLPs go through ``torch.compile``
    (``models.compile_layers``); the first step then includes the compilation.
    """

    def __init__(self, cfg: RunConfig, teacher: nn.Module, student: nn.Module,
                 callback: MetricsCallback | None = None, device: torch.device | str | None = None):
        self.cfg = cfg
        self.teacher, self.student = teacher, student
        self.callback = callback
        self.device = torch.device(device) if device is not None else next(student.parameters()).device
        self.params = [p for p in student.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        num_layers = student.config.get_text_config().num_hidden_layers
        self.objective = DistillationLoss(cfg.loss, num_layers)
        self.objective.attach(teacher, student)
        if cfg.train.compile:
            for model in (teacher, student):
                compile_layers(model)
        opt = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                           weight_decay=opt.weight_decay)
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=cfg.train.steps,
            min_lr_rate=opt.min_lr_ratio)
        self.step = 0  # optimizer steps done
        self.batches_seen = 0  # data position: batches consumed from the training stream
        self.tokens_seen = 0
        if cfg.train.init_from:  # a warm start (e.g. the CPT stage after ARD); a resume overwrites it
            load_trainable(self.student, Path(cfg.train.init_from) / "trainable.safetensors")

    # ------------------------------------------------------------------------------------------ step
    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on ``batch`` (``input_ids`` [B,T], optional ``attention_mask``/``segment_ids``
        [B,T]); B is split into ``train.grad_accum`` micro-batches. Returns the step's metrics."""
        start = time.perf_counter()
        # counted on the incoming (host) batch: no device sync
        tokens = int(batch["attention_mask"].sum()) if batch.get("attention_mask") is not None \
            else batch["input_ids"].numel()
        batch = {k: v.to(self.device) for k, v in batch.items() if v is not None}
        accum = self.cfg.train.grad_accum
        micro_batches = [dict(zip(batch, parts)) for parts in zip(*(v.chunk(accum) for v in batch.values()))]
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        recorded: list[dict[str, Tensor]] = []  # per micro-batch, on the device until the step's one sync
        for index, micro in enumerate(micro_batches):
            self._gradient_sync(index == len(micro_batches) - 1)
            with self._autocast():
                loss, terms = self.objective(self.teacher, self.student, micro)
            (loss / len(micro_batches)).backward()
            self.objective.release()
            recorded.append({"loss": loss.detach(), **terms})
        max_norm = self.cfg.optim.max_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        # The step's only host sync, after the optimizer's kernels are queued.
        values = iter(torch.stack([v.double() for r in recorded for v in r.values()] + [grad_norm.double()]).tolist())
        sums: dict[str, float] = {}
        for micro_terms in recorded:
            for name in micro_terms:
                sums[name] = sums.get(name, 0.0) + next(values) / len(micro_batches)
        self.step += 1
        self.batches_seen += 1
        self.tokens_seen += tokens
        metrics = {**sums, "lr": lr, "grad_norm": next(values),
                   "tokens_per_s": tokens / max(time.perf_counter() - start, 1e-9), "tokens": float(self.tokens_seen)}
        if self.callback is not None:
            self.callback(self.step, metrics)
        return metrics

    def fit(self, batches: Iterable[Batch], checkpoint_dir: str | Path | None = None) -> dict[str, float]:
        """Train until ``train.steps``, skipping the batches a resumed run already consumed.

        ``batches`` must replay the same order on resume (seeded shuffle). Checkpoints go to ``checkpoint_dir``
        (default ``<train.output_dir>/checkpoints``) every ``train.checkpoint_every`` steps and at the end.
        Returns the last step's metrics.
        """
        tcfg = self.cfg.train
        checkpoint_dir = Path(checkpoint_dir or Path(tcfg.output_dir) / "checkpoints")
        stream = itertools.islice(iter(batches), self.batches_seen, None)
        metrics: dict[str, float] = {}
        bar = tqdm(total=tcfg.steps, initial=self.step, desc="distill", unit="step",
                   disable=not (tcfg.progress_bar and is_main_process()))
        with bar:
            while self.step < tcfg.steps:
                batch = next(stream, None)
                if batch is None:
                    raise ValueError(f"the training data ran out after {self.batches_seen} batches; train.steps="
                                     f"{tcfg.steps} needs one batch per step")
                metrics = self.train_step(batch)
                bar.update(1)
                if self.step % tcfg.log_every == 0:
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{metrics['lr']:.2e}")
                if tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0 and self.step < tcfg.steps:
                    self.save_checkpoint(checkpoint_dir)
        self.save_checkpoint(checkpoint_dir)
        return metrics

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything exact resume needs; tensors are full (gathered) and on CPU. Collective under FSDP."""
        model = _trainable_state(self.student)
        optimizer = get_optimizer_state_dict(self.student, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        trainer = {"step": self.step, "batches_seen": self.batches_seen, "tokens_seen": self.tokens_seen,
                   "scheduler": self.scheduler.state_dict()}
        return {"model": model, "optimizer": optimizer, "trainer": trainer, "rng": _rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` output (every rank passes the full state)."""
        set_model_state_dict(self.student, state["model"],
                             options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(self.student, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        trainer = state["trainer"]
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.step, self.batches_seen = int(trainer["step"]), int(trainer["batches_seen"])
        self.tokens_seen = int(trainer["tokens_seen"])
        _set_rng_state(state["rng"])

    def write_checkpoint(self, directory: str | Path) -> None:
        """Write this process's part of a checkpoint into an existing ``directory``: rank 0 the gathered
        trainable weights (safetensors), optimizer, trainer state and config; every rank its RNG state
        (``rng-<rank>.pt``). Collective under FSDP: every rank must call it."""
        directory = Path(directory)
        state = self.state_dict()
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state["model"].items()}, directory / "trainable.safetensors")
            torch.save(state["optimizer"], directory / "optimizer.pt")
            torch.save(state["trainer"], directory / "trainer.pt")
            self.cfg.to_yaml(directory / "config.yaml")
        torch.save(state["rng"], directory / f"rng-{rank}.pt")

    def save_checkpoint(self, checkpoint_dir: str | Path) -> Path:
        """Write ``<checkpoint_dir>/step-<N>/`` (on a filesystem every rank sees) atomically: into a temporary
        folder renamed at the end. Keeps the newest ``KEEP_CHECKPOINTS``. Collective under FSDP."""
        checkpoint_dir = Path(checkpoint_dir)
        final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        tmp = checkpoint_dir / f".{final.name}.tmp"
        main = is_main_process()
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        self.write_checkpoint(tmp)
        _barrier()
        if main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"))[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from a folder written by ``save_checkpoint``."""
        path = Path(path)
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng_file = path / f"rng-{rank}.pt"
        self.load_state_dict({
            "model": load_file(path / "trainable.safetensors"),
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
            "trainer": torch.load(path / "trainer.pt", weights_only=True),
            "rng": torch.load(rng_file if rng_file.exists() else path / "rng-0.pt", weights_only=True),
        })

    # -------------------------------------------------------------------------------------- helpers
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.cfg.train.autocast_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _gradient_sync(self, last_micro_batch: bool) -> None:
        # FSDP2: reduce-scatter gradients only on the last micro-batch of an accumulation.
        if hasattr(self.student, "set_requires_gradient_sync"):
            self.student.set_requires_gradient_sync(last_micro_batch)


def load_trainable(student: nn.Module, path: str | Path) -> None:
    """Load trainable weights (a checkpoint's ``trainable.safetensors``) into ``student``; nothing else.

    Every name in the file must be a trainable student parameter (plain or FSDP2-sharded student)."""
    weights = load_file(path)
    unknown = set(weights) - set(_trainable_state(student))
    if unknown:
        raise ValueError(f"{path}: weights that are not trainable student parameters, e.g. {min(unknown)!r}")
    set_model_state_dict(student, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def _trainable_state(student: nn.Module) -> dict[str, Tensor]:
    """The student's trainable weights, full (gathered under FSDP2) and on CPU. Collective under FSDP."""
    return get_model_state_dict(student, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete ``step-*`` folder under ``checkpoint_dir`` (None if there is none)."""
    found = sorted(Path(checkpoint_dir).glob(f"{CHECKPOINT_PREFIX}*")) if Path(checkpoint_dir).is_dir() else []
    return found[-1] if found else None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) — call before building models for a reproducible LoRA init."""
    from transformers import set_seed

    set_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
