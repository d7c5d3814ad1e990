"""Head-fused attention probabilities recomputed from queries and keys, without eager attention.

    from kernels.attention_probs import attention_probs
    fused = attention_probs(query, key, head_fusion="mean", mask=None, scaling=None, lse=None, backend="auto")

`query` (B, Hq, S, d) and `key` (B, Hkv, K, d) are the post-rotary states a model's attention call
receives (grouped-query heads: query head h reads key head h // (Hq / Hkv)); `mask` an additive float
mask broadcastable to (B, 1, S, K) (transformers' 4-D masks: 0 where allowed, a large negative value
elsewhere) or None; `scaling` the softmax scale (default d^-1/2); `lse` (B, Hq, S) each row's
log-sum-exp when the attention kernel provides it (flash attention does), else it is computed here in
a first pass. Returns `fuse_h(softmax(q k^T * scaling + mask))` as (B, S, K) float32, the fusion over
heads being "mean", "max" or "min" (`common.fuse_heads`).

Why: only eager attention returns probabilities, and it writes and re-reads the (B, H, S, K) tensor
several times per layer. With this, the model runs its fast attention (SDPA, flash) and the maps are
recomputed tile by tile, writing only (B, S, K). Backends: "torch" (one head at a time, so at most one
(B, S, K) score tensor is alive: the CPU path and the oracle), "triton" (one program per (sequence,
row tile, column tile) loops over the heads: scores from a tile dot product, probabilities from the
log-sum-exp, fused in registers, stored once; the log-sum-exp pass is an online-softmax kernel), and
"auto" (Triton on CUDA tensors, torch elsewhere; Triton on CPU tensors needs TRITON_INTERPRET=1).
Bytes and FLOPs on paper for an H100: `benchmarks/README.md`.
"""

from __future__ import annotations

import torch

from .common import HEAD_FUSIONS, block_size, check_head_fusion, choose_backend


def _scores(query, key, h: int, group: int, scaling: float, mask):
    s = torch.matmul(query[:, h].float(), key[:, h // group].float().transpose(-1, -2)) * scaling
    return s if mask is None else s + mask[:, 0].float()


def row_logsumexp_torch(query, key, mask=None, scaling=None) -> torch.Tensor:
    """(B, Hq, S): each attention row's log-sum-exp, one head at a time."""
    heads, group = query.shape[1], query.shape[1] // key.shape[1]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return torch.stack([torch.logsumexp(_scores(query, key, h, group, scaling, mask), -1) for h in range(heads)], 1)


def attention_probs_torch(query, key, head_fusion="mean", mask=None, scaling=None, lse=None) -> torch.Tensor:
    heads, group = query.shape[1], query.shape[1] // key.shape[1]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    fused = None
    for h in range(heads):
        s = _scores(query, key, h, group, scaling, mask)
        p = torch.exp(s - (torch.logsumexp(s, -1) if lse is None else lse[:, h].float())[..., None])
        if fused is None:
            fused = p
        elif head_fusion == "mean":
            fused = fused + p
        elif head_fusion == "max":
            fused = torch.maximum(fused, p)
        else:
            fused = torch.minimum(fused, p)
    return fused / heads if head_fusion == "mean" else fused


# ------------------------------------------------------------------------------------------ Triton


def _blocks(seq: int, keys: int, dim: int) -> tuple[int, int, int]:
    import triton

    return block_size(seq), block_size(keys), max(16, triton.next_power_of_2(dim))


def _mask_args(mask, batch: int, seq: int, keys: int, device):
    if mask is None:
        return torch.zeros(1, device=device), (0, 0, 0), False
    m = mask.float().expand(batch, 1, seq, keys)  # views with stride 0 where broadcast: nothing copied
    return m, (m.stride(0), m.stride(2), m.stride(3)), True


def attention_probs_triton(query, key, head_fusion="mean", mask=None, scaling=None, lse=None) -> torch.Tensor:
    """Host wrapper: check, allocate, build the grids, launch the log-sum-exp pass (when `lse` is None)
    and the fused-probability pass."""
    from ._attention_probs_triton import attention_probs_kernel, row_lse_kernel

    batch, heads, seq, dim = query.shape
    keys = key.shape[2]
    group = heads // key.shape[1]
    scaling = dim**-0.5 if scaling is None else float(scaling)
    block_m, block_n, block_d = _blocks(seq, keys, dim)
    m, (msb, msi, msj), has_mask = _mask_args(mask, batch, seq, keys, query.device)
    q, k = query.contiguous(), key.contiguous()
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), msb, msi, msj)
    if lse is None:
        lse = torch.empty(batch, heads, seq, device=query.device, dtype=torch.float32)
        grid = (batch, heads, (seq + block_m - 1) // block_m)
        row_lse_kernel[grid](
            q, k, m, lse, seq, keys, dim, group, scaling, *common, lse.stride(0), lse.stride(1),
            HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
    lse = lse.float().contiguous()
    out = torch.empty(batch, seq, keys, device=query.device, dtype=torch.float32)
    grid = (batch, (seq + block_m - 1) // block_m, (keys + block_n - 1) // block_n)
    attention_probs_kernel[grid](
        q, k, m, lse, out, seq, keys, dim, heads, group, scaling, *common, lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        FUSION=HEAD_FUSIONS.index(head_fusion), HAS_MASK=has_mask, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def attention_probs(query, key, head_fusion="mean", mask=None, scaling=None, lse=None, backend="auto"):
    """Head-fused attention probabilities (B, S, K); see the module docstring."""
    check_head_fusion(head_fusion)
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be (B, H, S, d), got {tuple(query.shape)} and {tuple(key.shape)}")
    batch, heads, seq, dim = query.shape
    if key.shape[0] != batch or key.shape[3] != dim or heads % key.shape[1] != 0:
        raise ValueError(
            f"key {tuple(key.shape)} does not match query {tuple(query.shape)}: same batch and head dim, "
            "and the query heads a multiple of the key heads"
        )
    if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (seq, key.shape[2])):
        raise ValueError(f"mask must be broadcastable to (B, 1, {seq}, {key.shape[2]}), got {tuple(mask.shape)}")
    if lse is not None and tuple(lse.shape) != (batch, heads, seq):
        raise ValueError(f"lse must be ({batch}, {heads}, {seq}), got {tuple(lse.shape)}")
    if choose_backend(backend, query) == "triton":
        return attention_probs_triton(query, key, head_fusion, mask, scaling, lse)
    return attention_probs_torch(query, key, head_fusion, mask, scaling, lse)
