"""The relation-KL op: ``relation_kl`` checks its inputs, picks a backend and reduces (``linearard.kernels.relation_kl``).

For every row i of a relation map, KL(P_t(i,·) ‖ P_s(i,·)) between the teacher's and the student's row
softmax of scaled dot products, without ever storing the T×T maps:

    s_ij = scale_s·⟨s_rows[i], s_cols[j]⟩,  t_ij = scale_t·⟨t_rows[i], t_cols[j]⟩
    KL_i = Σ_j p_t(j)·(t_ij − s_ij) − lse_t(i) + lse_s(i)      over the valid j of row i

Two backends compute it: ``relation_kl_torch`` (chunked PyTorch, any device) and ``relation_kl_triton``
(Triton kernels for CUDA). Both give the per-row KL ``[B, H, T]``; the reduction happens here.
docs/kernel.md has the math, the tiles and measured numbers.
"""

from __future__ import annotations

import math
import os

import torch

from .relation_kl_torch import relation_kl_rows as _rows_torch

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_MAX_D = 256


def relation_kl(
    s_rows: torch.Tensor,
    s_cols: torch.Tensor,
    t_rows: torch.Tensor,
    t_cols: torch.Tensor,
    *,
    scale_s: float | None = None,
    scale_t: float | None = None,
    mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    causal: bool = True,
    reduction: str = "sum",
    backend: str = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """Σ over rows and heads of KL(P_teacher(i,·) ‖ P_student(i,·)) of two relation maps, in linear memory.

    Args:
        s_rows: student rows ``[B, H, T, Ds]``.
        s_cols: student columns ``[B, Hc, T, Ds]``, ``H % Hc == 0``; row head h reads column head
            ``h // (H // Hc)``. Pass ``s_rows`` itself for a self-relation (Q·Qᵀ, K·Kᵀ, V·Vᵀ).
        t_rows: teacher rows ``[B, H, T, Dt]`` (no gradient flows to the teacher).
        t_cols: teacher columns ``[B, Hct, T, Dt]``, ``H % Hct == 0``.
        scale_s, scale_t: logit scales; default ``1/sqrt(Ds)`` and ``1/sqrt(Dt)``.
        mask: ``[B, T]`` bool or 0/1 ints, true = real token. Column j is valid only where it is true;
            row i is counted only where it is true.
        segment_ids: ``[B, T]`` ints; j is valid for row i only within the same segment (packed documents).
        causal: column j is valid for row i only when ``j <= i``.
        reduction: ``"sum"`` (scalar), ``"mean"`` (sum over the number of counted (row, head) pairs) or
            ``"none"`` (``[B, H, T]``, 0 on rows that are not counted).
        backend: ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"``, or
            ``"auto"`` (triton on CUDA where it supports the dtype and head size, else torch).
        deterministic: bit-identical gradients from run to run. The triton backend then computes dQ in a
            separate row-parallel pass instead of adding it with fp32 atomics; the torch backend is always
            deterministic.

    Returns:
        The loss in float32 (float64 for float64 inputs). A row is counted when ``mask`` is true there (it then
        always has itself as a valid column); other rows contribute 0 and no gradient.

    Non-finite input is propagated, never hidden: a NaN or ±inf in a counted row or a valid column of the
    teacher's (or the student's) tensors makes that row's KL, and so the loss, NaN on both backends, and the
    gradients NaN. (Refusing it would cost a host sync per call; the caller checks the loss, once per step.)
    Positions the mask leaves out are never read.

    Raises:
        ValueError: bad ranks, shapes, head counts, devices, dtypes, mask/segment shapes, flags, backend or
            reduction.
    """
    _check(s_rows, s_cols, t_rows, t_cols, mask, segment_ids, causal, reduction, backend, deterministic)
    ds, dt = s_rows.shape[-1], t_rows.shape[-1]
    scale_s = _scale("scale_s", scale_s, ds)
    scale_t = _scale("scale_t", scale_t, dt)
    if mask is not None:
        mask = mask != 0 if mask.dtype != torch.bool else mask
    if backend == "auto":
        backend = "triton" if _triton_fits(s_rows, ds, dt) else "torch"
    if backend == "triton":
        if not (s_rows.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); got device {s_rows.device}"
            )
        if s_rows.dtype not in _TRITON_DTYPES:
            raise ValueError(f"backend='triton' supports float32/bfloat16/float16 inputs, got {s_rows.dtype}")
        if max(ds, dt) > _TRITON_MAX_D:
            raise ValueError(f"backend='triton' supports head sizes up to {_TRITON_MAX_D}, got Ds={ds}, Dt={dt}")
        from .relation_kl_triton import relation_kl_rows

        kl = relation_kl_rows(s_rows, s_cols, t_rows, t_cols, scale_s, scale_t, mask, segment_ids, causal,
                              deterministic)
    else:
        kl = _rows_torch(s_rows, s_cols, t_rows, t_cols, scale_s, scale_t, mask, segment_ids, causal)
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    # Row i is always valid for itself when mask[i] is true, so the counted rows are exactly the masked-in rows.
    rows = mask.sum() if mask is not None else torch.tensor(s_rows.shape[0] * s_rows.shape[2], device=kl.device)
    return kl.sum() / (rows * s_rows.shape[1]).clamp(min=1).to(kl.dtype)


def _triton_fits(x: torch.Tensor, ds: int, dt: int) -> bool:
    return x.is_cuda and x.dtype in _TRITON_DTYPES and max(ds, dt) <= _TRITON_MAX_D


def _scale(name: str, value: float | None, d: int) -> float:
    if value is None:
        return 1.0 / math.sqrt(d)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number or None, got {value!r}")
    return float(value)


def _check(s_rows, s_cols, t_rows, t_cols, mask, segment_ids, causal, reduction, backend, deterministic) -> None:
    named = {"s_rows": s_rows, "s_cols": s_cols, "t_rows": t_rows, "t_cols": t_cols}
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, heads, T, D], got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float64/float32/bfloat16/float16, got {x.dtype}")
    shapes = ", ".join(f"{n} {tuple(x.shape)}" for n, x in named.items())
    B, H, T, Ds = s_rows.shape
    Dt = t_rows.shape[-1]
    if B == 0 or H == 0 or T == 0 or Ds == 0 or Dt == 0:
        raise ValueError(f"s_rows and t_rows must be non-empty, got {shapes}")
    if s_cols.shape[0] != B or s_cols.shape[2] != T or s_cols.shape[3] != Ds:
        raise ValueError(f"s_cols must be [B, Hc, T, Ds] matching s_rows [B, H, T, Ds], got {shapes}")
    if tuple(t_rows.shape[:3]) != (B, H, T):
        raise ValueError(f"t_rows must be [B, H, T, Dt] matching s_rows [B, H, T, Ds], got {shapes}")
    if t_cols.shape[0] != B or t_cols.shape[2] != T or t_cols.shape[3] != Dt:
        raise ValueError(f"t_cols must be [B, Hct, T, Dt] matching t_rows [B, H, T, Dt], got {shapes}")
    for name, x in (("s_cols", s_cols), ("t_cols", t_cols)):
        if x.shape[1] == 0 or H % x.shape[1] != 0:
            raise ValueError(f"{name} heads ({x.shape[1]}) must divide the row heads H={H}, got {shapes}")
    devices = {x.device for x in named.values()}
    if len(devices) != 1:
        raise ValueError(f"s_rows, s_cols, t_rows, t_cols must share one device, got {sorted(map(str, devices))}")
    dtypes = {x.dtype for x in named.values()}
    if len(dtypes) != 1:
        raise ValueError(f"s_rows, s_cols, t_rows, t_cols must share one dtype, got {sorted(map(str, dtypes))}")
    for name, x in (("mask", mask), ("segment_ids", segment_ids)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
        if tuple(x.shape) != (B, T):
            raise ValueError(f"{name} must be [B, T] = {(B, T)}, got shape {tuple(x.shape)}")
        if x.device != s_rows.device:
            raise ValueError(f"{name} is on {x.device} but s_rows is on {s_rows.device}")
        if x.dtype.is_floating_point or x.dtype.is_complex:
            allowed = "bool or integer" if name == "mask" else "integer"
            raise ValueError(f"{name} must be {allowed}, got {x.dtype}")
    if segment_ids is not None and segment_ids.dtype == torch.bool:
        raise ValueError(f"segment_ids must be integer, got {segment_ids.dtype}")
    for name, flag in (("causal", causal), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
