"""Fused kernels. Each kernel has a plain-torch path beside it; Triton is imported lazily, so this
package imports where Triton or CUDA is absent and never touches CUDA on import."""

from .rollout import rollout

__all__ = ["rollout"]
