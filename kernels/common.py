"""Primitives shared by the kernels' torch paths and the engine (this package imports nothing from
`engine`)."""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """`x` in the precision results accumulate in: float32 for float16 / bfloat16 (and float32), float64
    kept as it is (a float64 model is computed in float64 throughout)."""
    return x if x.dtype == torch.float64 else x.float()
