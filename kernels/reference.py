"""Dense float64 reference of the relation KL: the T×T maps in full, written independently of the op (for tests
and the benchmark's dense baseline; never for training)."""

from __future__ import annotations

import math

import torch


def relation_kl_dense(s_rows, s_cols, t_rows, t_cols, *, scale_s=None, scale_t=None, mask=None,
                      segment_ids=None, causal=True, reduction="sum", compute_dtype=torch.float64):
    """Same contract as ``linearard.kernels.relation_kl``, computed with full T×T maps (float64 by default;
    the benchmark's dense baseline passes float32)."""
    B, H, T, Ds = s_rows.shape
    Dt = t_rows.shape[-1]
    scale_s = 1 / math.sqrt(Ds) if scale_s is None else scale_s
    scale_t = 1 / math.sqrt(Dt) if scale_t is None else scale_t

    def logits(rows, cols, scale):
        cols = cols.to(compute_dtype).repeat_interleave(H // cols.shape[1], dim=1)
        return scale * rows.to(compute_dtype) @ cols.transpose(-1, -2)

    valid = torch.ones(B, 1, T, T, dtype=torch.bool, device=s_rows.device)
    if causal:
        valid &= torch.ones(T, T, dtype=torch.bool, device=s_rows.device).tril()
    if mask is not None:
        valid &= (mask != 0)[:, None, None, :]
    if segment_ids is not None:
        valid &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    counted = valid.any(-1)  # [B, 1, T]
    if mask is not None:
        counted &= (mask != 0)[:, None, :]
    safe = valid | ~valid.any(-1, keepdim=True)  # rows with nothing valid: any finite softmax, zeroed below
    lp_s = torch.where(valid, logits(s_rows, s_cols, scale_s).masked_fill(~safe, -math.inf).log_softmax(-1), 0.0)
    lp_t = torch.where(valid, logits(t_rows, t_cols, scale_t).masked_fill(~safe, -math.inf).log_softmax(-1), 0.0)
    kl = torch.where(valid, lp_t.exp() * (lp_t - lp_s), 0.0).sum(-1)
    kl = torch.where(counted, kl, 0.0)
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    return kl.sum() / (counted.sum() * H).clamp(min=1)
