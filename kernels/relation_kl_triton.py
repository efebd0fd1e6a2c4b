"""Relation KL per row in Triton: a FlashAttention-style forward sweep and a column-parallel backward.

Tiles: a program owns BLOCK_M rows (forward) or BLOCK_N columns (backward) of one row head and streams the
other side through in tiles; logits are recomputed, never stored. Logits live in base 2 (scale·log2 e
folded in) so every exponential is one exp2.

Forward (grid: row heads × row tiles, longest tiles launched first): one online sweep keeps, per row,
m_s, l_s, m_t, l_t and A = Σ_j 2^(t_j − m_t)(t_j − s_j); at the end
KL = ln 2 · (A/l_t − lse_t + lse_s). With ``causal`` only tiles left of the diagonal are visited, and only
the diagonal tiles (and the last partial tile) are masked element by element.

Backward (grid: row heads × column tiles): each program keeps dK for its columns in registers and walks down
the rows below the diagonal, recomputing p_s and p_t from the saved row LSEs:
dS = g·(p_s − p_t), dK += dSᵀ·Q_s, dQ += dS·K_s (fp32 atomics). dK is stored once per program (an atomic
add when several row heads share a column head, GQA, or when rows and columns are one tensor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton import knobs

LOG2E = 1.4426950408889634


def _interpreter_numpy_compat() -> None:
    """Triton 3.6's CPU interpreter turns a loop bound into an int with int(1-element array), which NumPy >= 2.4
    rejects; read the element with .item() instead (only under TRITON_INTERPRET=1)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_linearard_compat", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._linearard_compat = True
    interpreter._patch_lang_tensor = patched


if knobs.runtime.interpret:
    _interpreter_numpy_compat()


def _configs(bwd: bool) -> list[triton.Config]:
    if knobs.runtime.interpret:  # the CPU interpreter: one small tile, nothing to tune
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    # (BLOCK_M, BLOCK_N, warps, stages); the backward needs BLOCK_N % BLOCK_M == 0, the forward the reverse.
    # The last two of each list are the small tiles that head size 256 needs (see _prune).
    shapes = [(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 3), (32, 64, 4, 2),
              (16, 64, 4, 2)] if bwd else \
        [(128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """Head size 256 gets only the small tiles (228 KB of shared memory); smaller heads the others."""
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}
    return configs[-2:] if max(args["DSP"], args["DTP"]) >= 256 else configs[:-2]


# Tuned once per head sizes, flags and length bucket (T_TUNE: T rounded up to a power of 2, at most 8192).
_TUNE_KEY = ["DSP", "DTP", "CAUSAL", "HAS_MASK", "HAS_SEG", "T_TUNE"]


@triton.jit
def _load_rows(ptr, offs, T, D: tl.constexpr, DP: tl.constexpr):
    """A [len(offs), DP] tile of a contiguous [T, D] matrix; zeros past T and past D."""
    d = tl.arange(0, DP)
    m = offs[:, None] < T
    if DP != D:
        m = m & (d[None, :] < D)
    return tl.load(ptr + offs[:, None] * D + d[None, :], mask=m, other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _valid(offs_m, offs_n, T, mask_ptr, seg_ptr, seg_m, CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
           HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr):
    """[rows, cols] bool: column j counts for row i (in range, causal, real token, same segment)."""
    ok = offs_n[None, :] >= 0
    if CHECK_BOUNDS:
        ok = ok & (offs_n[None, :] < T)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + offs_n, mask=offs_n < T, other=0) != 0)[None, :]
    if HAS_SEG:
        ok = ok & (tl.load(seg_ptr + offs_n, mask=offs_n < T, other=-1)[None, :] == seg_m[:, None])
    return ok


@triton.jit
def _fwd_tile(q_s, q_t, ks_ptr, kt_ptr, start_n, offs_m, seg_m, T, mask_ptr, seg_ptr, sc_s, sc_t,
              m_s, l_s, m_t, l_t, a_t,
              DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, DTP: tl.constexpr, BLOCK_N: tl.constexpr,
              CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr,
              IEEE: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_s = _load_rows(ks_ptr, offs_n, T, DS, DSP)
    k_t = _load_rows(kt_ptr, offs_n, T, DT, DTP)
    s = _dot(q_s, tl.trans(k_s), IEEE) * sc_s
    t = _dot(q_t, tl.trans(k_t), IEEE) * sc_t
    MASKED: tl.constexpr = CHECK_BOUNDS or HAS_MASK or HAS_SEG
    if MASKED:
        ok = _valid(offs_m, offs_n, T, mask_ptr, seg_ptr, seg_m, CHECK_BOUNDS, CAUSAL, HAS_MASK, HAS_SEG)
        s = tl.where(ok, s, -float("inf"))
        t = tl.where(ok, t, -float("inf"))
    m_t_new = tl.maximum(m_t, tl.max(t, 1))
    m_s_new = tl.maximum(m_s, tl.max(s, 1))
    base_t = m_t_new
    base_s = m_s_new
    if MASKED:  # a row with nothing valid yet keeps max -inf: subtract 0 instead so exp2 gives 0, not NaN
        base_t = tl.where(m_t_new == -float("inf"), 0.0, m_t_new)
        base_s = tl.where(m_s_new == -float("inf"), 0.0, m_s_new)
    p_t = tl.math.exp2(t - base_t[:, None])
    alpha_t = tl.math.exp2(m_t - base_t)
    diff = t - s
    if MASKED:
        diff = tl.where(ok, diff, 0.0)
    a_t = a_t * alpha_t + tl.sum(p_t * diff, 1)
    l_t = l_t * alpha_t + tl.sum(p_t, 1)
    l_s = l_s * tl.math.exp2(m_s - base_s) + tl.sum(tl.math.exp2(s - base_s[:, None]), 1)
    return m_s_new, l_s, m_t_new, l_t, a_t


@triton.autotune(configs=_configs(bwd=False), key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd(SR, SC, TR, TC, MASK, SEG, KL, LSE_S, LSE_T, T, T_TUNE, H, G_S, G_T, sc_s, sc_t,
         DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, DTP: tl.constexpr,
         CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, IEEE: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    start_m = (tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(1)) * BLOCK_M  # longest (causal) tiles first
    b = bh // H
    h = bh % H
    hs = b * (H // G_S) + h // G_S
    ht = b * (H // G_T) + h // G_T
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_s = _load_rows(SR + bh.to(tl.int64) * T * DS, offs_m, T, DS, DSP)
    q_t = _load_rows(TR + bh.to(tl.int64) * T * DT, offs_m, T, DT, DTP)
    ks_ptr = SC + hs.to(tl.int64) * T * DS
    kt_ptr = TC + ht.to(tl.int64) * T * DT
    mask_ptr = MASK + b * T
    seg_ptr = SEG + b * T
    seg_m = offs_m
    if HAS_SEG:
        seg_m = tl.load(seg_ptr + offs_m, mask=offs_m < T, other=-2)
    m_s = tl.full([BLOCK_M], -float("inf"), tl.float32)
    m_t = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    a_t = tl.zeros([BLOCK_M], tl.float32)
    # Unmasked tiles: left of the diagonal (causal) or all full tiles; then the masked ones.
    if CAUSAL:
        end_full = start_m
        end = tl.minimum(start_m + BLOCK_M, T)
    else:
        end_full = (T // BLOCK_N) * BLOCK_N
        end = T
    for start_n in range(0, end_full, BLOCK_N):
        m_s, l_s, m_t, l_t, a_t = _fwd_tile(q_s, q_t, ks_ptr, kt_ptr, start_n, offs_m, seg_m, T, mask_ptr,
                                            seg_ptr, sc_s, sc_t, m_s, l_s, m_t, l_t, a_t, DS, DT, DSP, DTP,
                                            BLOCK_N, False, CAUSAL, HAS_MASK, HAS_SEG, IEEE)
    for start_n in range(end_full, end, BLOCK_N):
        m_s, l_s, m_t, l_t, a_t = _fwd_tile(q_s, q_t, ks_ptr, kt_ptr, start_n, offs_m, seg_m, T, mask_ptr,
                                            seg_ptr, sc_s, sc_t, m_s, l_s, m_t, l_t, a_t, DS, DT, DSP, DTP,
                                            BLOCK_N, True, CAUSAL, HAS_MASK, HAS_SEG, IEEE)
    counted = l_t > 0.0
    if HAS_MASK:
        counted = counted & (tl.load(mask_ptr + offs_m, mask=offs_m < T, other=0) != 0)
    l_t_safe = tl.where(counted, l_t, 1.0)
    lse_s = m_s + tl.math.log2(tl.where(counted, l_s, 1.0))
    lse_t = m_t + tl.math.log2(l_t_safe)
    kl = tl.where(counted, (a_t / l_t_safe - lse_t + lse_s) * 0.6931471805599453, 0.0)
    row = bh.to(tl.int64) * T + offs_m
    tl.store(KL + row, kl, mask=offs_m < T)
    # +inf on rows not counted: every recomputed p = 2^(logit − lse) is 0 there in the backward.
    tl.store(LSE_S + row, tl.where(counted, lse_s, float("inf")), mask=offs_m < T)
    tl.store(LSE_T + row, tl.where(counted, lse_t, float("inf")), mask=offs_m < T)


@triton.jit
def _bwd_tile(k_s, k_t, dk, qs_ptr, qt_ptr, dq_ptr, lse_s_ptr, lse_t_ptr, g_ptr, start_m, offs_n, T,
              key_n, seg_ptr, seg_n, sc_s, sc_t,
              DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, DTP: tl.constexpr, BLOCK_M: tl.constexpr,
              CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr,
              IEEE: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_s = _load_rows(qs_ptr, offs_m, T, DS, DSP)
    q_t = _load_rows(qt_ptr, offs_m, T, DT, DTP)
    # Rows past T read lse = +inf and g = 0: their p and dS are 0.
    lse_s = tl.load(lse_s_ptr + offs_m, mask=offs_m < T, other=float("inf"))
    lse_t = tl.load(lse_t_ptr + offs_m, mask=offs_m < T, other=float("inf"))
    g = tl.load(g_ptr + offs_m, mask=offs_m < T, other=0.0)
    # Transposed tiles [BLOCK_N, BLOCK_M]: columns along dim 0, so dK += dSᵀ·Q needs no transpose of dS.
    s_T = _dot(k_s, tl.trans(q_s), IEEE) * sc_s
    t_T = _dot(k_t, tl.trans(q_t), IEEE) * sc_t
    p_s = tl.math.exp2(s_T - lse_s[None, :])
    p_t = tl.math.exp2(t_T - lse_t[None, :])
    ds_T = (p_s - p_t) * g[None, :]
    if CHECK_BOUNDS or HAS_MASK or HAS_SEG:  # [BLOCK_N, BLOCK_M]: column j valid for row i
        ok = offs_n[:, None] >= 0
        if CHECK_BOUNDS and CAUSAL:
            ok = ok & (offs_n[:, None] <= offs_m[None, :])
        if HAS_MASK:
            ok = ok & key_n[:, None]
        if HAS_SEG:
            ok = ok & (seg_n[:, None] == tl.load(seg_ptr + offs_m, mask=offs_m < T, other=-1)[None, :])
        ds_T = tl.where(ok, ds_T, 0.0)
    ds_T = ds_T.to(q_s.dtype)
    dk = dk + _dot(ds_T, q_s, IEEE)
    dq = _dot(tl.trans(ds_T), k_s, IEEE)
    d = tl.arange(0, DSP)
    tl.atomic_add(dq_ptr + offs_m[:, None] * DS + d[None, :], dq,
                  mask=(offs_m[:, None] < T) & (d[None, :] < DS), sem="relaxed")
    return dk


@triton.autotune(configs=_configs(bwd=True), key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["DQ", "DK"])
@triton.jit
def _bwd(SR, SC, TR, TC, MASK, SEG, LSE_S, LSE_T, G, DQ, DK, T, T_TUNE, H, G_S, G_T, sc_s, sc_t,
         DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, DTP: tl.constexpr,
         CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, IEEE: tl.constexpr,
         DK_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK for one column tile of one row head (G_S row heads share a column head: atomic dK then)."""
    bh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N  # the first column tiles walk the most rows: launched first
    b = bh // H
    h = bh % H
    hs = b * (H // G_S) + h // G_S
    ht = b * (H // G_T) + h // G_T
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_s = _load_rows(SC + hs.to(tl.int64) * T * DS, offs_n, T, DS, DSP)
    k_t = _load_rows(TC + ht.to(tl.int64) * T * DT, offs_n, T, DT, DTP)
    row = bh.to(tl.int64) * T
    qs_ptr = SR + row * DS
    qt_ptr = TR + row * DT
    dq_ptr = DQ + row * DS
    seg_ptr = SEG + b * T
    seg_n = offs_n
    if HAS_SEG:
        seg_n = tl.load(seg_ptr + offs_n, mask=offs_n < T, other=-2)
    key_n = offs_n >= 0
    if HAS_MASK:
        key_n = tl.load(MASK + b * T + offs_n, mask=offs_n < T, other=0) != 0
    dk = tl.zeros([BLOCK_N, DSP], tl.float32)
    # Masked tiles: the diagonal band (causal) rows [start_n, start_n + BLOCK_N); then the full tiles below.
    if CAUSAL:
        begin = start_n
        begin_full = tl.minimum(start_n + BLOCK_N, T)
    else:
        begin = 0
        begin_full = 0
    for start_m in range(begin, begin_full, BLOCK_M):
        dk = _bwd_tile(k_s, k_t, dk, qs_ptr, qt_ptr, dq_ptr, LSE_S + row, LSE_T + row, G + row, start_m, offs_n,
                       T, key_n, seg_ptr, seg_n, sc_s, sc_t, DS, DT, DSP, DTP, BLOCK_M, True, CAUSAL,
                       HAS_MASK, HAS_SEG, IEEE)
    for start_m in range(begin_full, T, BLOCK_M):
        dk = _bwd_tile(k_s, k_t, dk, qs_ptr, qt_ptr, dq_ptr, LSE_S + row, LSE_T + row, G + row, start_m, offs_n,
                       T, key_n, seg_ptr, seg_n, sc_s, sc_t, DS, DT, DSP, DTP, BLOCK_M, False, CAUSAL,
                       HAS_MASK, HAS_SEG, IEEE)
    d = tl.arange(0, DSP)
    ptrs = DK + hs.to(tl.int64) * T * DS + offs_n[:, None] * DS + d[None, :]
    ok = (offs_n[:, None] < T) & (d[None, :] < DS)
    if DK_ATOMIC:
        tl.atomic_add(ptrs, dk, mask=ok, sem="relaxed")
    else:
        tl.store(ptrs, dk.to(DK.dtype.element_ty), mask=ok)


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


class _RelationKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_rows, s_cols, t_rows, t_cols, scale_s, scale_t, mask, segment_ids, causal):
        self_rel = s_cols is s_rows
        s_rows, s_cols, t_rows, t_cols = (x.contiguous() for x in (s_rows, s_cols, t_rows, t_cols))
        B, H, T, Ds = s_rows.shape
        Dt = t_rows.shape[-1]
        mask_i8 = mask.to(torch.int8).contiguous() if mask is not None else None
        seg_i32 = segment_ids.to(torch.int32).contiguous() if segment_ids is not None else None
        kl = torch.empty(B, H, T, dtype=torch.float32, device=s_rows.device)
        lse_s = torch.empty_like(kl)
        lse_t = torch.empty_like(kl)
        meta = dict(T=T, T_TUNE=min(8192, triton.next_power_of_2(T)), H=H, G_S=H // s_cols.shape[1], G_T=H // t_cols.shape[1], sc_s=scale_s * LOG2E,
                    sc_t=scale_t * LOG2E, DS=Ds, DT=Dt, DSP=_pad(Ds), DTP=_pad(Dt), CAUSAL=causal,
                    HAS_MASK=mask is not None, HAS_SEG=segment_ids is not None,
                    IEEE=s_rows.dtype == torch.float32)
        dummy = kl  # never read when the flag is off
        _fwd[lambda c: (B * H, triton.cdiv(T, c["BLOCK_M"]))](
            s_rows, s_cols, t_rows, t_cols, mask_i8 if mask is not None else dummy,
            seg_i32 if segment_ids is not None else dummy, kl, lse_s, lse_t, **meta)
        ctx.save_for_backward(s_rows, s_cols, t_rows, t_cols, mask_i8, seg_i32, lse_s, lse_t)
        ctx.meta = meta
        ctx.self_rel = self_rel
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        s_rows, s_cols, t_rows, t_cols, mask_i8, seg_i32, lse_s, lse_t = ctx.saved_tensors
        meta = ctx.meta
        B, H, T, Ds = s_rows.shape
        # The kernel works in base-2 logits: dL/ds = g·(p_s − p_t)·scale_s, and the exp2 scale is in sc_s.
        g = (grad_kl.float() * (meta["sc_s"] / LOG2E)).contiguous()
        dq = torch.zeros(B, H, T, Ds, dtype=torch.float32, device=s_rows.device)
        dk_atomic = ctx.self_rel or meta["G_S"] > 1
        dk = dq if ctx.self_rel else torch.zeros(  # one buffer for a self-relation: dQ and dK add up in it
            s_cols.shape, dtype=torch.float32 if dk_atomic else s_cols.dtype, device=s_rows.device)
        dummy = lse_s
        _bwd[lambda c: (B * H, triton.cdiv(T, c["BLOCK_N"]))](
            s_rows, s_cols, t_rows, t_cols, mask_i8 if mask_i8 is not None else dummy,
            seg_i32 if seg_i32 is not None else dummy, lse_s, lse_t, g, dq, dk, DK_ATOMIC=dk_atomic, **meta)
        if ctx.self_rel:
            return dq.to(s_rows.dtype), None, None, None, None, None, None, None, None
        return dq.to(s_rows.dtype), dk.to(s_cols.dtype), None, None, None, None, None, None, None


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
    """Per-row KL ``[B, H, T]`` in float32 (0 on rows not counted); inputs as ``relation_kl`` (validated)."""
    return _RelationKL.apply(s_rows, s_cols, t_rows, t_cols, scale_s, scale_t, mask, segment_ids, causal)

