"""Forwards on cascade attention: packed suffixes over shared prefix caches, whole texts end to end.

`cascade_forward(model, caches, suffixes)` computes what `forward.packed_suffix_forward` computes
(each suffix's last hidden state, over its text's first `start` cached positions), laid out as
`layout.CascadeLayout`: every suffix in one row, no padding, and attention in two passes
(`kernels.cascade_attention`): each query over its prefix interval of the batch's cached prefixes,
concatenated once (not copied into every row), then causally over its own suffix, merged by
log-sum-exp. Whole texts (start 0: the clean pass, prefix caches being built, IG steps) are the
second pass alone, the varlen form: each token attends to its own text only.

The model keeps its own projections, rotary embeddings, norms and MLP: only the attention call is
replaced, through an attention function registered under its own name (`engine_cascade`, with no
mask function, so transformers builds no mask) and switched on for the one model for the duration of
a `with` block; each attention module carries (layer index, plan) while it runs. Sliding-window layers
narrow each query's intervals to the window (transformers' rule: q - k < window).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kernels.cascade_attention import CascadeIntervals, cascade_attention

from ..models import attention_implementation
from .attention_capture import attention_modules
from .forward import SLIDING, attention_layer_types, cache_kwargs, output_cache
from .layout import CascadeLayout, Suffix

_NAME = "engine_cascade"
_STATE = "_engine_cascade"  # on each attention module while a cascade forward runs: (layer index, plan)


@dataclass
class CascadePlan:
    """What every layer's attention call of one forward reads (built once per forward)."""

    layer_types: list[str]  # per layer: "full_attention" or "sliding_attention"
    intervals: dict[str, CascadeIntervals]  # per layer type: each query's prefix and own-suffix intervals
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer: prefixes' (keys, values), (Hkv, P, d)
    backend: str


def _cascade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: (1, Hq, T, d) queries of the packed row -> (1, T, Hq, d)."""
    layer, plan = getattr(module, _STATE)
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("cascade attention does not support attention sinks; use Explainer(..., cascade=False)")
    intervals = plan.intervals[plan.layer_types[layer]]
    pk, pv = plan.prefix_kv[layer] if plan.prefix_kv is not None else (None, None)
    out = cascade_attention(
        query[0],
        key[0],
        value[0],
        intervals,
        pk,
        pv,
        scaling=scaling,
        softcap=kwargs.get("softcap"),
        backend=plan.backend,
    )
    return out.transpose(0, 1)[None], None


def _register() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(_NAME, _cascade_attention)


@contextmanager
def cascade_scope(model, plan: CascadePlan):
    """`model` runs cascade attention with `plan` inside the block; its attention and modules are
    restored on exit, even on an exception."""
    _register()
    modules = attention_modules(model)
    for layer, (module, _) in enumerate(modules):
        setattr(module, _STATE, (layer, plan))
    try:
        with attention_implementation(model, _NAME):
            yield
    finally:
        for module, _ in modules:
            if hasattr(module, _STATE):
                delattr(module, _STATE)


def layer_windows(model) -> dict[str, int | None]:
    """Each attention layer type of `model` and its sliding window (None for full attention)."""
    window = getattr(model.config, "sliding_window", None)
    return {kind: int(window) if kind == SLIDING else None for kind in attention_layer_types(model)}


def cascade_intervals(suffixes: list[Suffix], plan: CascadeLayout, windows: dict[str, int | None], device="cpu"):
    """Per layer type (`windows`: type -> sliding window or None), each query's own and (where any
    suffix reads a prefix) prefix intervals, in row order; and each query's position."""
    own_lo, prefix_lo, prefix_hi, positions, texts = [], [], [], [], []
    for i in plan.order:
        s = suffixes[i]
        n, offset = len(s.ids), plan.prefix_offsets.get(s.text, 0)
        own_lo.append(torch.full((n,), plan.columns[i]))
        positions.append(torch.arange(s.start, s.start + n))
        texts.append(torch.full((n,), s.text))
        prefix_lo.append(torch.full((n,), offset))
        prefix_hi.append(torch.full((n,), offset + s.start))
    own_lo, positions, texts = torch.cat(own_lo), torch.cat(positions), torch.cat(texts)
    prefix_lo, prefix_hi = torch.cat(prefix_lo), torch.cat(prefix_hi)
    columns = torch.arange(plan.query_tokens)
    n_prefix = sum(plan.prefix_lengths.values())
    intervals = {}
    for kind, window in windows.items():
        lo, p_lo = own_lo, prefix_lo
        if window is not None:  # keys less than `window` positions back: q - k < window
            lo = torch.maximum(own_lo, columns - window + 1)
            p_lo = torch.minimum(torch.maximum(prefix_lo, prefix_lo + positions - window + 1), prefix_hi)
        prefix = (p_lo.to(device), prefix_hi.to(device)) if n_prefix else (None, None)
        # blocks within one text's queries: a block's prefix keys are that text's prefix only
        intervals[kind] = CascadeIntervals.of(
            lo.to(device), (columns + 1).to(device), plan.query_tokens, *prefix, n_prefix, segments=texts.to(device)
        )
    return intervals, positions


def _prefix_kv(caches, plan: CascadeLayout):
    """Per layer: the prefixes the batch reads, concatenated once: (Hkv, P, d) keys and values."""
    if not plan.prefix_lengths:
        return None
    layers = []
    for li in range(len(caches[next(iter(plan.prefix_lengths))])):
        keys = [caches[t][li][0][0, :, :n] for t, n in plan.prefix_lengths.items()]
        values = [caches[t][li][1][0, :, :n] for t, n in plan.prefix_lengths.items()]
        layers.append((torch.cat(keys, 1), torch.cat(values, 1)))
    return layers


def cascade_forward(model, caches, suffixes: list[Suffix], return_caches: bool = False, embeds=None,
                    backend: str = "auto"):  # fmt: skip
    """Hidden state at the last token of each suffix, (len(suffixes), hidden); with `return_caches`,
    also each suffix's own per-layer (keys, values), each (1, kv_heads, n, d), as `packed_suffix_forward`.
    `caches[t]`: per-layer (keys, values) of text t, (1, kv_heads, >= start, d). `embeds`, when given:
    each suffix's input embeddings, (n, hidden), in place of its ids' (IG differentiates w.r.t. them)."""
    from transformers import DynamicCache

    device = model.device
    plan = CascadeLayout.of(suffixes)
    intervals, positions = cascade_intervals(suffixes, plan, layer_windows(model), device)
    ids = torch.cat([torch.tensor(suffixes[i].ids) for i in plan.order])[None].to(device)
    attention = CascadePlan(attention_layer_types(model), intervals, _prefix_kv(caches, plan), backend)
    if embeds is None:
        inputs = {"input_ids": ids}
    else:
        inputs = {"inputs_embeds": torch.cat([embeds[i] for i in plan.order])[None]}
    # the forward appends this batch's keys and values to an empty cache: each suffix's own, when asked
    extra = {**cache_kwargs(model, DynamicCache()), "use_cache": True} if return_caches else {"use_cache": False}
    with cascade_scope(model, attention):
        out = model.base_model(**inputs, position_ids=positions[None].to(device), **extra)
    ends = torch.tensor([plan.columns[i] + len(s.ids) - 1 for i, s in enumerate(suffixes)], device=device)
    hidden = out.last_hidden_state[0, ends]
    if not return_caches:
        return hidden
    layers = output_cache(out).layers
    own_kv = []
    for i, s in enumerate(suffixes):
        cols = slice(plan.columns[i], plan.columns[i] + len(s.ids))
        # clone: a view would keep the whole batch's cache alive as long as any one text's is
        own_kv.append([(layer.keys[:, :, cols].clone(), layer.values[:, :, cols].clone()) for layer in layers])
    return hidden, own_kv
