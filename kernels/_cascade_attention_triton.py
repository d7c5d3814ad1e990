"""Triton kernel of `kernels.cascade_attention` (imported only when the Triton backend runs).

`interval_attention_kernel`: one program per (query block, query head). The block's queries each
attend to one key interval [lo, hi); the program streams the key tiles from the smallest lo to the
largest hi of its block (a block of one suffix group reads only that group's keys) with an online
softmax (running max, running sum, rescaled accumulator), so neither the scores nor the probabilities
are written. It stores each query's output and log-sum-exp, which `merge_states` needs to combine
the prefix pass with the suffix pass. fp32 operands for `tl.dot` (the interpreter's bf16 `tl.dot` is
wrong in triton 3.9); grouped-query heads read key head h // group.
"""

import triton
import triton.language as tl


@triton.jit
def interval_attention_kernel(
    q_ptr, k_ptr, v_ptr, lo_ptr, hi_ptr, out_ptr, lse_ptr,
    n_queries, n_keys, dim, group, scaling, softcap,
    sqh, sqn, skh, skn, svh, svn, soh, son, slh,
    HAS_SOFTCAP: tl.constexpr,  # Gemma 2's tanh capping of the scores
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    kv = h // group
    dims = tl.arange(0, BLOCK_D)
    in_rows = rows < n_queries
    lo = tl.load(lo_ptr + rows, mask=in_rows, other=0)
    hi = tl.load(hi_ptr + rows, mask=in_rows, other=0)
    nonempty = hi > lo
    # the block's key span: from the smallest lo to the largest hi of its non-empty intervals
    first = tl.min(tl.where(nonempty, lo, n_keys), axis=0)
    last = tl.max(tl.where(nonempty, hi, 0), axis=0)
    q = tl.load(
        q_ptr + h * sqh + rows[:, None] * sqn + dims[None, :], mask=in_rows[:, None] & (dims[None, :] < dim), other=0.0
    ).to(tl.float32)
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(first, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        in_cols = cols < n_keys
        k = tl.load(
            k_ptr + kv * skh + cols[:, None] * skn + dims[None, :],
            mask=in_cols[:, None] & (dims[None, :] < dim),
            other=0.0,
        ).to(tl.float32)
        v = tl.load(
            v_ptr + kv * svh + cols[:, None] * svn + dims[None, :],
            mask=in_cols[:, None] & (dims[None, :] < dim),
            other=0.0,
        ).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scaling
        if HAS_SOFTCAP:
            s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)  # tanh(s / cap) * cap
        allowed = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        s = tl.where(allowed, s, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(s, axis=1))
        # rows with nothing allowed so far keep max -inf: shift by 0 instead (no inf - inf)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - safe_max)
        p = tl.exp(s - safe_max[:, None])
        running_sum = running_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p, v)
        running_max = new_max
    has_key = running_sum > 0
    out = acc / tl.where(has_key, running_sum, 1.0)[:, None]
    lse = tl.where(has_key, running_max + tl.log(tl.where(has_key, running_sum, 1.0)), float("-inf"))
    inside = in_rows[:, None] & (dims[None, :] < dim)
    tl.store(out_ptr + h * soh + rows[:, None] * son + dims[None, :], out, mask=inside)
    tl.store(lse_ptr + h * slh + rows, lse, mask=in_rows)
