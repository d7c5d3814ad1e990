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

import types
from contextlib import contextmanager

import torch

_SUFFIXES = ("MLP", "RMSNorm")  # the module classes compiled: the decoder layers' element-wise work
_COMPILED: dict[type, object] = {}  # module class -> its compiled forward (shared by every instance)


def compiled_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith(_SUFFIXES)]


def _inductor_options() -> dict:
    """The vector width inductor writes its C++ for, as an option, so that it is part of the cache key.

    Inductor's FX graph cache (torch 2.13) keys a graph without the vector ISA its C++ was generated
    for, then compiles the cached source with the flags of the ISA picked now: after a run under another
    `ATEN_CPU_CAPABILITY` on the same machine (or with a cache shared by CPUs of different widths), code
    written for 16-float AVX-512 vectors ran on 8-float AVX2 ones and returned NaN and wrong values
    (found by the environment matrix). Where ATen is pinned to the plain kernels (`default`: no vector
    ISA, and `at::vec` is not declared for inductor's vectorized code) the width is 1: scalar code."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except ImportError:  # torch < 2.5 kept it in codecache
        from torch._inductor.codecache import pick_vec_isa
    isa = pick_vec_isa()
    return {"cpp.simdlen": isa.bit_width() if isa else 1}


def _compiled_forward(cls: type):
    if cls not in _COMPILED:
        _COMPILED[cls] = torch.compile(cls.forward, dynamic=True, options=_inductor_options())
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
