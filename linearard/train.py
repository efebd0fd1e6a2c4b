"""The training loop: one optimizer step = one batch, split into ``grad_accum`` micro-batches.

AdamW on the student's trainable parameters, linear warmup then cosine to ``min_lr_ratio`` (transformers'
schedule), gradient-norm clipping, bf16 autocast on CUDA, a progress bar, metrics to a callback, and
checkpoints with exact resume (trainable weights, optimizer, scheduler, step, data position, RNG states).

The one loop every run trains with: a plain process gives it a list of batches and ``LocalCheckpoints``; a Ray
Train worker (``pipelines.train``) gives it its Ray Data shard, Ray Train's checkpoint storage and its own
metric sink and bar. It runs unchanged when teacher and student are FSDP2-sharded: clipping uses
``torch.nn.utils.clip_grad_norm_`` (DTensor-aware), state goes through ``torch.distributed.checkpoint.state_dict``
with full (gathered) state dicts, and the step's metrics are reduced over the ranks.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
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

from linearard import checkpoint
from linearard.config import RunConfig
from linearard.losses import DistillationLoss
from linearard.models import compile_layers

Batch = dict[str, Tensor]
StepCallback = Callable[[int, dict[str, float]], None]
BarFactory = Callable[[int, int], Any]  # (total, initial) -> an object with update(n) and close()


class NonFiniteError(FloatingPointError):
    """A training step's loss or gradient norm is not finite: the run stops, nothing bad is saved."""


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Trainer:
    """Trains ``student`` to match ``teacher`` under ``cfg.loss``.

    Args:
        cfg: one stage's config (``linearard.plan.Stage.config``: layer lists resolved); uses ``loss``,
            ``optim``, ``train``.
        teacher, student: from ``build_teacher_student`` (optionally FSDP2-sharded).
        device: where batches go; default the student's device.
        init_from: a checkpoint folder whose trainable weights the student starts from (a warm start, e.g. the
            CPT stage after the ARD stage; a resume overwrites it).

    With ``train.compile`` both models' decoder-layer norms and MLPs go through ``torch.compile``
    (``models.compile_layers``); the first step then includes the compilation.
    """

    def __init__(self, cfg: RunConfig, teacher: nn.Module, student: nn.Module,
                 device: torch.device | str | None = None, init_from: str | Path | None = None):
        self.cfg = cfg
        self.teacher, self.student = teacher, student
        self.device = torch.device(device) if device is not None else next(student.parameters()).device
        self.params = [p for p in student.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        self.objective = DistillationLoss(cfg.loss)
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
        self.tokens_seen = 0  # over all ranks
        self.init_from = str(init_from) if init_from is not None else None
        if init_from is not None:
            load_trainable(self.student, init_from)

    # ------------------------------------------------------------------------------------------ step
    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on ``batch`` (``input_ids`` [B,T], optional ``attention_mask``/``segment_ids``
        [B,T]); B is split into ``train.grad_accum`` micro-batches.

        Returns the step's metrics, the same on every rank: ``loss`` and the per-term values (``ard_q``,
        ``ard_k``, ``ard_v``, ``lm``, ``logits_kd``, ``hidden_cosine`` when on) averaged over ranks, ``lr``,
        ``grad_norm``, ``tokens`` (cumulative, all ranks), ``tokens_per_s`` (all ranks) and, on CUDA,
        ``peak_memory_gib`` (this rank's allocated peak so far). Raises ``NonFiniteError`` naming the step when
        the loss or the gradient norm is not finite.
        """
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
        names = list(recorded[0])
        means = torch.stack([torch.stack([r[n] for r in recorded]).double().mean() for n in names])
        values = torch.cat([means, grad_norm.double().reshape(1).to(means.device),
                            torch.tensor([tokens], dtype=torch.float64, device=means.device)])
        values = _sum_over_ranks(values)
        world = dist.get_world_size() if dist.is_initialized() else 1
        values = values.tolist()  # the step's only host sync, after the optimizer's kernels are queued
        loss_value, norm = values[names.index("loss")] / world, values[-2] / world
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            # This step's update has damaged the weights: stop before they reach a checkpoint. The values are
            # reduced over the ranks, so every rank stops here.
            raise NonFiniteError(f"training diverged at step {self.step + 1}: loss {loss_value:g}, gradient norm "
                                 f"{norm:g} (lower optim.lr, or check the data and the models)")
        step_tokens = int(values[-1])
        self.step += 1
        self.batches_seen += 1
        self.tokens_seen += step_tokens
        metrics = {**{n: v / world for n, v in zip(names, values)}, "lr": lr, "grad_norm": norm,
                   "tokens_per_s": step_tokens / max(time.perf_counter() - start, 1e-9),
                   "tokens": float(self.tokens_seen)}
        if self.device.type == "cuda":  # this rank's peak so far (no sync: the allocator's own counter)
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def fit(self, batches: Iterable[Batch], checkpoints: checkpoint.CheckpointStore,
            on_step: StepCallback | None = None, make_bar: BarFactory | None = None) -> dict[str, float]:
        """Train until ``train.steps``: resume from ``checkpoints.latest()`` if it has one, skip the batches that
        run consumed, and save to ``checkpoints`` every ``train.checkpoint_every`` steps and at the end.

        ``batches`` must replay the same order on resume (seeded shuffle). ``on_step(step, metrics)`` follows
        every step, before that step's checkpoint. ``make_bar(total, initial)`` makes the progress bar (default:
        tqdm on the main process when ``train.progress_bar``). Returns the last step's metrics.
        """
        tcfg = self.cfg.train
        with checkpoints.latest() as directory:
            if directory is not None:
                self.load_checkpoint(directory)
        stream = itertools.islice(iter(batches), self.batches_seen, None)
        if make_bar is None:
            def make_bar(total: int, initial: int) -> Any:
                return tqdm(total=total, initial=initial, desc=tcfg.method, unit="step",
                            disable=not (tcfg.progress_bar and is_main_process()))
        bar = make_bar(tcfg.steps, self.step)
        metrics: dict[str, float] = {}
        try:
            while self.step < tcfg.steps:
                batch = next(stream, None)
                if batch is None:
                    raise ValueError(f"the training data ran out after {self.batches_seen} batches; train.steps="
                                     f"{tcfg.steps} needs one batch per step")
                metrics = self.train_step(batch)
                bar.update(1)
                if on_step is not None:
                    on_step(self.step, metrics)
                every = tcfg.checkpoint_every
                if self.step == tcfg.steps or (every and self.step % every == 0):
                    checkpoints.save(self.step, self.write_checkpoint, metrics)
        finally:
            bar.close()
        return metrics

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything exact resume needs; tensors are full (gathered) and on CPU. Collective under FSDP."""
        model = _trainable_state(self.student)
        optimizer = get_optimizer_state_dict(self.student, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        trainer = {"step": self.step, "batches_seen": self.batches_seen, "tokens_seen": self.tokens_seen,
                   "scheduler": self.scheduler.state_dict(), "init_from": self.init_from}
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

    def write_checkpoint(self, directory: Path) -> None:
        """Write this rank's part of a checkpoint into an existing ``directory`` (``linearard.checkpoint``).
        Collective under FSDP: every rank must call it."""
        checkpoint.write(Path(directory), self.state_dict(), self.cfg.yaml_text())

    def load_checkpoint(self, directory: str | Path) -> None:
        """Resume from a checkpoint folder."""
        self.load_state_dict(checkpoint.read(Path(directory)))

    # -------------------------------------------------------------------------------------- helpers
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.cfg.train.autocast_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _gradient_sync(self, last_micro_batch: bool) -> None:
        # FSDP2: reduce-scatter gradients only on the last micro-batch of an accumulation.
        if hasattr(self.student, "set_requires_gradient_sync"):
            self.student.set_requires_gradient_sync(last_micro_batch)


def load_trainable(student: nn.Module, directory: str | Path) -> None:
    """Load a checkpoint folder's trainable weights into ``student``; nothing else.

    Every name in the file must be a trainable student parameter (plain or FSDP2-sharded student)."""
    weights = checkpoint.read_trainable(directory)
    unknown = set(weights) - set(_trainable_state(student))
    if unknown:
        raise ValueError(f"{directory}: weights that are not trainable student parameters, e.g. {min(unknown)!r}")
    set_model_state_dict(student, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def _trainable_state(student: nn.Module) -> dict[str, Tensor]:
    """The student's trainable weights, full (gathered under FSDP2) and on CPU. Collective under FSDP."""
    return get_model_state_dict(student, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))


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


def _sum_over_ranks(values: Tensor) -> Tensor:
    """``values`` summed over the ranks (as they are in one process). nccl reduces CUDA tensors only."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    reduced = values.to(device)
    dist.all_reduce(reduced)
    return reduced
