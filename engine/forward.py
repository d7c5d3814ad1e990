"""Batched forward passes that score only what the methods read.

- `score_rows`: the language-model head applied to the read positions only (not every position),
  and the softmax only for rows that need a probability.
- `full_forward`: equal-length sequences stacked without padding (the full-recompute path; the only
  path for sequence classifiers, whose attention may be bidirectional).
- `packed_suffix_forward`: the prefix-reuse path for causal LMs. A perturbation whose first changed
  token is s leaves positions < s unchanged, so it runs only its suffix, attending to the clean text's
  key/value cache for the prefix. Suffixes of several texts are packed end to end into rows with a
  block-structured 4-D mask over the concatenated clean caches; each suffix sees its own text's
  first s cached positions and itself, causally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import CLASSIFIER

# an additive mask value that stays finite in float32 and bfloat16 softmax inputs
_BLOCKED = -1e30


def _base_and_head(model):
    return model.base_model, model.get_output_embeddings()


def _head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits for the given hidden rows, with the final soft-capping some models apply."""
    logits = model.get_output_embeddings()(hidden).float()
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
    logits = logits.float()
    argmax = logits.argmax(dim=-1)
    chosen = torch.tensor([-1 if t is None else t for t in targets], device=logits.device)
    chosen = torch.where(chosen < 0, argmax, chosen)
    logit = logits.gather(-1, chosen[:, None])[:, 0]
    prob = torch.exp(logit - torch.logsumexp(logits, dim=-1)) if need_prob else None
    return Scores(logit=logit, prob=prob, argmax=argmax)


def full_forward(model, kind: str, ids: torch.Tensor, read_pos: int, targets: list, need_prob: bool) -> Scores:
    """Score (B, n) equal-length sequences at `read_pos` (causal LM) or the class logits (classifier)."""
    ids = ids.to(model.device)
    if kind == CLASSIFIER:
        return score_logits(model(input_ids=ids).logits, targets, need_prob)
    base, _ = _base_and_head(model)
    hidden = base(input_ids=ids, use_cache=False).last_hidden_state[:, read_pos]
    return score_logits(_head_logits(model, hidden), targets, need_prob)


def clean_cache(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of one clean text, each (1, kv_heads, n, head_dim)."""
    base, _ = _base_and_head(model)
    out = base(input_ids=ids.to(model.device)[None], use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


@dataclass(frozen=True)
class Suffix:
    text: int  # which clean cache (index into the `caches` list passed with it)
    start: int  # first changed position s: positions < s come from the cache
    ids: tuple[int, ...]  # the perturbed tokens from position s to the end


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: item indices per row, each row's total length <= max(capacity, longest)."""
    capacity = max(capacity, max(lengths))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def packed_clean_caches(model, texts: list[tuple[int, ...]], row_capacity: int) -> list[list]:
    """`clean_cache` of several texts from one packed forward (each text a suffix starting at 0)."""
    suffixes = [Suffix(0, 0, ids) for ids in texts]
    _, caches = packed_suffix_forward(model, [], suffixes, row_capacity, return_caches=True)
    return caches


def packed_suffix_forward(model, caches, suffixes: list[Suffix], row_capacity: int, return_caches: bool = False):
    """Hidden state at the last token of each suffix, (len(suffixes), hidden), via the prefix caches.

    `caches[t]` is `clean_cache` of text t. Keys of a row: [all texts' cached positions | the row].
    With `return_caches`, also each suffix's own per-layer (keys, values), each (1, kv_heads, n, d).
    """
    device = model.device
    offsets, total = [], 0
    for layers in caches:
        offsets.append(total)
        total += layers[0][0].shape[-2]
    lengths = [len(s.ids) for s in suffixes]
    rows = pack_rows(lengths, row_capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    n_rows = len(rows)

    ids = torch.zeros(n_rows, width, dtype=torch.long)
    positions = torch.zeros(n_rows, width, dtype=torch.long)
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
            prefix = offsets[s.text] if s.start else 0  # a suffix from 0 reads no prefix
            allowed[r, at : at + n, prefix : prefix + s.start] = True  # the clean prefix
            allowed[r, at : at + n, total + at : total + at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            ends[i] = (r, at + n - 1)
            starts[i] = (r, at)
            at += n
        # padding queries attend to themselves only, so no softmax row is empty (NaN)
        pad = torch.arange(at, width)
        allowed[r, pad, total + pad] = True

    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, _BLOCKED)[:, None]
    from transformers import DynamicCache

    cache = (
        DynamicCache()
        if not caches
        else DynamicCache(
            ddp_cache_data=[
                (
                    torch.cat([layers[li][0] for layers in caches], dim=-2).expand(n_rows, -1, -1, -1),
                    torch.cat([layers[li][1] for layers in caches], dim=-2).expand(n_rows, -1, -1, -1),
                )
                for li in range(len(caches[0]))
            ]
        )
    )
    base, _ = _base_and_head(model)
    out = base(
        input_ids=ids.to(device),
        position_ids=positions.to(device),
        attention_mask=mask.to(device),
        past_key_values=cache,
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
                for layer in out.past_key_values.layers
            ]
        )
    return hidden, own
