"""Relation KL per row, chunked in plain PyTorch: any device, memory O(B·H·T·D), never a T×T map.

Forward: one online sweep over column chunks per row chunk keeps, per row, the running max and sum of
both softmaxes and A = Σ_j e^(t_j − m_t)·(t_j − s_j), so KL = A/l_t − lse_t + lse_s comes out of one pass.
Backward: recomputes each logit tile from the saved row LSEs, with dL/ds_ij = g_i·(p_s − p_t)_ij.
Everything accumulates in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch


def relation_kl_rows(
    s_rows: torch.Tensor,
    s_cols: torch.Tensor,
    t_rows: torch.Tensor,
    t_cols: torch.Tensor,
    scale_s: float,
    scale_t: float,
    mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """Per-row KL ``[B, H, T]`` (float32, float64 for float64 inputs; 0 on rows not counted).

    Inputs as ``linearard.kernels.relation_kl`` (validated there); ``mask`` is bool or None.
    """
    return _RelationKL.apply(s_rows, s_cols, t_rows, t_cols, scale_s, scale_t, mask, segment_ids, causal)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk(x: torch.Tensor) -> int:
    """Rows (= columns) per tile: a tile of B·H·c² logits stays about 1/8 of one input's elements."""
    B, H, T, D = x.shape
    budget = max(1 << 18, B * H * T * D // 8) // (B * H)
    side = 1 << max(4, int(math.isqrt(max(budget, 1))).bit_length() - 1)
    return min(T, side)


def _logits(rows: torch.Tensor, cols: torch.Tensor, scale: float, acc: torch.dtype) -> torch.Tensor:
    """scale·rows·colsᵀ: rows [B, H, R, D], cols [B, Hc, C, D] → [B, H, R, C]; row head h reads h // (H/Hc)."""
    B, H, R, D = rows.shape
    Hc, C = cols.shape[1], cols.shape[2]
    grouped = rows.to(acc).reshape(B, Hc, (H // Hc) * R, D)
    return torch.matmul(grouped, cols.to(acc).transpose(-1, -2)).view(B, H, R, C).mul_(scale)


def _valid(r0, r1, c0, c1, mask, segment_ids, causal, device) -> torch.Tensor | None:
    """[B or 1, 1, R, C] bool: j valid for row i (causal, real token, same segment); None when all are."""
    valid = None
    if causal and c1 - 1 > r0:
        i = torch.arange(r0, r1, device=device)[:, None]
        j = torch.arange(c0, c1, device=device)[None, :]
        valid = (j <= i)[None, None]
    if mask is not None:
        m = mask[:, None, None, c0:c1]
        valid = m if valid is None else valid & m
    if segment_ids is not None:
        same = (segment_ids[:, r0:r1, None] == segment_ids[:, None, c0:c1])[:, None]
        valid = same if valid is None else valid & same
    return valid


def _col_end(r1: int, T: int, causal: bool) -> int:
    return r1 if causal else T


class _RelationKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_rows, s_cols, t_rows, t_cols, scale_s, scale_t, mask, segment_ids, causal):
        B, H, T, _ = s_rows.shape
        acc = _acc_dtype(s_rows)
        n = _chunk(s_rows if s_rows.shape[-1] >= t_rows.shape[-1] else t_rows)
        kl = torch.zeros(B, H, T, dtype=acc, device=s_rows.device)
        lse_s = torch.empty_like(kl)
        lse_t = torch.empty_like(kl)
        for r0 in range(0, T, n):
            r1 = min(T, r0 + n)
            shape = (B, H, r1 - r0)
            m_s = torch.full(shape, -math.inf, dtype=acc, device=kl.device)
            m_t = m_s.clone()
            l_s = torch.zeros(shape, dtype=acc, device=kl.device)
            l_t = l_s.clone()
            a_t = l_s.clone()
            for c0 in range(0, _col_end(r1, T, causal), n):
                c1 = min(_col_end(r1, T, causal), c0 + n)
                s = _logits(s_rows[:, :, r0:r1], s_cols[:, :, c0:c1], scale_s, acc)
                t = _logits(t_rows[:, :, r0:r1], t_cols[:, :, c0:c1], scale_t, acc)
                valid = _valid(r0, r1, c0, c1, mask, segment_ids, causal, kl.device)
                diff = t - s
                if valid is not None:
                    s.masked_fill_(~valid, -math.inf)
                    t.masked_fill_(~valid, -math.inf)
                    diff.masked_fill_(~valid, 0.0)
                m_t_new = torch.maximum(m_t, t.amax(-1))
                base_t = torch.where(m_t_new.isinf(), 0.0, m_t_new)  # a row with nothing valid yet
                alpha = torch.exp(m_t - base_t)
                p_t = torch.exp(t - base_t[..., None])
                a_t = a_t * alpha + (p_t * diff).sum(-1)
                l_t = l_t * alpha + p_t.sum(-1)
                m_t = m_t_new
                del p_t, t, diff
                m_s_new = torch.maximum(m_s, s.amax(-1))
                base_s = torch.where(m_s_new.isinf(), 0.0, m_s_new)
                l_s = l_s * torch.exp(m_s - base_s) + torch.exp(s - base_s[..., None]).sum(-1)
                m_s = m_s_new
            # A real token's row always has itself as a valid column, so the counted rows are the masked-in ones.
            # Not `l_t > 0`: that is false for NaN and would drop the rows where the teacher is not finite.
            counted = torch.ones_like(l_t, dtype=torch.bool) if mask is None else mask[:, None, r0:r1].expand(shape)
            lse_s_c = m_s + torch.log(l_s)
            lse_t_c = m_t + torch.log(l_t)
            kl[:, :, r0:r1] = torch.where(counted, a_t / l_t - lse_t_c + lse_s_c, 0.0)
            # +inf on rows not counted makes every recomputed p = exp(logit - lse) exactly 0 in the backward.
            lse_s[:, :, r0:r1] = torch.where(counted, lse_s_c, math.inf)
            lse_t[:, :, r0:r1] = torch.where(counted, lse_t_c, math.inf)
        ctx.save_for_backward(s_rows, s_cols, t_rows, t_cols, lse_s, lse_t, mask, segment_ids)
        ctx.scales = (scale_s, scale_t)
        ctx.causal = causal
        ctx.chunk = n
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        s_rows, s_cols, t_rows, t_cols, lse_s, lse_t, mask, segment_ids = ctx.saved_tensors
        scale_s, scale_t = ctx.scales
        causal, n = ctx.causal, ctx.chunk
        B, H, T, Ds = s_rows.shape
        Hc = s_cols.shape[1]
        G = H // Hc
        acc = lse_s.dtype
        need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_rows = torch.zeros(s_rows.shape, dtype=acc, device=s_rows.device) if need_rows else None
        d_cols = torch.zeros(s_cols.shape, dtype=acc, device=s_rows.device) if need_cols else None
        # Rows not counted have lse = +inf, so p_s = p_t = 0 there: whatever grad_kl says, they pass nothing.
        grad = grad_kl.to(acc) * scale_s
        for r0 in range(0, T, n):
            r1 = min(T, r0 + n)
            R = r1 - r0
            rows = s_rows[:, :, r0:r1]
            g = grad[:, :, r0:r1, None]
            d_rows_c = torch.zeros(B, H, R, Ds, dtype=acc, device=s_rows.device) if need_rows else None
            rows_grouped = rows.to(acc).reshape(B, Hc, G * R, Ds) if need_cols else None
            for c0 in range(0, _col_end(r1, T, causal), n):
                c1 = min(_col_end(r1, T, causal), c0 + n)
                cols = s_cols[:, :, c0:c1].to(acc)
                s = _logits(rows, cols, scale_s, acc)
                t = _logits(t_rows[:, :, r0:r1], t_cols[:, :, c0:c1], scale_t, acc)
                valid = _valid(r0, r1, c0, c1, mask, segment_ids, causal, s.device)
                if valid is not None:
                    s.masked_fill_(~valid, -math.inf)
                    t.masked_fill_(~valid, -math.inf)
                d_s = torch.exp(s.sub_(lse_s[:, :, r0:r1, None])).sub_(torch.exp(t.sub_(lse_t[:, :, r0:r1, None])))
                d_s.mul_(g)
                d_s_grouped = d_s.view(B, Hc, G * R, c1 - c0)
                if need_rows:
                    d_rows_c += torch.matmul(d_s_grouped, cols).view(B, H, R, Ds)
                if need_cols:
                    d_cols[:, :, c0:c1] += torch.matmul(d_s_grouped.transpose(-1, -2), rows_grouped)
            if need_rows:
                d_rows[:, :, r0:r1] = d_rows_c
        d_rows = d_rows.to(s_rows.dtype) if need_rows else None
        d_cols = d_cols.to(s_cols.dtype) if need_cols else None
        return d_rows, d_cols, None, None, None, None, None, None, None
