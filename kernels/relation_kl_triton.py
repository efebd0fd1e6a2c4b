"""Relation KL per row in Triton: a FlashAttention-style forward sweep and two backward variants.

Tiles: a row-parallel program owns BLOCK_M rows of one row head and streams the columns through in BLOCK_N
tiles (forward, dQ); a column-parallel program owns BLOCK_N columns and streams the rows through in BLOCK_M
tiles (dK). Logits are recomputed, never stored, and live in base 2 (scale·log2 e folded in) so every
exponential is one exp2.

Launch order: a 1-D grid over heads × tiles, heads in groups sized to the L2 cache (all of them up to 4K),
longest causal tiles first within a group (`_tile_and_head`, `_head_group`).

Forward: one online sweep keeps, per row,
m_s, l_s, m_t, l_t and A = Σ_j 2^(t_j − m_t)(t_j − s_j); at the end
KL = ln 2 · (A/l_t − lse_t + lse_s). With ``causal`` only tiles left of the diagonal are visited, and only
the diagonal tiles (and the last partial tile) are masked element by element.

Backward: p_s and p_t are recomputed from the saved row LSEs, dS = g·(p_s − p_t), dQ = dS·K_s, dK = dSᵀ·Q_s.
- atomic (default below head size 256): one column-parallel pass; each program keeps dK in registers and adds
  every tile's dQ into an fp32 buffer, by one bulk reduction of the Hopper copy engine per tile where it can
  (sm_90+, rows of 16-byte multiples), else by vector atomics (4 matmuls per logit; the order of the adds
  varies from run to run).
- deterministic (asked for, or head size >= 256 where it is also faster): a row-parallel pass keeps dQ in
  registers and stores it once, then a column-parallel pass computes dK only; a program walks all the row heads
  that share its column head (GQA), so every output element has exactly one writer (6 matmuls per logit, no
  atomics, bit-identical runs).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from triton import knobs
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
TWO_PASS_MIN_HEAD = 256  # head sizes from which the backward always takes the deterministic two passes
STATS_PAD = tl.constexpr(128)  # row statistics are padded to a multiple of every row tile: loads need no mask


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


# (BLOCK_M, BLOCK_N, warps, stages). Row-parallel kernels need BLOCK_M % BLOCK_N == 0, the column kernel the
# reverse (the diagonal band is walked in steps of the streamed tile). The second list of each pair is for head
# size 256, whose resident and streamed [tile, 256] operands must fit 228 KB of shared memory.
_TILES = {
    "fwd": ([(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
            [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)]),
    "dq": ([(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
           [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)]),
    "dk": ([(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 2)],
           [(32, 64, 8, 2), (16, 64, 4, 2), (64, 64, 8, 2)]),
}


# Tuned once per head sizes, flags and length bucket (T_TUNE: T rounded up to a power of 2, at most 8192).
_TUNE_KEY = ["DSP", "DTP", "CAUSAL", "HAS_MASK", "HAS_SEG", "T_TUNE"]
# Compiled once for every head count and GQA factor (integers are otherwise specialised on == 1 and % 16);
# T keeps its specialisation (divisible by 16), which aligns the row loads of the [T, D] inputs.
_jit = triton.jit(do_not_specialize=["T_TUNE", "H", "G_S", "G_T", "HEAD_GROUP"])


def _dq_desc_block(nargs) -> None:
    """Give the dQ descriptor (when the kernel gets one) the [1, BLOCK_M, DSP] box of the config being run."""
    if isinstance(nargs.get("DQ_DESC"), TensorDescriptor):
        nargs["DQ_DESC"].block_shape = [1, nargs["BLOCK_M"], nargs["DSP"]]


def _autotune(kernel, tiles: str, reset_to_zero=None):
    """Autotune `kernel` over the _TILES[tiles] list that fits the head size (its first tile alone for T <= 256);
    one small tile when interpreted."""
    def configs(shapes):
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_dq_desc_block)
                for m, n, w, s in shapes]

    if knobs.runtime.interpret:  # the CPU interpreter: nothing to tune
        return triton.autotune(configs=configs([(16, 16, 1, 1)]), key=_TUNE_KEY, reset_to_zero=reset_to_zero)(kernel)
    small, d256 = (configs(shapes) for shapes in _TILES[tiles])

    def prune(candidates, named_args, **kwargs):
        args = {**named_args, **kwargs}
        fitting = [c for c in candidates if (c in d256) == (max(args["DSP"], args["DTP"]) >= 256)] or candidates
        return fitting[:1] if args["T_TUNE"] <= 256 else fitting  # a few tiles per head: not worth compiling all

    return triton.autotune(configs=small + d256, key=_TUNE_KEY, reset_to_zero=reset_to_zero,
                           prune_configs_by={"early_config_prune": prune})(kernel)


# ----------------------------------------------------------------------------------------- shared tile helpers
@triton.jit
def _load_rows(ptr, offs, T, D: tl.constexpr, DP: tl.constexpr):
    """A [len(offs), DP] tile of a contiguous [T, D] matrix; zeros past T and past D."""
    d = tl.arange(0, DP)
    m = offs[:, None] < T
    if DP != D:
        m = m & (d[None, :] < D)
    return tl.load(ptr + offs[:, None] * D + d[None, :], mask=m, other=0.0)


@triton.jit
def _store_rows(ptr, offs, T, x, D: tl.constexpr, DP: tl.constexpr, ATOMIC: tl.constexpr):
    """Store (or fp32 atomic-add) a [len(offs), DP] tile into a contiguous [T, D] matrix, up to T and D."""
    d = tl.arange(0, DP)
    ptrs = ptr + offs[:, None] * D + d[None, :]
    ok = (offs[:, None] < T) & (d[None, :] < D)
    if ATOMIC:
        tl.atomic_add(ptrs, x, mask=ok, sem="relaxed")
    else:
        tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _logits(a_s, b_s, a_t, b_t, sc_s, sc_t, IEEE: tl.constexpr):
    """Base-2 student and teacher logits of a tile, sc·a·bᵀ: [len(a), len(b)]."""
    return _dot(a_s, tl.trans(b_s), IEEE) * sc_s, _dot(a_t, tl.trans(b_t), IEEE) * sc_t


@triton.jit
def _tile_and_head(T, BLOCK: tl.constexpr, HEAD_GROUP):
    """(tile, head) of this program on a 1-D grid over heads × tiles. Heads are taken HEAD_GROUP at a time and,
    within a group, the tiles in order (longest causal work first) with the group's heads fastest: the
    programs running at once share few heads, so the tiles they all stream (and the dQ rows the atomic
    backward adds into) stay in L2 (the host sizes the group to it), while every group still starts its
    longest tiles first."""
    n_tiles = tl.cdiv(T, BLOCK)
    pid = tl.program_id(0)
    first = pid // (HEAD_GROUP * n_tiles) * HEAD_GROUP
    size = tl.minimum(HEAD_GROUP, tl.num_programs(0) // n_tiles - first)  # the last group may be smaller
    r = pid - first * n_tiles
    return r // size, first + r % size


@triton.jit
def _heads(bh, H, G_S, G_T):
    """Batch index, student column head and teacher column head of row head bh (flat over B·H)."""
    b = bh // H
    h = bh % H
    return b, b * (H // G_S) + h // G_S, b * (H // G_T) + h // G_T


@triton.jit
def _load_real(mask_ptr, offs, T, HAS_MASK: tl.constexpr):
    """Key mask of positions offs (all true without a mask)."""
    real = offs >= 0
    if HAS_MASK:
        real = tl.load(mask_ptr + offs, mask=offs < T, other=0) != 0
    return real


@triton.jit
def _load_seg(seg_ptr, offs, T, HAS_SEG: tl.constexpr):
    """Segment ids of positions offs (unused without segments)."""
    seg = offs
    if HAS_SEG:
        seg = tl.load(seg_ptr + offs, mask=offs < T, other=-1)
    return seg


@triton.jit
def _valid(i, j, seg_i, seg_j, real_j, T, CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
           HAS_SEG: tl.constexpr):
    """Column j counts for row i (in range, causal, real token, same segment). The arguments come broadcast,
    [M, 1] rows with [1, N] columns or the transpose, so row-major and transposed tiles share this."""
    ok = real_j
    if CHECK_BOUNDS:
        ok = ok & (j < T)
        if CAUSAL:
            ok = ok & (j <= i)
    if HAS_SEG:
        ok = ok & (seg_j == seg_i)
    return ok


@triton.jit
def _valid_row_tile(offs_m, seg_m, offs_n, mask_ptr, seg_ptr, T, CHECK_BOUNDS: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr):
    """[BLOCK_M, BLOCK_N] validity of a row-parallel tile; the columns' mask and segments are loaded here."""
    return _valid(offs_m[:, None], offs_n[None, :], seg_m[:, None],
                  _load_seg(seg_ptr, offs_n, T, HAS_SEG)[None, :], _load_real(mask_ptr, offs_n, T, HAS_MASK)[None, :],
                  T, CHECK_BOUNDS, CAUSAL, HAS_SEG)


@triton.jit
def _col_range(start_m, T, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column tiles of a row tile: [0, end_full) need no element mask, [end_full, end) do (the diagonal tiles,
    or the last partial tile when not causal)."""
    if CAUSAL:
        end_full = start_m
        end = tl.minimum(start_m + BLOCK_M, T)
    else:
        end_full = (T // BLOCK_N) * BLOCK_N
        end = T
    return end_full, end


@triton.jit
def _stats_row(bh, T):
    """Offset of row head bh in the [B·H, T padded to STATS_PAD] row statistics (LSEs, incoming grads)."""
    return bh.to(tl.int64) * (tl.cdiv(T, STATS_PAD) * STATS_PAD)


@triton.jit
def _load_row_grads(lse_s_ptr, lse_t_ptr, g_ptr, offs):
    """Saved row LSEs and incoming grads. No mask: the arrays are padded past T with lse = +inf and g = 0, so
    the p and dS of rows past T are 0."""
    return tl.load(lse_s_ptr + offs), tl.load(lse_t_ptr + offs), tl.load(g_ptr + offs)


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_tile(q_s, q_t, ks_ptr, kt_ptr, mask_ptr, seg_ptr, start_n, offs_m, seg_m, T, sc_s, sc_t,
              m_s, l_s, m_t, l_t, a_t,
              DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, DTP: tl.constexpr, BLOCK_N: tl.constexpr,
              CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr,
              IEEE: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s, t = _logits(q_s, _load_rows(ks_ptr, offs_n, T, DS, DSP), q_t, _load_rows(kt_ptr, offs_n, T, DT, DTP),
                   sc_s, sc_t, IEEE)
    MASKED: tl.constexpr = CHECK_BOUNDS or HAS_MASK or HAS_SEG
    if MASKED:
        ok = _valid_row_tile(offs_m, seg_m, offs_n, mask_ptr, seg_ptr, T, CHECK_BOUNDS, CAUSAL, HAS_MASK, HAS_SEG)
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
    if MASKED:  # -inf − -inf
        diff = tl.where(ok, diff, 0.0)
    a_t = a_t * alpha_t + tl.sum(p_t * diff, 1)
    l_t = l_t * alpha_t + tl.sum(p_t, 1)
    l_s = l_s * tl.math.exp2(m_s - base_s) + tl.sum(tl.math.exp2(s - base_s[:, None]), 1)
    return m_s_new, l_s, m_t_new, l_t, a_t


@triton.jit
def _row_tile(SR, SC, TR, TC, MASK, SEG, T, H, G_S, G_T, HEAD_GROUP, DS: tl.constexpr, DT: tl.constexpr,
              DSP: tl.constexpr, DTP: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr):
    """What a row-parallel program (forward, dQ) starts from: its rows (longest causal tiles launched first),
    their Q tiles and segment ids, the pointers to its column heads, key mask and segment ids, and the offset
    of its row statistics."""
    tile, bh = _tile_and_head(T, BLOCK_M, HEAD_GROUP)
    start_m = (tl.cdiv(T, BLOCK_M) - 1 - tile) * BLOCK_M
    b, hs, ht = _heads(bh, H, G_S, G_T)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row = bh.to(tl.int64) * T
    q_s = _load_rows(SR + row * DS, offs_m, T, DS, DSP)
    q_t = _load_rows(TR + row * DT, offs_m, T, DT, DTP)
    seg_ptr = SEG + b * T
    return (start_m, offs_m, row, q_s, q_t, SC + hs.to(tl.int64) * T * DS, TC + ht.to(tl.int64) * T * DT,
            MASK + b * T, seg_ptr, _load_seg(seg_ptr, offs_m, T, HAS_SEG), _stats_row(bh, T))


@_jit
def _fwd_kernel(SR, SC, TR, TC, MASK, SEG, KL, LSE_S, LSE_T, T, T_TUNE, H, G_S, G_T, HEAD_GROUP, sc_s, sc_t,
                DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, DTP: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """KL and both LSEs of one row tile of one row head."""
    start_m, offs_m, row, q_s, q_t, ks_ptr, kt_ptr, mask_ptr, seg_ptr, seg_m, stats = _row_tile(
        SR, SC, TR, TC, MASK, SEG, T, H, G_S, G_T, HEAD_GROUP, DS, DT, DSP, DTP, HAS_SEG, BLOCK_M)
    m_s = tl.full([BLOCK_M], -float("inf"), tl.float32)
    m_t = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    a_t = tl.zeros([BLOCK_M], tl.float32)
    end_full, end = _col_range(start_m, T, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, end_full, BLOCK_N):
        m_s, l_s, m_t, l_t, a_t = _fwd_tile(q_s, q_t, ks_ptr, kt_ptr, mask_ptr, seg_ptr, start_n, offs_m, seg_m, T,
                                            sc_s, sc_t, m_s, l_s, m_t, l_t, a_t, DS, DT, DSP, DTP, BLOCK_N, False,
                                            CAUSAL, HAS_MASK, HAS_SEG, IEEE)
    for start_n in range(end_full, end, BLOCK_N):
        m_s, l_s, m_t, l_t, a_t = _fwd_tile(q_s, q_t, ks_ptr, kt_ptr, mask_ptr, seg_ptr, start_n, offs_m, seg_m, T,
                                            sc_s, sc_t, m_s, l_s, m_t, l_t, a_t, DS, DT, DSP, DTP, BLOCK_N, True,
                                            CAUSAL, HAS_MASK, HAS_SEG, IEEE)
    # A real token's row always has itself as a valid column: the counted rows are the masked-in ones (not
    # `l_t > 0`, which is false for NaN and would drop the rows where the teacher is not finite).
    counted = _load_real(mask_ptr, offs_m, T, HAS_MASK)
    l_t_safe = tl.where(counted, l_t, 1.0)
    lse_s = m_s + tl.math.log2(tl.where(counted, l_s, 1.0))
    lse_t = m_t + tl.math.log2(l_t_safe)
    kl = tl.where(counted, (a_t / l_t_safe - lse_t + lse_s) * 0.6931471805599453, 0.0)
    rows = row + offs_m
    tl.store(KL + rows, kl, mask=offs_m < T)
    # +inf on rows not counted: every recomputed p = 2^(logit − lse) is 0 there in the backward.
    tl.store(LSE_S + stats + offs_m, tl.where(counted, lse_s, float("inf")), mask=offs_m < T)
    tl.store(LSE_T + stats + offs_m, tl.where(counted, lse_t, float("inf")), mask=offs_m < T)


# ------------------------------------------------------------------------------ backward, row-parallel dQ
@triton.jit
def _dq_tile(dq, q_s, q_t, ks_ptr, kt_ptr, mask_ptr, seg_ptr, start_n, offs_m, seg_m, lse_s, lse_t, g, T,
             sc_s, sc_t,
             DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, DTP: tl.constexpr, BLOCK_N: tl.constexpr,
             CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr,
             IEEE: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_s = _load_rows(ks_ptr, offs_n, T, DS, DSP)
    s, t = _logits(q_s, k_s, q_t, _load_rows(kt_ptr, offs_n, T, DT, DTP), sc_s, sc_t, IEEE)
    ds = (tl.math.exp2(s - lse_s[:, None]) - tl.math.exp2(t - lse_t[:, None])) * g[:, None]
    if CHECK_BOUNDS or HAS_MASK or HAS_SEG:
        ok = _valid_row_tile(offs_m, seg_m, offs_n, mask_ptr, seg_ptr, T, CHECK_BOUNDS, CAUSAL, HAS_MASK, HAS_SEG)
        ds = tl.where(ok, ds, 0.0)
    return dq + _dot(ds.to(k_s.dtype), k_s, IEEE)


@_jit
def _dq_kernel(SR, SC, TR, TC, MASK, SEG, LSE_S, LSE_T, G, DQ, T, T_TUNE, H, G_S, G_T, HEAD_GROUP, sc_s, sc_t,
               DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, DTP: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one row tile of one row head, walked like the forward and stored once (no atomics)."""
    start_m, offs_m, row, q_s, q_t, ks_ptr, kt_ptr, mask_ptr, seg_ptr, seg_m, stats = _row_tile(
        SR, SC, TR, TC, MASK, SEG, T, H, G_S, G_T, HEAD_GROUP, DS, DT, DSP, DTP, HAS_SEG, BLOCK_M)
    lse_s, lse_t, g = _load_row_grads(LSE_S + stats, LSE_T + stats, G + stats, offs_m)
    dq = tl.zeros([BLOCK_M, DSP], tl.float32)
    end_full, end = _col_range(start_m, T, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, end_full, BLOCK_N):
        dq = _dq_tile(dq, q_s, q_t, ks_ptr, kt_ptr, mask_ptr, seg_ptr, start_n, offs_m, seg_m, lse_s, lse_t, g, T,
                      sc_s, sc_t, DS, DT, DSP, DTP, BLOCK_N, False, CAUSAL, HAS_MASK, HAS_SEG, IEEE)
    for start_n in range(end_full, end, BLOCK_N):
        dq = _dq_tile(dq, q_s, q_t, ks_ptr, kt_ptr, mask_ptr, seg_ptr, start_n, offs_m, seg_m, lse_s, lse_t, g, T,
                      sc_s, sc_t, DS, DT, DSP, DTP, BLOCK_N, True, CAUSAL, HAS_MASK, HAS_SEG, IEEE)
    _store_rows(DQ + row * DS, offs_m, T, dq, DS, DSP, False)


# ------------------------------------------------------------------------ backward, column-parallel dK
@triton.jit
def _dk_tile(dk, k_s, k_t, qs_ptr, qt_ptr, dq_ptr, dq_desc, bh, lse_s_ptr, lse_t_ptr, g_ptr, seg_ptr, start_m,
             offs_n, seg_n, real_n, T, sc_s, sc_t,
             DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, DTP: tl.constexpr, BLOCK_M: tl.constexpr,
             CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr,
             IEEE: tl.constexpr, DQ_ATOMIC: tl.constexpr, DQ_TMA: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_s = _load_rows(qs_ptr, offs_m, T, DS, DSP)
    lse_s, lse_t, g = _load_row_grads(lse_s_ptr, lse_t_ptr, g_ptr, offs_m)
    # Transposed tiles [BLOCK_N, BLOCK_M]: columns along dim 0, so dK += dSᵀ·Q needs no transpose of dS.
    s_T, t_T = _logits(k_s, q_s, k_t, _load_rows(qt_ptr, offs_m, T, DT, DTP), sc_s, sc_t, IEEE)
    ds_T = (tl.math.exp2(s_T - lse_s[None, :]) - tl.math.exp2(t_T - lse_t[None, :])) * g[None, :]
    if CHECK_BOUNDS or HAS_MASK or HAS_SEG:
        ok = _valid(offs_m[None, :], offs_n[:, None], _load_seg(seg_ptr, offs_m, T, HAS_SEG)[None, :],
                    seg_n[:, None], real_n[:, None], T, CHECK_BOUNDS, CAUSAL, HAS_SEG)
        ds_T = tl.where(ok, ds_T, 0.0)
    ds_T = ds_T.to(q_s.dtype)
    dk = dk + _dot(ds_T, q_s, IEEE)
    if DQ_ATOMIC:  # as FlashAttention-2: many column programs add into the same dQ rows
        dq = _dot(tl.trans(ds_T), k_s, IEEE)
        if DQ_TMA:  # one bulk reduction by the copy engine instead of a vector atomic per 4 elements
            dq_desc.atomic_add([bh, start_m, 0], tl.reshape(dq, [1, BLOCK_M, DSP]))
        else:
            _store_rows(dq_ptr, offs_m, T, dq, DS, DSP, True)
    return dk


@_jit
def _dk_kernel(SR, SC, TR, TC, MASK, SEG, LSE_S, LSE_T, G, DQ, DQ_DESC, DK, T, T_TUNE, H, G_S, G_T, HEAD_GROUP,
               sc_s, sc_t, DS: tl.constexpr, DT: tl.constexpr, DSP: tl.constexpr, DTP: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SEG: tl.constexpr, IEEE: tl.constexpr,
               NH: tl.constexpr, DQ_ATOMIC: tl.constexpr, DQ_TMA: tl.constexpr, DK_ATOMIC: tl.constexpr,
               ADD_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK of one column tile, summed over NH consecutive row heads of its column head (1, or all G_S of them).

    DQ_ATOMIC: also add every tile's dQ into DQ (fp32), by bulk reductions through DQ_DESC if DQ_TMA.
    DK_ATOMIC: add dK into DK (fp32) instead of storing it (row heads of one column head in other programs, or a
    self-relation sharing DQ's buffer). ADD_DQ: a self-relation's complete dQ of these rows is in DQ; add it to
    dK before the store.
    """
    tile, head = _tile_and_head(T, BLOCK_N, HEAD_GROUP)
    start_n = tile * BLOCK_N  # the first column tiles walk the most rows: launched first
    b = head // (H // NH)
    h0 = b * H + head % (H // NH) * NH  # first row head, flat over B·H
    _, hs, _ = _heads(h0, H, G_S, G_T)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_s = _load_rows(SC + hs.to(tl.int64) * T * DS, offs_n, T, DS, DSP)
    seg_ptr = SEG + b * T
    seg_n = _load_seg(seg_ptr, offs_n, T, HAS_SEG)
    real_n = _load_real(MASK + b * T, offs_n, T, HAS_MASK)
    # Rows at or below the diagonal: the band [begin, begin_full) needs the element mask, the rest does not.
    if CAUSAL:
        begin = start_n
        begin_full = tl.minimum(start_n + BLOCK_N, T)
    else:
        begin = 0
        begin_full = 0
    dk = tl.zeros([BLOCK_N, DSP], tl.float32)
    for i in range(NH):
        bh = h0 + i
        _, _, ht = _heads(bh, H, G_S, G_T)
        k_t = _load_rows(TC + ht.to(tl.int64) * T * DT, offs_n, T, DT, DTP)
        row = bh.to(tl.int64) * T
        stats = _stats_row(bh, T)
        for start_m in range(begin, begin_full, BLOCK_M):
            dk = _dk_tile(dk, k_s, k_t, SR + row * DS, TR + row * DT, DQ + row * DS, DQ_DESC, bh, LSE_S + stats,
                          LSE_T + stats, G + stats, seg_ptr, start_m, offs_n, seg_n, real_n, T, sc_s, sc_t, DS, DT,
                          DSP, DTP, BLOCK_M, True, CAUSAL, HAS_MASK, HAS_SEG, IEEE, DQ_ATOMIC, DQ_TMA)
        for start_m in range(begin_full, T, BLOCK_M):
            dk = _dk_tile(dk, k_s, k_t, SR + row * DS, TR + row * DT, DQ + row * DS, DQ_DESC, bh, LSE_S + stats,
                          LSE_T + stats, G + stats, seg_ptr, start_m, offs_n, seg_n, real_n, T, sc_s, sc_t, DS, DT,
                          DSP, DTP, BLOCK_M, False, CAUSAL, HAS_MASK, HAS_SEG, IEEE, DQ_ATOMIC, DQ_TMA)
    if ADD_DQ:  # self-relation: this program alone owns these rows of DQ, and the dQ pass has finished
        dk += _load_rows(DQ + hs.to(tl.int64) * T * DS, offs_n, T, DS, DSP)
    _store_rows(DK + hs.to(tl.int64) * T * DS, offs_n, T, dk, DS, DSP, DK_ATOMIC)


_fwd = _autotune(_fwd_kernel, "fwd")
_dq = _autotune(_dq_kernel, "dq")
_dk = _autotune(_dk_kernel, "dk")
# The same column kernel with dQ atomics: its fp32 accumulators must start from zero for every tuning run.
_dk_dq_atomic = _autotune(_dk_kernel, "dk", reset_to_zero=["DQ", "DK"])


_DQ_TMA = True  # False sends dQ through vector atomics everywhere (benchmarks/relation_kl_tiles.py compares)


def _use_tma(dq: torch.Tensor) -> bool:
    """dQ reductions through the Hopper copy engine: sm_90+, and rows of 16-byte multiples (its stride rule)."""
    return (_DQ_TMA and dq.is_cuda and not knobs.runtime.interpret
            and torch.cuda.get_device_capability(dq.device)[0] >= 9 and dq.shape[-1] % 4 == 0)


def _head_group(T: int, heads: int, bytes_per_position: int, device: torch.device) -> int:
    """Heads per launch group (`_tile_and_head`). Up to 4K all of them, so every head's longest tiles go first
    (balance beats locality there); from 8K as many as half the L2 cache holds, counting per head the streamed
    tiles of both relations and the fp32 dQ rows (bytes_per_position · T): one head from 16K on (H100, H=32,
    D=128, measured against one group of all heads and groups of one: docs/kernel.md)."""
    if T <= 4096 or device.type != "cuda":
        return heads
    return max(1, min(heads, _l2_bytes(device) // 2 // (bytes_per_position * T)))


@functools.cache
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


def _stats_len(T: int) -> int:
    return triton.cdiv(T, STATS_PAD.value) * STATS_PAD.value


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


class _RelationKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_rows, s_cols, t_rows, t_cols, scale_s, scale_t, mask, segment_ids, causal, deterministic):
        self_rel = s_cols is s_rows
        s_rows, s_cols, t_rows, t_cols = (x.contiguous() for x in (s_rows, s_cols, t_rows, t_cols))
        B, H, T, Ds = s_rows.shape
        Dt = t_rows.shape[-1]
        mask_i8 = mask.to(torch.int8).contiguous() if mask is not None else None
        seg_i32 = segment_ids.to(torch.int32).contiguous() if segment_ids is not None else None
        kl = torch.empty(B, H, T, dtype=torch.float32, device=s_rows.device)
        # Row LSEs [B·H, T padded]: the padding stays +inf (p = 0 there), so the kernels load them unmasked.
        lse_s, lse_t = torch.full((2, B * H, _stats_len(T)), float("inf"), dtype=torch.float32, device=s_rows.device)
        meta = dict(T=T, T_TUNE=min(8192, triton.next_power_of_2(T)), H=H, G_S=H // s_cols.shape[1],
                    G_T=H // t_cols.shape[1], sc_s=scale_s * LOG2E, sc_t=scale_t * LOG2E, DS=Ds, DT=Dt,
                    DSP=_pad(Ds), DTP=_pad(Dt), CAUSAL=causal, HAS_MASK=mask is not None,
                    HAS_SEG=segment_ids is not None, IEEE=s_rows.dtype == torch.float32,
                    HEAD_GROUP=_head_group(T, B * H, s_rows.element_size() * (Ds + Dt) + 4 * Ds,
                                               s_rows.device))
        dummy = kl  # never read when the flag is off
        _fwd[lambda c: (B * H * triton.cdiv(T, c["BLOCK_M"]),)](
            s_rows, s_cols, t_rows, t_cols, mask_i8 if mask is not None else dummy,
            seg_i32 if segment_ids is not None else dummy, kl, lse_s, lse_t, **meta)
        ctx.save_for_backward(s_rows, s_cols, t_rows, t_cols, mask_i8, seg_i32, lse_s, lse_t)
        ctx.meta = meta
        ctx.self_rel = self_rel
        ctx.deterministic = deterministic
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        s_rows, s_cols, t_rows, t_cols, mask_i8, seg_i32, lse_s, lse_t = ctx.saved_tensors
        meta, self_rel = ctx.meta, ctx.self_rel
        B, H, T, _ = s_rows.shape
        G_S = meta["G_S"]
        # The kernels work in base-2 logits: dL/ds = g·(p_s − p_t)·scale_s, and the exp2 scale is in sc_s.
        g = torch.zeros_like(lse_s)  # padded like the LSEs, with 0
        g[:, :T] = grad_kl.reshape(B * H, T) * (meta["sc_s"] / LOG2E)
        args = (s_rows, s_cols, t_rows, t_cols, mask_i8 if mask_i8 is not None else lse_s,
                seg_i32 if seg_i32 is not None else lse_s, lse_s, lse_t, g)
        device = s_rows.device
        # The atomic dQ traffic grows with the head size: at D >= 256 the two-pass backward is faster as well
        # (H100, T=8K: 15.7 vs 24.7 ms, benchmarks/results), so it is used there whatever the flag says.
        if ctx.deterministic or max(meta["DS"], meta["DT"]) >= TWO_PASS_MIN_HEAD:
            # Every element of dQ and dK is stored by one program: no zero fill, no atomics. A self-relation's
            # dQ stays fp32 until the dK pass adds it to its dK (rounded once).
            dq = torch.empty(s_rows.shape, dtype=torch.float32 if self_rel else s_rows.dtype, device=device)
            _dq[lambda c: (B * H * triton.cdiv(T, c["BLOCK_M"]),)](*args, dq, **meta)
            dk = torch.empty(s_cols.shape, dtype=s_cols.dtype, device=device)
            _dk[lambda c: (B * H // G_S * triton.cdiv(T, c["BLOCK_N"]),)](
                *args, dq, dq, dk, NH=G_S, DQ_ATOMIC=False, DQ_TMA=False, DK_ATOMIC=False, ADD_DQ=self_rel, **meta)
            grads = (dk, None) if self_rel else (dq, dk)
        else:
            dq = torch.zeros(s_rows.shape, dtype=torch.float32, device=device)
            dk_atomic = self_rel or G_S > 1
            dk = dq if self_rel else torch.zeros(  # one buffer for a self-relation: dQ and dK add up in it
                s_cols.shape, dtype=torch.float32 if dk_atomic else s_cols.dtype, device=device)
            dq_tma = _use_tma(dq)
            dq_desc = TensorDescriptor(dq, [B * H, T, dq.shape[-1]], [T * dq.shape[-1], dq.shape[-1], 1],
                                       [1, 16, meta["DSP"]]) if dq_tma else dq  # box set per tile by the hook
            _dk_dq_atomic[lambda c: (B * H * triton.cdiv(T, c["BLOCK_N"]),)](
                *args, dq, dq_desc, dk, NH=1, DQ_ATOMIC=True, DQ_TMA=dq_tma, DK_ATOMIC=dk_atomic, ADD_DQ=False,
                **meta)
            grads = (dq.to(s_rows.dtype), None) if self_rel else (dq.to(s_rows.dtype), dk.to(s_cols.dtype))
        return *grads, None, None, None, None, None, None, None, None


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
    deterministic: bool = False,
) -> torch.Tensor:
    """Per-row KL ``[B, H, T]`` in float32 (0 on rows not counted); inputs as ``relation_kl`` (validated).

    ``deterministic`` picks the backward without atomics (bit-identical gradients from run to run)."""
    return _RelationKL.apply(s_rows, s_cols, t_rows, t_cols, scale_s, scale_t, mask, segment_ids, causal,
                             deterministic)
