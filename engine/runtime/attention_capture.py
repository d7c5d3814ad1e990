"""Attention probabilities captured as each layer produces them, heads fused on the spot.

`output_attentions=True` makes a model return every layer's (B, H, S, S) probabilities at the end
of the forward, so all layers' tensors are alive at once. `fused_attention(model, head_fusion, sink)`
instead hands each layer's head-fused map, (B, S, K) float32, to `sink(layer_index, fused)` as soon as
the layer has it, for the duration of a `with` block. Two ways (`maps`):

- "eager": the model runs eager attention (the only implementation that computes probabilities);
  forward hooks on the modules that produce them (the ones transformers records as "attentions")
  fuse the heads and drop the (B, H, S, K) tensor from the layer's output, so at most one layer's is
  alive.
- "recompute": the model runs SDPA through an attention function registered under its own name
  (`engine_fused_maps`, with eager's 4-D mask function so every call gets an explicit mask); the
  function passes the post-rotary queries and keys to `kernels.attention_probs`, which recomputes the
  head-fused maps tile by tile (Triton on CUDA) without the (B, H, S, K) tensor ever existing.

Either way the hooks and the attention implementation are restored on exit. The registration under
a new name is the registry's extension point: no existing entry of `transformers` is changed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from kernels.common import fuse_heads, upcast

from ..models import attention_implementation, eager_attention

MAPS = ("eager", "recompute")
_RECOMPUTE = "engine_fused_maps"
# while capturing, each attention module carries (layer index, head fusion, sink) under this attribute:
# state lives with the module it belongs to (one thread touches a model at a time: `runtime.loop`)
_CAPTURE = "_engine_fused_capture"


def attention_modules(model) -> list[tuple[torch.nn.Module, int]]:
    """(module, index of the probabilities in its output) for each layer, in layer order."""
    recorder = getattr(model.base_model, "_can_record_outputs", {}).get("attentions")
    if recorder is None:
        raise ValueError(f"{type(model).__name__} does not say which modules produce its attention probabilities")
    target = getattr(recorder, "target_class", recorder)
    index = getattr(recorder, "index", 1)
    layer_name = getattr(recorder, "layer_name", None)
    found = [
        (module, index)
        for name, module in model.named_modules()
        if isinstance(module, target) and (layer_name is None or name.endswith(layer_name))
    ]
    if not found:
        raise ValueError(f"no {target.__name__} modules found in {type(model).__name__}")
    return found


def _recording_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """SDPA, plus the head-fused maps of this call for the capture that registered the module."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kernels.attention_probs import attention_probs

    state = getattr(module, _CAPTURE, None)
    if state is not None:
        layer, head_fusion, sink = state
        mask = attention_mask
        if mask is not None and mask.dtype == torch.bool:  # True = may attend
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        with torch.no_grad():
            sink(layer, attention_probs(query, key, head_fusion, mask, kwargs.get("scaling")))
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _register_recompute() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _RECOMPUTE not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(_RECOMPUTE, _recording_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(_RECOMPUTE, eager_mask)


@contextmanager
def fused_attention(model, head_fusion: str, sink, maps: str = "eager"):
    if maps not in MAPS:
        raise ValueError(f"maps must be one of {list(MAPS)}, got {maps!r}")
    modules = attention_modules(model)
    if maps == "recompute":
        _register_recompute()
        for layer, (module, _) in enumerate(modules):
            setattr(module, _CAPTURE, (layer, head_fusion, sink))
        try:
            with attention_implementation(model, _RECOMPUTE):
                yield len(modules)
        finally:
            for module, _ in modules:
                if hasattr(module, _CAPTURE):
                    delattr(module, _CAPTURE)
        return

    handles = []

    def make_hook(layer: int, index: int):
        def hook(module, args, output):
            probs = output[index]
            if probs is None:
                raise RuntimeError("the attention module returned no probabilities: is eager attention on?")
            sink(layer, fuse_heads(upcast(probs), head_fusion))
            return (*output[:index], None, *output[index + 1 :])

        return hook

    with eager_attention(model):
        try:
            for layer, (module, index) in enumerate(modules):
                handles.append(module.register_forward_hook(make_hook(layer, index)))
            yield len(modules)
        finally:
            for handle in handles:
                handle.remove()
