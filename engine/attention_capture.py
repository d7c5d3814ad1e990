"""Attention probabilities captured as each layer produces them, heads fused on the spot.

`output_attentions=True` makes a model return every layer's (B, H, S, S) probabilities at the end
of the forward, so all layers' tensors are alive at once. `fused_attention(model, head_fusion, sink)`
instead hooks the modules that produce the probabilities (the ones transformers records as
"attentions") for the duration of a `with` block: each layer's probabilities are fused over heads
(mean, max or min) as soon as the layer returns them, handed to `sink(layer_index, fused)` as a
(B, S, K) float32 tensor, and dropped from the layer's output, so at most one layer's (B, H, S, K)
tensor is alive. The hooks are removed on exit. Eager attention is required (only it computes the
probabilities); the context switches the model to it and back.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .models import eager_attention


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


@contextmanager
def fused_attention(model, head_fusion: str, sink):
    from .reference import fuse_heads

    modules = attention_modules(model)
    handles = []

    def make_hook(layer: int, index: int):
        def hook(module, args, output):
            probs = output[index]
            if probs is None:
                raise RuntimeError("the attention module returned no probabilities: is eager attention on?")
            sink(layer, fuse_heads(probs.float(), head_fusion))
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
