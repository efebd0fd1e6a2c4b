"""Training checkpoints: the one on-disk format, and where a run keeps them.

One checkpoint is a folder ``step-<N>/`` (``step_folder``) holding::

    trainable.safetensors   the student's trainable weights, full (gathered under FSDP2)   rank 0
    optimizer.pt            the AdamW state, full                                            rank 0
    trainer.pt              step, data position, tokens, LR schedule, where it started from  rank 0
    config.yaml             the stage's config                                               rank 0
    rng-<rank>.pt           the RNG states of each rank                                      every rank

Every ``.pt`` file loads with ``weights_only=True``. The training loop (``linearard.train.Trainer.fit``) reads and
writes them through a ``CheckpointStore``: ``LocalCheckpoints`` (a folder every rank sees) here, Ray Train's
storage in ``pipelines.train``.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
TRAINER = "trainer.pt"
CONFIG = "config.yaml"
_PREFIX = "step-"
_MAIN_FILES = (TRAINABLE, OPTIMIZER, TRAINER, CONFIG)


def step_folder(step: int) -> str:
    """The folder name of the checkpoint after ``step`` optimizer steps (sorts by step)."""
    return f"{_PREFIX}{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


def write(directory: Path, state: dict[str, Any], config_yaml: str) -> None:
    """Write this rank's part of a checkpoint (``Trainer.state_dict`` output) into an existing ``directory``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        save_file(_unshared(state["model"]), directory / TRAINABLE)
        torch.save(state["optimizer"], directory / OPTIMIZER)
        torch.save(state["trainer"], directory / TRAINER)
        (directory / CONFIG).write_text(config_yaml)
    torch.save(state["rng"], directory / rng_file(rank))


def _unshared(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors, each with storage of its own (safetensors refuses tied ones, e.g. a trained embedding
    that is also the LM head: both names are written, each loads back into the same tied parameter)."""
    seen, out = set(), {}
    for name, tensor in weights.items():
        tensor = tensor.contiguous()
        out[name] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    return out


def read(directory: Path) -> dict[str, Any]:
    """This rank's view of a checkpoint: the full state (``Trainer.load_state_dict`` input)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = directory / rng_file(rank)  # a run resumed on fewer ranks than it was written by still finds one
    return {"model": load_file(directory / TRAINABLE),
            "optimizer": torch.load(directory / OPTIMIZER, weights_only=True),
            "trainer": torch.load(directory / TRAINER, weights_only=True),
            "rng": torch.load(rng if rng.exists() else directory / rng_file(0), weights_only=True)}


def read_trainable(directory: str | Path) -> dict[str, Tensor]:
    """The trainable weights of a checkpoint folder."""
    return load_file(Path(directory) / TRAINABLE)


def is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() and (directory / name).stat().st_size > 0 for name in _MAIN_FILES)


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (None if there is none)."""
    root = Path(root)
    found = sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and is_complete(p)) if root.is_dir() else []
    return found[-1] if found else None


class CheckpointStore(Protocol):
    """Where the training loop reads its resume point from and writes its checkpoints to."""

    def latest(self) -> contextlib.AbstractContextManager[Path | None]:
        """The checkpoint to resume from, as a local folder for the ``with`` block (None: start fresh)."""

    def save(self, step: int, write: Callable[[Path], None], metrics: dict[str, float]) -> None:
        """Store the checkpoint after ``step``: ``write(folder)`` writes this rank's part into a folder.
        Collective: every rank calls it."""


class LocalCheckpoints:
    """Checkpoints in ``root/step-<N>/`` on a filesystem every rank sees: written into a temporary folder
    that is renamed at the end (a crash leaves no half checkpoint), the newest ``keep`` kept."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root, self.keep = Path(root), keep

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        yield latest(self.root)

    def save(self, step: int, write: Callable[[Path], None], metrics: dict[str, float]) -> None:
        final = self.root / step_folder(step)
        tmp = self.root / f".{final.name}.tmp"
        main = not dist.is_initialized() or dist.get_rank() == 0
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        write(tmp)
        _barrier()
        if main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(self.root.glob(f"{_PREFIX}*"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
