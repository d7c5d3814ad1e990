"""Batched attention rollout: the full matrix or only the rows that attribution reads.

    from kernels import rollout
    rollout(attentions, head_fusion="mean", discard_ratio=0.0, lengths=None, rows=None, backend="auto")

`attentions`: a sequence of L tensors (B, H, S, S), or of already head-fused (B, S, S) tensors
(`fused=True`). `lengths` (B,): each sequence's true length n_b; everything (fusion, discard quantile,
product) covers only its own n_b x n_b block, exactly as if it were alone, and entries outside the
block are 0. `rows` (B,): target positions; `rows=None` returns the full (B, S, S) rollout, otherwise
(B, S): row `rows[b]` of sequence b, computed as the chain of vector-matrix products
e_t^T A'_L ... A'_1 (O(L S^2) per sequence instead of O(L S^3)).

Semantics are the reference's `attention_rollout` (fusion, discard with a row left empty becoming e_i,
`0.5 A + 0.5 I`, each from `kernels.common`). Backends: "torch" (batched bmm; the CPU path and the
oracle for the kernels), "triton" (one launch per layer: heads fused while tiles load, discard
threshold and row scale applied on load, residual added, product accumulated; the fused matrix is
never written), and "auto" (Triton for CUDA tensors, torch otherwise; `backend="triton"` on CPU
tensors needs TRITON_INTERPRET=1).
`discard_ratio > 0` needs each matrix's quantile first: a torch pre-pass computes thresholds and
row scales (`_discard_params`).

Memory traffic of the torch path per layer: read B*H*S*S (fusion), write and read B*S*S (fused
matrix), plus the product: B*S*S*S multiply-adds for the full matrix, B*S*S for a row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import (
    block_size,
    check_head_fusion,
    choose_backend,
    discard_low_attention,
    discard_threshold,
    fuse_heads,
    upcast,
    with_residual,
)


def _fuse(attn: torch.Tensor, head_fusion: str, fused: bool) -> torch.Tensor:
    return attn if fused else fuse_heads(attn, head_fusion)


def prepare_layer(
    attn: torch.Tensor,
    lengths: list[int],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    causal_quantile: bool = False,
    fused: bool = False,
) -> torch.Tensor:
    """One layer's A' = 0.5 F + 0.5 I per sequence block, identity outside the block: (B, S, S)."""
    f = upcast(_fuse(attn, head_fusion, fused))
    batch, size = f.shape[0], f.shape[-1]
    eye = torch.eye(size, dtype=f.dtype, device=f.device)
    if discard_ratio <= 0:  # no per-block quantile: one vectorized pass
        block = _block_mask(lengths, size, f.device)
        return torch.where(block, with_residual(f, eye), eye)
    out = eye.expand(batch, size, size).clone()
    for b, n in enumerate(lengths):
        block = discard_low_attention(f[b, :n, :n], discard_ratio, causal_quantile)
        out[b, :n, :n] = with_residual(block, eye[:n, :n])
    return out


def _inside(lengths: list[int], size: int, device) -> torch.Tensor:
    """(B, S): True at the positions inside each sequence."""
    return torch.arange(size, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def _block_mask(lengths: list[int], size: int, device) -> torch.Tensor:
    inside = _inside(lengths, size, device)
    return inside[:, :, None] & inside[:, None, :]


def _row_chain(attentions, head_fusion, lengths, rows, fused) -> torch.Tensor:
    """e_t^T A'_L ... A'_1 without writing A' (discard 0): v <- 0.5 v F + 0.5 v per layer, kept inside
    each sequence. With mean fusion of unfused heads, v F = mean_h (v A_h), so each layer's
    (B, H, S, S) tensor is read once and no fused matrix is written at all."""
    first = attentions[0]
    batch, size = first.shape[0], first.shape[-1]
    dtype = upcast(first).dtype
    inside = _inside(lengths, size, first.device).to(dtype)
    v = torch.nn.functional.one_hot(torch.as_tensor(rows, device=first.device).long(), size).to(dtype)
    for a in reversed(attentions):
        if fused:
            vf = torch.bmm(v[:, None, :], upcast(a))[:, 0]
        elif head_fusion == "mean":  # one matrix-vector product per (sequence, head), no copy of `a`
            heads = a.shape[1]
            per_head = v[:, None, None, :].expand(batch, heads, 1, size).reshape(batch * heads, 1, size)
            vf = torch.bmm(per_head, upcast(a).reshape(batch * heads, size, size)).view(batch, heads, size).mean(1)
        else:
            vf = torch.bmm(v[:, None, :], upcast(_fuse(a, head_fusion, False)))[:, 0]
        v = with_residual(vf, v) * inside  # v A' = 0.5 v F + 0.5 v
    return v


def rollout_torch(
    attentions: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    lengths=None,
    rows=None,
    causal_quantile: bool = False,
    fused: bool = False,
) -> torch.Tensor:
    first = attentions[0]
    batch, size = first.shape[0], first.shape[-1]
    lengths = [size] * batch if lengths is None else [int(n) for n in lengths]
    if rows is not None and discard_ratio <= 0:
        return _row_chain(attentions, head_fusion, lengths, rows, fused)
    layers = [prepare_layer(a, lengths, head_fusion, discard_ratio, causal_quantile, fused) for a in attentions]
    inside = torch.zeros(batch, size, dtype=torch.bool, device=first.device)
    for b, n in enumerate(lengths):
        inside[b, :n] = True
    if rows is None:
        result = torch.eye(size, dtype=layers[0].dtype, device=first.device).expand(batch, size, size).clone()
        for a in layers:
            result = torch.bmm(a, result)
        return result * (inside[:, :, None] & inside[:, None, :])
    rows = torch.as_tensor(rows, device=first.device).long()
    v = torch.nn.functional.one_hot(rows, size).to(layers[0].dtype)[:, None, :]  # (B, 1, S)
    for a in reversed(layers):  # e_t^T A'_L ... A'_1
        v = torch.bmm(v, a)
    return v[:, 0] * inside


# ------------------------------------------------------------------------------------------ Triton


def _discard_params(fused_layer: torch.Tensor, lengths, discard_ratio: float, causal_quantile: bool):
    """The discard pre-pass: per sequence the threshold, per row 1 / (kept row sum) and an empty flag.

    The kernels apply `F[i, j] * (F[i, j] >= thr) * scale[i]`, and e_i for an empty row, which is
    `common.discard_low_attention` (that function stays the one statement of the policy)."""
    batch, size = fused_layer.shape[0], fused_layer.shape[-1]
    thr = torch.full((batch,), float("-inf"), device=fused_layer.device)
    scale = torch.ones(batch, size, device=fused_layer.device)
    empty = torch.zeros(batch, size, dtype=torch.int8, device=fused_layer.device)
    if discard_ratio <= 0:
        return thr, scale, empty
    for b, n in enumerate(lengths):
        f = fused_layer[b, :n, :n].float()
        thr[b] = discard_threshold(f, discard_ratio, causal_quantile)
        sums = (f * (f >= thr[b])).sum(-1)
        scale[b, :n] = torch.where(sums > 0, 1.0 / torch.where(sums > 0, sums, 1.0), 0.0)
        empty[b, :n] = (sums == 0).to(torch.int8)
    return thr, scale, empty


_FUSION_CODE = {"mean": 0, "max": 1, "min": 2}


def rollout_triton(attentions, head_fusion="mean", discard_ratio=0.0, lengths=None, rows=None, causal_quantile=False):
    """Host wrapper: check, allocate, build the grid, launch one step per layer (last layer first for rows)."""
    from ._rollout_triton import rollout_full_step as full_step
    from ._rollout_triton import rollout_row_step as row_step

    first = attentions[0]
    batch, heads, size = first.shape[0], first.shape[1], first.shape[-1]
    device = first.device
    lengths_list = [size] * batch if lengths is None else [int(x) for x in lengths]
    lens = torch.tensor(lengths_list, dtype=torch.int32, device=device)
    block_m = block_k = block_size(size)
    fusion = _FUSION_CODE[head_fusion]
    layers = [a.contiguous() for a in attentions]
    params = []
    for a in layers:
        fused = None
        if discard_ratio > 0:  # the quantile needs the fused matrix: a separate pass, as documented
            fused = fuse_heads(a.float(), head_fusion)
        params.append(
            _discard_params(fused if fused is not None else a[:, 0], lengths_list, discard_ratio, causal_quantile)
        )
    inside = torch.arange(size, device=device)[None, :] < lens[:, None]
    if rows is not None:
        rows_t = torch.as_tensor(rows, device=device).long()
        v = torch.nn.functional.one_hot(rows_t, size).float().contiguous()
        w = torch.empty_like(v)
        grid = (batch, triton_cdiv(size, block_m))
        for a, (thr, scale, empty) in zip(reversed(layers), reversed(params), strict=True):
            row_step[grid](
                a,
                v,
                w,
                lens,
                thr,
                scale,
                empty,
                size,
                a.stride(0),
                a.stride(1),
                a.stride(2),
                a.stride(3),
                v.stride(0),
                scale.stride(0),
                H=heads,
                FUSION=fusion,
                BLOCK_I=block_m,
                BLOCK_J=block_m,
            )
            v, w = w, v
        return v * inside
    r = torch.eye(size, device=device).expand(batch, size, size).contiguous()
    out = torch.empty_like(r)
    grid = (batch, triton_cdiv(size, block_m), triton_cdiv(size, block_k))
    for a, (thr, scale, empty) in zip(layers, params, strict=True):
        full_step[grid](
            a,
            r,
            out,
            lens,
            thr,
            scale,
            empty,
            size,
            a.stride(0),
            a.stride(1),
            a.stride(2),
            a.stride(3),
            r.stride(0),
            r.stride(1),
            scale.stride(0),
            H=heads,
            FUSION=fusion,
            BLOCK_M=block_m,
            BLOCK_K=block_k,
        )
        r, out = out, r
    return r * (inside[:, :, None] & inside[:, None, :])


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def rollout(
    attentions: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    lengths=None,
    rows=None,
    backend: str = "auto",
    causal_quantile: bool = False,
    fused: bool = False,
) -> torch.Tensor:
    """Batched rollout; see the module docstring."""
    check_head_fusion(head_fusion)
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if len(attentions) == 0:
        raise ValueError("attentions is empty: pass one tensor per layer")
    expected_dim, layout = (3, "B, S, S") if fused else (4, "B, H, S, S")
    shape = attentions[0].shape
    for a in attentions:
        if a.dim() != expected_dim or a.shape != shape or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"every layer must be ({layout}) with the same shape, got {tuple(a.shape)}")
    size = shape[-1]
    if lengths is not None and any(not 1 <= int(n) <= size for n in lengths):
        raise ValueError(f"lengths must be in [1, {size}], got {list(lengths)}")
    if rows is not None:
        limits = lengths if lengths is not None else [size] * shape[0]
        if len(rows) != shape[0] or any(not 0 <= int(r) < int(n) for r, n in zip(rows, limits, strict=True)):
            raise ValueError("rows must give one position per sequence, inside its length")
    if backend == "triton" and fused:
        raise ValueError("the Triton backend fuses heads itself: pass (B, H, S, S) layers, fused=False")
    if choose_backend(backend, attentions[0], triton_ok=not fused) == "triton":
        return rollout_triton(attentions, head_fusion, discard_ratio, lengths, rows, causal_quantile)
    return rollout_torch(attentions, head_fusion, discard_ratio, lengths, rows, causal_quantile, fused)
