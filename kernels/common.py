"""Primitives shared by the kernels' torch paths, the engine and the reference (this package imports
nothing from `engine`): one statement of each formula the rollout and attention-map paths share."""

from __future__ import annotations

import os

import torch

HEAD_FUSIONS = ("mean", "max", "min")
BACKENDS = ("auto", "torch", "triton")
RESIDUAL_WEIGHT = 0.5  # rollout's A' = 0.5 A + 0.5 I (Abnar & Zuidema 2020): the residual stream's share


def upcast(x: torch.Tensor) -> torch.Tensor:
    """`x` in the precision results accumulate in: float32 for float16 / bfloat16 (and float32), float64
    kept as it is (a float64 model is computed in float64 throughout)."""
    return x if x.dtype == torch.float64 else x.float()


def check_head_fusion(head_fusion: str) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {list(HEAD_FUSIONS)}, got {head_fusion!r}")


def fuse_heads(attn: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """(..., heads, S, S) -> (..., S, S) by mean, max or min over heads."""
    check_head_fusion(head_fusion)
    if head_fusion == "mean":
        return attn.mean(dim=-3)
    if head_fusion == "max":
        return attn.amax(dim=-3)
    return attn.amin(dim=-3)


def with_residual(fused: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """One rollout layer: the fused attention mixed with the identity (the residual connection)."""
    return RESIDUAL_WEIGHT * fused + (1 - RESIDUAL_WEIGHT) * eye


def discard_threshold(fused: torch.Tensor, discard_ratio: float, causal_quantile: bool = False) -> torch.Tensor:
    """The `discard_ratio` quantile of an (S, S) fused matrix: over all entries (the seed), or over the
    lower triangle with the diagonal (`causal_quantile`)."""
    if causal_quantile:
        n = fused.shape[-1]
        rows, cols = torch.tril_indices(n, n, device=fused.device)
        return fused[rows, cols].quantile(discard_ratio)
    return fused.flatten().quantile(discard_ratio)


def discard_low_attention(fused: torch.Tensor, discard_ratio: float, causal_quantile: bool = False) -> torch.Tensor:
    """Zero the entries below the `discard_ratio` quantile of `fused` (S, S), then renormalize rows.

    As in the seed, the quantile is taken over the whole flattened matrix; on a causal model that
    includes the zero upper triangle, so ratios below about 0.5 discard nothing.
    `causal_quantile=True` takes it over the lower triangle (diagonal included) instead.
    A row left with no mass (every entry below the threshold) would divide by zero in the seed and
    turn the whole rollout into NaN at the next product; here that token keeps only itself: its row
    becomes the unit row e_i.
    """
    if discard_ratio <= 0:
        return fused
    n = fused.shape[-1]
    threshold = discard_threshold(fused, discard_ratio, causal_quantile)
    kept = fused * (fused >= threshold)
    row_sums = kept.sum(dim=-1, keepdim=True)
    eye = torch.eye(n, dtype=fused.dtype, device=fused.device)
    empty = row_sums == 0
    return torch.where(empty, eye, kept / torch.where(empty, torch.ones_like(row_sums), row_sums))


# ------------------------------------------------------------------------------------------ Triton


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def block_size(n: int) -> int:
    """A tile side for n rows or columns: the next power of two, between 16 (`tl.dot`'s minimum) and 64."""
    import triton

    if n < 1:
        raise ValueError(f"sequence length must be >= 1, got {n}")
    return min(64, max(16, triton.next_power_of_2(n)))


def choose_backend(backend: str, tensor: torch.Tensor, triton_ok: bool = True) -> str:
    """ "auto" -> Triton for CUDA tensors (where `triton_ok` and triton is installed), torch otherwise;
    an explicit "triton" needs triton and CUDA tensors (or TRITON_INTERPRET=1, the interpreter)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_ok and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package")
        if not (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter)")
    return backend
