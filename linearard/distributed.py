"""FSDP2 sharding of the teacher/student pair with PyTorch's own ``fully_shard``.

No Ray here: the Ray Train worker (``pipelines.train``) and a plain ``torchrun`` process
(``benchmarks/ard_step.py``) shard the same way. Call after ``build_teacher_student`` and before ``Trainer``,
once the default process group exists.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import fully_shard

from linearard.models import decoder_layers


def shard_model(model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every decoder layer (the model's ``_no_split_modules`` classes), then the root."""
    for module in decoder_layers(model):
        fully_shard(module, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def shard_teacher_student(teacher: nn.Module, student: nn.Module) -> None:
    """Shard both models in place (the frozen teacher too, so a 7B pair costs each GPU half its weights)."""
    # The teacher only runs forward: each layer is gathered for its forward and resharded right after.
    shard_model(teacher)
    # The student keeps each layer gathered from its forward to its backward, where the checkpoint recompute
    # and the gradients need the weights again: one all-gather per layer and micro-batch instead of two, for
    # the price of holding the student's unsharded weights over the step. A speed choice, not a correctness
    # one: each layer's relation loss enters backward through the layer's output (``capture._InjectLoss``),
    # after FSDP2's pre-backward all-gather, so resharding after forward would give the same gradients.
    shard_model(student, reshard_after_forward=False)
