"""Triton kernels of `kernels.rollout` (imported only when the Triton backend runs).

Kernels live at module level: Triton resolves a called `@triton.jit` helper through module globals.
Per layer and per (sequence, tile) program: load each head's tile of A, fuse heads (mean/max/min),
apply the discard threshold and row scale from the pre-pass (e_i for an emptied row), add the
residual, and accumulate the product. Memory traffic per layer: read B*H*S*S attention once per
output tile column (row variant: once), read/write the (B, S) vector or (B, S, S) rollout; the fused
matrix is never written.
"""

import triton
import triton.language as tl


@triton.jit
def _fused_tile(
    attn_ptr,
    b,
    rows,
    cols,
    n,
    stride_b,
    stride_h,
    stride_i,
    stride_j,
    thr,
    scale_ptr,
    empty_ptr,
    stride_sb,
    H: tl.constexpr,  # heads, fused while loading
    FUSION: tl.constexpr,  # 0 mean, 1 max, 2 min
):
    """A' tile without the residual: fuse heads, threshold, scale rows, e_i for empty rows."""
    inside = (rows[:, None] < n) & (cols[None, :] < n)
    base = attn_ptr + b * stride_b + rows[:, None] * stride_i + cols[None, :] * stride_j
    acc = tl.load(base, mask=inside, other=0.0).to(tl.float32)
    for h in range(1, H):
        x = tl.load(base + h * stride_h, mask=inside, other=0.0).to(tl.float32)
        if FUSION == 0:
            acc += x
        elif FUSION == 1:
            acc = tl.maximum(acc, x)
        else:
            acc = tl.minimum(acc, x)
    if FUSION == 0:
        acc = acc / H
    acc = tl.where(acc >= thr, acc, 0.0)
    row_scale = tl.load(scale_ptr + b * stride_sb + rows, mask=rows < n, other=0.0)
    row_empty = tl.load(empty_ptr + b * stride_sb + rows, mask=rows < n, other=0)
    acc = acc * row_scale[:, None]
    diag = (rows[:, None] == cols[None, :]) & (row_empty[:, None] != 0)
    return tl.where(inside, tl.where(diag, 1.0, acc), 0.0)


@triton.jit
def rollout_row_step(
    attn_ptr,
    v_in_ptr,
    v_out_ptr,
    len_ptr,
    thr_ptr,
    scale_ptr,
    empty_ptr,
    S,
    stride_b,
    stride_h,
    stride_i,
    stride_j,
    stride_vb,
    stride_sb,
    H: tl.constexpr,
    FUSION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,  # tile sizes: speed only
):
    """v_out[b, j] = 0.5 * sum_i v_in[b, i] A'[i, j] + 0.5 * v_in[b, j] over one J block."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    n = tl.load(len_ptr + b)
    thr = tl.load(thr_ptr + b)
    acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for start in range(0, S, BLOCK_I):
        rows = start + tl.arange(0, BLOCK_I)
        tile = _fused_tile(
            attn_ptr,
            b,
            rows,
            cols,
            n,
            stride_b,
            stride_h,
            stride_i,
            stride_j,
            thr,
            scale_ptr,
            empty_ptr,
            stride_sb,
            H,
            FUSION,
        )
        v = tl.load(v_in_ptr + b * stride_vb + rows, mask=rows < n, other=0.0)
        acc += tl.sum(v[:, None] * tile, axis=0)
    v_self = tl.load(v_in_ptr + b * stride_vb + cols, mask=cols < n, other=0.0)
    out = tl.where(cols < n, 0.5 * acc + 0.5 * v_self, 0.0)
    tl.store(v_out_ptr + b * stride_vb + cols, out, mask=cols < S)


@triton.jit
def rollout_full_step(
    attn_ptr,
    r_in_ptr,
    r_out_ptr,
    len_ptr,
    thr_ptr,
    scale_ptr,
    empty_ptr,
    S,
    stride_b,
    stride_h,
    stride_i,
    stride_j,
    stride_rb,
    stride_ri,
    stride_sb,
    H: tl.constexpr,
    FUSION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,  # tile sizes: speed only (BLOCK_N = BLOCK_K)
):
    """R_out = (0.5 F' + 0.5 I) @ R_in for one (M, N) tile: F' is fused on load, never stored."""
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = tl.load(len_ptr + b)
    thr = tl.load(thr_ptr + b)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for start in range(0, S, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        a = _fused_tile(
            attn_ptr,
            b,
            rows,
            ks,
            n,
            stride_b,
            stride_h,
            stride_i,
            stride_j,
            thr,
            scale_ptr,
            empty_ptr,
            stride_sb,
            H,
            FUSION,
        )
        r_mask = (ks[:, None] < n) & (cols[None, :] < n)
        r = tl.load(r_in_ptr + b * stride_rb + ks[:, None] * stride_ri + cols[None, :], mask=r_mask, other=0.0)
        acc += tl.dot(a, r.to(tl.float32))  # fp32 operands: the interpreter's bf16 dot is wrong
    out_mask = (rows[:, None] < n) & (cols[None, :] < n)
    r_self = tl.load(r_in_ptr + b * stride_rb + rows[:, None] * stride_ri + cols[None, :], mask=out_mask, other=0.0)
    out = tl.where(out_mask, 0.5 * acc + 0.5 * r_self, 0.0)
    store_mask = (rows[:, None] < S) & (cols[None, :] < S)
    tl.store(r_out_ptr + b * stride_rb + rows[:, None] * stride_ri + cols[None, :], out, mask=store_mask)
