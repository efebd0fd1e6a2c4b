"""The ``"linearard"`` attention implementation: sdpa attention that also hands each layer's post-RoPE Q, K
and V to a tap.

transformers' attention modules (Llama, Mistral, Qwen2, Qwen3, ...) call the registered attention function as
``fn(module, query [B,H,T,D], key [B,Hkv,T,D], value [B,Hkv,T,D], attention_mask, scaling=..., dropout=...)``
with Q and K already rotated and K/V not repeated over query groups. We register such a function (and
transformers' own sdpa mask builder under the same name, so the model hands us a real mask) and compute the
attention with transformers' own ``sdpa_attention_forward``; no RoPE or attention math of our own.

A tap is set per model (``set_tap(model, fn)``) and called as ``fn(layer_idx, q, k, v)`` from inside the
forward, so the loss for a layer can be computed while only that layer's Q/K/V are alive.

Packed batches: ``attention_inputs`` builds a 4D block-diagonal causal mask from ``segment_ids`` (transformers
passes a 4D mask through untouched) and restarts ``position_ids`` at each document, so a packed document is
seen exactly as it would be alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "linearard"
_TAP_ATTR = "_linearard_tap"

Tap = Callable[[int, Tensor, Tensor, Tensor], "Tensor | None"]


class _InjectLoss(torch.autograd.Function):
    """Identity on ``output``; in backward it hands ``loss`` a gradient of 1 (cf. Megatron's aux-loss scaler).

    A layer's loss then back-propagates exactly when backward enters that layer through its output: after
    FSDP2 has re-gathered the layer's parameters and in the order a checkpoint recompute expects. Nothing is
    saved for backward.
    """

    @staticmethod
    def forward(ctx, output: Tensor, loss: Tensor) -> Tensor:
        ctx.loss_dtype, ctx.loss_device = loss.dtype, loss.device
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        return grad_output, torch.ones((), dtype=ctx.loss_dtype, device=ctx.loss_device)


def linearard_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                        attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, None]:
    """sdpa attention; first calls the module's tap (if any) with ``(layer_idx, query, key, value)``.

    If the tap returns a scalar loss that requires grad, it is attached to the attention output: its
    gradient (weight 1) flows when backward passes through this layer, so the caller must back-propagate
    something that depends on the model's output (``losses.DistillationLoss`` does).
    """
    tap = getattr(module, _TAP_ATTR, None)
    layer_loss = tap(module.layer_idx, query, key, value) if tap is not None else None
    output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if layer_loss is not None and layer_loss.requires_grad:
        output = _InjectLoss.apply(output, layer_loss)
    return output, weights


AttentionInterface.register(ATTN_IMPLEMENTATION, linearard_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call the attention function: those with a ``layer_idx`` and q/k/v projections."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]


def set_tap(model: nn.Module, tap: Tap | None) -> None:
    """Install (or with None remove) ``tap`` on every attention layer of ``model``.

    The model must use ``attn_implementation="linearard"`` (``use_linearard_attention``).
    """
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with layer_idx and q_proj to tap")
    for module in modules:
        setattr(module, _TAP_ATTR, tap)


def use_linearard_attention(model: nn.Module) -> None:
    """Switch a loaded transformers model to the ``"linearard"`` attention implementation."""
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


def in_recompute() -> bool:
    """True while autograd runs a backward pass, i.e. a gradient-checkpointing recompute calls the forward.

    Forward-time side effects (recording a loss) must not be repeated then.
    """
    return torch._C._current_graph_task_id() != -1


def attention_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Model keyword arguments for a batch ``{"input_ids" [B,T], "attention_mask" [B,T]?, "segment_ids" [B,T]?}``.

    Without segment ids: ``input_ids`` and the 2D padding mask (transformers builds the causal mask).
    With segment ids: a boolean ``[B,1,T,T]`` mask, true where key j is real, j <= i and in the same segment as
    query i (the diagonal is always kept, so padded rows stay finite), and ``position_ids`` that restart at 0
    at each segment start.
    """
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    segments = batch.get("segment_ids")
    if segments is None:
        return {"input_ids": input_ids, "attention_mask": mask}
    bsz, length = input_ids.shape
    idx = torch.arange(length, device=input_ids.device)
    keep = (idx[None, :] <= idx[:, None])[None] & (segments[:, :, None] == segments[:, None, :])
    if mask is not None:
        keep = keep & mask.bool()[:, None, :]
    keep = keep | torch.eye(length, dtype=torch.bool, device=input_ids.device)[None]
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start_index = torch.where(starts, idx.expand(bsz, length), torch.zeros_like(segments))
    position_ids = idx[None, :] - torch.cummax(start_index, dim=1).values
    return {"input_ids": input_ids, "attention_mask": keep[:, None], "position_ids": position_ids}
