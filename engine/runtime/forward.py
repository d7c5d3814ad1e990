"""Batched forward passes that score only what the methods read.

- `score_rows`: the language-model head applied to the read positions only (not every position),
  and the softmax only for rows that need a probability.
- `full_forward`: equal-length sequences stacked without padding (the full-recompute path; the only
  path for sequence classifiers, whose attention may be bidirectional).
- `packed_suffix_forward`: the prefix-reuse path for causal LMs. A perturbation whose first changed
  token is s leaves positions < s unchanged, so it runs only its suffix, attending to the clean text's
  key/value cache for the prefix. Suffixes are packed end to end into rows, text by text; each row
  carries the clean caches of the texts it serves (not of the whole batch) and a block-structured 4-D
  mask lets each suffix see its own text's first s cached positions and itself, causally.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from kernels.common import upcast

from ..models import CLASSIFIER
from .layout import RowLayout, Suffix


def blocked_value(dtype: torch.dtype) -> float:
    """The additive mask value for a blocked key: the dtype's most negative finite number (as
    transformers' own masks), representable in float16 too; a blocked score then underflows to a zero
    weight, and no row is fully blocked (padding queries see themselves), so the softmax stays finite."""
    return torch.finfo(dtype).min


@functools.cache
def _cache_keyword(forward_class: type) -> str:
    params = inspect.signature(forward_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """The keyword argument that passes `cache` to the base model: `cache` in transformers >= 5.24
    (which deprecates `past_key_values`, to be removed in 5.40), `past_key_values` before."""
    return {_cache_keyword(type(model.base_model)): cache}


def output_cache(out):
    """The cache a forward returned, under either name (`cache` from 5.24 on)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


FULL, SLIDING = "full_attention", "sliding_attention"


def attention_layer_types(model) -> list[str]:
    """Each layer's attention as transformers names it: the config's `layer_types` where it has them
    (Qwen2 with `use_sliding_window`, Gemma 2/3: alternating full and sliding layers), else every layer
    sliding when the config sets a `sliding_window` (Mistral), else every layer full."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    return [SLIDING if getattr(cfg, "sliding_window", None) else FULL] * int(cfg.num_hidden_layers)


def packs_rows(model) -> bool:
    """Whether `packed_suffix_forward` can express this model's masks: full and sliding-window layers
    (the window built from the rows' positions). Other kinds (chunked, linear or hybrid attention) run
    the per-length path, where transformers builds the masks itself."""
    return set(attention_layer_types(model)) <= {FULL, SLIDING}


def _row_masks(model, allowed: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, dtype):
    """The 4-D additive mask(s) of a packed batch: `allowed` (rows, queries, keys) as is for full
    layers; for sliding layers also only keys less than `sliding_window` positions back (transformers'
    rule: q - k < window). A mix of both goes in as transformers' per-layer-type dict."""
    blocked = blocked_value(dtype)
    masks = {}
    for kind in dict.fromkeys(attention_layer_types(model)):
        keep = allowed
        if kind == SLIDING:
            keep = allowed & (query_pos[:, :, None] - key_pos[:, None, :] < int(model.config.sliding_window))
        masks[kind] = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, blocked)[:, None]
    return masks if len(masks) > 1 else next(iter(masks.values()))


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits for the given hidden rows, with the final soft-capping some models apply."""
    logits = upcast(model.get_output_embeddings()(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class Scores:
    logit: torch.Tensor  # (m,) logit of each row's target
    prob: torch.Tensor | None  # (m,) softmax probability of each row's target, when asked for
    argmax: torch.Tensor  # (m,) argmax of each row's logits (the prediction on a clean text)


def score_logits(logits: torch.Tensor, targets: list[int | None], need_prob: bool) -> Scores:
    """Target logit (and probability) per row; a `None` target scores that row's argmax."""
    logits = upcast(logits)
    argmax = logits.argmax(dim=-1)
    chosen = torch.tensor([-1 if t is None else t for t in targets], device=logits.device)
    chosen = torch.where(chosen < 0, argmax, chosen)
    logit = logits.gather(-1, chosen[:, None])[:, 0]
    prob = torch.exp(logit - torch.logsumexp(logits, dim=-1)) if need_prob else None
    return Scores(logit=logit, prob=prob, argmax=argmax)


def read_logits(model, kind: str, inputs: dict, read_pos: int) -> torch.Tensor:
    """The logits the methods score, (B, outputs): a classifier's class logits, a causal LM's head
    applied at `read_pos` only (not at every position). The one place the two kinds differ."""
    if kind == CLASSIFIER:
        return upcast(model(**inputs).logits)
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, read_pos]
    return head_logits(model, hidden)


def full_forward(
    model, kind: str, ids: torch.Tensor, read_pos: int, targets: list, need_prob: bool, zeroed: list | None = None
) -> Scores:
    """Score (B, n) equal-length sequences at `read_pos` (causal LM) or the class logits (classifier).

    `zeroed`: per row, positions whose token embedding is set to zero (the deletion by zeroed embedding
    of the AttnLRP paper's perturbation protocol); position embeddings, where a model adds them, stay.
    """
    ids = ids.to(model.device)
    if zeroed is None:
        inputs = {"input_ids": ids}
    else:
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        for row, positions in enumerate(zeroed):
            mask[row, list(positions)] = True
        inputs = {"inputs_embeds": model.get_input_embeddings()(ids).masked_fill(mask[..., None], 0.0)}
    return score_logits(read_logits(model, kind, inputs, read_pos), targets, need_prob)


def clean_cache(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of one clean text, each (1, kv_heads, n, head_dim)."""
    out = model.base_model(input_ids=ids.to(model.device)[None], use_cache=True)
    return [(layer.keys, layer.values) for layer in output_cache(out).layers]


def packed_suffix_forward(
    model,
    caches,
    suffixes: list[Suffix],
    row_capacity: int,
    return_caches: bool = False,
    layout: list | None = None,
    embeds_fn=None,
):
    """Hidden state at the last token of each suffix, (len(suffixes), hidden), via the prefix caches.

    `caches[t]` is `clean_cache` of text t. Keys of a row: [all texts' cached positions | the row].
    With `return_caches`, also each suffix's own per-layer (keys, values), each (1, kv_heads, n, d).
    `layout`, a list, receives each suffix's (row, first column among the keys, first column among
    the queries), for callers that read per-suffix blocks of what the forward produced (attention).
    `embeds_fn(row_ids)`, when given, makes the rows' input embeddings (LRP differentiates w.r.t. them).
    """
    device = model.device
    cached = [layers[0][0].shape[-2] for layers in caches]  # cached length of each text
    plan = RowLayout.of(suffixes, cached, row_capacity)
    rows, row_offsets, total, width = plan.rows, plan.prefix_offsets, plan.prefix_width, plan.query_width
    lengths = [len(s.ids) for s in suffixes]
    n_rows = len(rows)

    ids = torch.zeros(n_rows, width, dtype=torch.long)
    positions = torch.zeros(n_rows, width, dtype=torch.long)
    key_positions = torch.zeros(n_rows, total + width, dtype=torch.long)  # each key column's position
    allowed = torch.zeros(n_rows, width, total + width, dtype=torch.bool)
    ends = [None] * len(suffixes)
    starts = [None] * len(suffixes)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s = suffixes[i]
            n = lengths[i]
            ids[r, at : at + n] = torch.tensor(s.ids)
            positions[r, at : at + n] = torch.arange(s.start, s.start + n)
            if s.start:
                prefix = row_offsets[r][s.text]
                allowed[r, at : at + n, prefix : prefix + s.start] = True  # the clean prefix
            allowed[r, at : at + n, total + at : total + at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            ends[i] = (r, at + n - 1)
            starts[i] = (r, at)
            at += n
        # padding queries attend to themselves only, so no softmax row is empty (NaN)
        pad = torch.arange(at, width)
        allowed[r, pad, total + pad] = True
        for t, off in row_offsets[r].items():
            key_positions[r, off : off + cached[t]] = torch.arange(cached[t])
    key_positions[:, total:] = positions

    dtype = next(model.parameters()).dtype
    mask = _row_masks(model, allowed, positions, key_positions, dtype)
    from transformers import DynamicCache

    cache = DynamicCache()
    if total:
        layer_kv = []
        for li in range(len(caches[0])):
            k0, v0 = caches[0][li]
            keys = k0.new_zeros(n_rows, k0.shape[1], total, k0.shape[3])
            values = v0.new_zeros(n_rows, v0.shape[1], total, v0.shape[3])
            for r, offsets in enumerate(row_offsets):
                for t, off in offsets.items():
                    keys[r, :, off : off + cached[t]] = caches[t][li][0][0]
                    values[r, :, off : off + cached[t]] = caches[t][li][1][0]
            layer_kv.append((keys, values))
        cache = DynamicCache(ddp_cache_data=layer_kv)
    if layout is not None:  # filled before the forward: hooks running inside it may read it
        layout.extend((r, total + at, at) for r, at in starts)
    inputs = {"input_ids": ids.to(device)} if embeds_fn is None else {"inputs_embeds": embeds_fn(ids.to(device))}
    out = model.base_model(
        **inputs,
        position_ids=positions.to(device),
        attention_mask={k: m.to(device) for k, m in mask.items()} if isinstance(mask, dict) else mask.to(device),
        **cache_kwargs(model, cache),
        use_cache=True,
    )
    r_idx = torch.tensor([e[0] for e in ends], device=device)
    c_idx = torch.tensor([e[1] for e in ends], device=device)
    hidden = out.last_hidden_state[r_idx, c_idx]
    if not return_caches:
        return hidden
    own = []
    for (r, at), n in zip(starts, lengths, strict=True):
        cols = slice(total + at, total + at + n)
        # clone: a view would keep the whole batch's cache alive as long as any one text's is
        own.append(
            [
                (layer.keys[r : r + 1, :, cols].clone(), layer.values[r : r + 1, :, cols].clone())
                for layer in output_cache(out).layers
            ]
        )
    return hidden, own
