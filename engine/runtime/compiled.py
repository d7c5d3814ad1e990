"""`Explainer(..., compile=True)`: the element-wise work of every decoder layer fused by `torch.compile`.

Matmuls already run near the CPU's peak; what a forward loses is the element-wise work between them
(RMSNorm, SiLU x up, the MLP's intermediate tensors), each a separate pass over memory. Compiling the
MLP and norm modules fuses those passes. Each module class is compiled once, with dynamic shapes
(a batch's token count varies) and its parameters as inputs, so one graph serves every layer and
every batch. The compiled forwards are installed on the model's own instances only while a batch
runs (instance attributes that shadow the class's `forward`), and removed after: the model is never
changed for its owner, and nothing in `transformers` is patched. A method that installs its own
per-instance forwards (LRP's rules) replaces them for its batch.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager

import torch

_SUFFIXES = ("MLP", "RMSNorm")  # the module classes compiled: the decoder layers' element-wise work
_COMPILED: dict[type, object] = {}  # module class -> its compiled forward (shared by every instance)


def compiled_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith(_SUFFIXES)]


def _inductor_options() -> dict:
    """Inductor's vectorized C++ does not compile where ATen's CPU dispatch is pinned to the plain
    kernels (`ATEN_CPU_CAPABILITY=default`: `at::vec` is not declared, torch 2.13): scalar code there."""
    return {"cpp.simdlen": 1} if os.environ.get("ATEN_CPU_CAPABILITY") == "default" else {}


def _compiled_forward(cls: type):
    if cls not in _COMPILED:
        _COMPILED[cls] = torch.compile(cls.forward, dynamic=True, options=_inductor_options() or None)
    return _COMPILED[cls]


@contextmanager
def compiled_forwards(model, enabled: bool = True):
    """Inside the block, `model`'s MLP and norm modules run compiled forwards (when `enabled`)."""
    if not enabled:
        yield
        return
    modules = [m for m in compiled_modules(model) if "forward" not in m.__dict__]
    for m in modules:
        m.forward = types.MethodType(_compiled_forward(type(m)), m)
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)  # a method's own override may already have removed it
