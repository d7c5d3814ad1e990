"""Fused kernels. Each kernel has a plain-torch path beside it; Triton is imported lazily, so this
package imports where Triton or CUDA is absent and never touches CUDA on import."""

ATTRIBUTION_ENGINE_KERNELS = True  # engine checks for this marker: see engine/_kernels_check.py

from .rollout import rollout  # noqa: E402

__all__ = ["rollout"]
