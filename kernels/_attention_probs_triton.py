"""Triton kernels of `kernels.attention_probs` (imported only when the Triton backend runs).

`row_lse_kernel`: one program per (sequence, head, row tile) streams the key tiles and keeps the
online-softmax running max and sum: each row's log-sum-exp, (B, H, S), without writing any scores.
`attention_probs_kernel`: one program per (sequence, row tile, column tile) loops over the heads:
scores of the tile from a (BLOCK_M, d) x (d, BLOCK_N) dot product (fp32 operands: the interpreter's
bf16 `tl.dot` is wrong in triton 3.9), probabilities exp(s - lse), fused over heads in registers and
stored once. Grouped-query heads read key head h // group.
"""

import triton
import triton.language as tl


@triton.jit
def _score_tile(
    q_ptr, k_ptr, mask_ptr, b, h, kv, rows, cols, dims, seq, keys, dim, scaling,
    sqb, sqh, sqs, skb, skh, sks, smb, smi, smj,
    HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Scores q k^T * scaling (+ mask) of one (rows, cols) tile; -inf outside the matrix."""
    q = tl.load(
        q_ptr + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :],
        mask=(rows[:, None] < seq) & (dims[None, :] < dim),
        other=0.0,
    ).to(tl.float32)
    k = tl.load(
        k_ptr + b * skb + kv * skh + cols[:, None] * sks + dims[None, :],
        mask=(cols[:, None] < keys) & (dims[None, :] < dim),
        other=0.0,
    ).to(tl.float32)
    s = tl.dot(q, tl.trans(k)) * scaling
    inside = (rows[:, None] < seq) & (cols[None, :] < keys)
    if HAS_MASK:
        s += tl.load(mask_ptr + b * smb + rows[:, None] * smi + cols[None, :] * smj, mask=inside, other=0.0)
    return tl.where(inside, s, float("-inf"))


@triton.jit
def row_lse_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr, seq, keys, dim, group, scaling,
    sqb, sqh, sqs, skb, skh, sks, smb, smi, smj, slb, slh,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, keys, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _score_tile(
            q_ptr, k_ptr, mask_ptr, b, h, h // group, rows, cols, dims, seq, keys, dim, scaling,
            sqb, sqh, sqs, skb, skh, sks, smb, smi, smj, HAS_MASK,
        )  # fmt: skip
        new_max = tl.maximum(running_max, tl.max(s, axis=1))
        # a tile entirely outside the matrix leaves new_max at -inf: keep the sum, avoid inf - inf
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(s - safe_max[:, None]), axis=1)
        running_max = new_max
    lse = running_max + tl.log(tl.where(rows < seq, running_sum, 1.0))  # rows past the end: not stored
    tl.store(lse_ptr + b * slb + h * slh + rows, lse, mask=rows < seq)


@triton.jit
def attention_probs_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr, out_ptr, seq, keys, dim, heads, group, scaling,
    sqb, sqh, sqs, skb, skh, sks, smb, smi, smj, slb, slh, sob, soi,
    FUSION: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for h in range(0, heads):
        s = _score_tile(
            q_ptr, k_ptr, mask_ptr, b, h, h // group, rows, cols, dims, seq, keys, dim, scaling,
            sqb, sqh, sqs, skb, skh, sks, smb, smi, smj, HAS_MASK,
        )  # fmt: skip
        lse = tl.load(lse_ptr + b * slb + h * slh + rows, mask=rows < seq, other=0.0)
        p = tl.exp(s - lse[:, None])
        if FUSION == 0:
            acc += p
        elif FUSION == 1:
            acc = tl.where(h == 0, p, tl.maximum(acc, p))
        else:
            acc = tl.where(h == 0, p, tl.minimum(acc, p))
    if FUSION == 0:
        acc = acc / heads
    inside = (rows[:, None] < seq) & (cols[None, :] < keys)
    tl.store(out_ptr + b * sob + rows[:, None] * soi + cols[None, :], acc, mask=inside)
