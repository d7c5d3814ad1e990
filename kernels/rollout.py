"""Batched attention rollout: the full matrix or only the rows that attribution reads.

    from kernels import rollout
    rollout(attentions, head_fusion="mean", discard_ratio=0.0, lengths=None, rows=None, backend="auto")

`attentions`: a sequence of L tensors (B, H, S, S), or of already head-fused (B, S, S) tensors
(`fused=True`). `lengths` (B,): each sequence's true length n_b; everything (fusion, discard quantile,
product) covers only its own n_b x n_b block, exactly as if it were alone, and entries outside the
block are 0. `rows` (B,): target positions; `rows=None` returns the full (B, S, S) rollout, otherwise
(B, S): row `rows[b]` of sequence b, computed as the chain of vector-matrix products
e_t^T A'_L ... A'_1 (O(L S^2) per sequence instead of O(L S^3)).

Semantics are `engine.reference.attention_rollout` (fusion, discard with a row left empty becoming
e_i, `0.5 A + 0.5 I`). Backends: "torch" (batched bmm; the CPU path and the oracle for any fused
kernel) and "auto" (torch here). A fused Triton kernel is not written yet: "triton" raises.

Memory traffic of the torch path per layer: read B*H*S*S (fusion), write and read B*S*S (fused
matrix), plus the product: B*S*S*S multiply-adds for the full matrix, B*S*S for a row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BACKENDS = ("auto", "torch", "triton")


def _fuse(attn: torch.Tensor, head_fusion: str, fused: bool) -> torch.Tensor:
    from engine.reference import fuse_heads

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
    from engine.reference import discard_low_attention

    f = _fuse(attn, head_fusion, fused).float()
    batch, size = f.shape[0], f.shape[-1]
    eye = torch.eye(size, dtype=f.dtype, device=f.device)
    out = eye.expand(batch, size, size).clone()
    for b, n in enumerate(lengths):
        block = discard_low_attention(f[b, :n, :n], discard_ratio, causal_quantile)
        out[b, :n, :n] = 0.5 * block + 0.5 * eye[:n, :n]
    return out


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
    layers = [prepare_layer(a, lengths, head_fusion, discard_ratio, causal_quantile, fused) for a in attentions]
    inside = torch.zeros(batch, size, dtype=torch.bool, device=first.device)
    for b, n in enumerate(lengths):
        inside[b, :n] = True
    if rows is None:
        result = torch.eye(size, dtype=torch.float32, device=first.device).expand(batch, size, size).clone()
        for a in layers:
            result = torch.bmm(a, result)
        return result * (inside[:, :, None] & inside[:, None, :])
    rows = torch.as_tensor(rows, device=first.device).long()
    v = torch.nn.functional.one_hot(rows, size).float()[:, None, :]  # (B, 1, S)
    for a in reversed(layers):  # e_t^T A'_L ... A'_1
        v = torch.bmm(v, a)
    return v[:, 0] * inside


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
    from engine.reference import HEAD_FUSIONS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
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
    if backend == "triton":
        raise NotImplementedError("the fused Triton rollout kernel is not written yet; use backend='torch'")
    return rollout_torch(attentions, head_fusion, discard_ratio, lengths, rows, causal_quantile, fused)
