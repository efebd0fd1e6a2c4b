"""The ``"linearard"`` attention implementation: the model's own attention, and a tap that is handed each layer's
post-RoPE Q, K and V first.

transformers' attention modules call the registered attention function as
``fn(module, query [B,H,T,D], key [B,Hkv,T,D], value [B,Hkv,T,Dv], attention_mask, scaling=..., **kwargs)``
with Q and K already rotated and K/V not repeated over query groups. ``"linearard"`` hands them to the module's
tap and then runs the attention transformers itself would run for the model (``wrapped_implementation``): sdpa,
or the model's own eager function where its class says sdpa cannot honour its attention (softcapping in Gemma2,
attention sinks in gpt-oss). Every keyword the layer passes (scaling, sliding window, softcap, ...) goes through
unchanged, and the mask builder registered under the same name is that implementation's own, so each layer type
(full, sliding-window, chunked) gets the mask the model would build. No RoPE or attention math of our own.

A tap is set per model (``set_tap(model, fn)``) and called as ``fn(layer_idx, q, k, v)`` from inside the
forward, so the loss for a layer can be computed while only that layer's Q/K/V are alive.

Packed batches: ``attention_inputs`` turns ``segment_ids`` into ``position_ids`` that restart at each document
and passes no 2D mask; transformers then finds the documents itself (``masking_utils.find_packed_sequence_indices``)
and intersects them with each layer type's own causal, sliding-window or chunked mask, so a packed document is
seen exactly as it would be alone.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_MAPPING

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


@functools.cache
def _wrapped_for(config_class: type[PretrainedConfig]) -> str:
    model_class = MODEL_MAPPING[config_class]
    # transformers' own default (attn_implementation=None): sdpa, unless the class says sdpa cannot run it
    return "sdpa" if model_class._supports_sdpa is True else "eager"


def wrapped_implementation(config: PretrainedConfig) -> str:
    """The attention implementation ``"linearard"`` runs for a model of ``config`` (its decoder's config):
    ``"sdpa"``, or ``"eager"`` for classes whose attention sdpa cannot honour (``_supports_sdpa = False``)."""
    return _wrapped_for(type(config))


@functools.cache
def _attention_function(module_class: type[nn.Module], implementation: str) -> Callable:
    if implementation == "eager":  # the function the module's own forward falls back to, with its softcap/sinks
        return inspect.unwrap(module_class.forward).__globals__["eager_attention_forward"]
    return ALL_ATTENTION_FUNCTIONS[implementation]


def linearard_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                        attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, Tensor | None]:
    """The model's own attention (``wrapped_implementation``); first calls the module's tap (if any) with
    ``(layer_idx, query, key, value)``.

    If the tap returns a scalar loss that requires grad, it is attached to the attention output: its
    gradient (weight 1) flows when backward passes through this layer, so the caller must back-propagate
    something that depends on the model's output (``losses.DistillationLoss`` does).
    """
    tap = getattr(module, _TAP_ATTR, None)
    layer_loss = tap(module.layer_idx, query, key, value) if tap is not None else None
    attend = _attention_function(type(module), wrapped_implementation(module.config))
    output, weights = attend(module, query, key, value, attention_mask, **kwargs)
    if layer_loss is not None and layer_loss.requires_grad:
        output = _InjectLoss.apply(output, layer_loss)
    return output, weights


def linearard_mask(*args, config: PretrainedConfig, **kwargs) -> Tensor | None:
    """The wrapped implementation's own mask builder (bool for sdpa, additive float for eager)."""
    return ALL_MASK_ATTENTION_FUNCTIONS[wrapped_implementation(config)](*args, config=config, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, linearard_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, linearard_mask)


@functools.cache
def _calls_attention_interface(module_class: type[nn.Module]) -> bool:
    return "ALL_ATTENTION_FUNCTIONS" in inspect.unwrap(module_class.forward).__code__.co_names


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call the attention function: those with a ``layer_idx`` whose forward dispatches through
    transformers' ``AttentionInterface`` (a hybrid model's linear-attention or Mamba layers do not)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and _calls_attention_interface(type(m))]


def set_tap(model: nn.Module, tap: Tap | None) -> None:
    """Install (or with None remove) ``tap`` on every attention layer of ``model``.

    The model must use ``attn_implementation="linearard"`` (``use_linearard_attention``).
    """
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules that call transformers' attention "
                         "interface to tap")
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


def attention_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor | bool | None]:
    """Model keyword arguments for a batch ``{"input_ids" [B,T], "attention_mask" [B,T]?, "segment_ids" [B,T]?}``.

    Always ``use_cache=False`` (a training forward; transformers only detects packed documents without a cache).
    Without segment ids: ``input_ids`` and the 2D padding mask (transformers builds each layer type's mask).
    With segment ids: ``position_ids`` that restart at 0 at each document and no mask, from which transformers
    builds each layer type's mask within each document. A run of padding counts as a document of its own, so no
    real token attends to it and padded rows stay finite.
    """
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    segments = batch.get("segment_ids")
    if segments is None:
        return {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
    bsz, length = input_ids.shape
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    if mask is not None:
        real = mask.bool()
        starts[:, 1:] |= real[:, 1:] != real[:, :-1]
    idx = torch.arange(length, device=input_ids.device).expand(bsz, length)
    start_index = torch.where(starts, idx, torch.zeros_like(idx))
    position_ids = idx - torch.cummax(start_index, dim=1).values
    return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
