"""Cascade (shared-prefix) attention for packed perturbation suffixes, and its varlen form.

    from kernels.cascade_attention import CascadeIntervals, cascade_attention
    intervals = CascadeIntervals.of(own_lo, own_hi, n_own, prefix_lo, prefix_hi, n_prefix, segments)
    out = cascade_attention(query, key, value, intervals, prefix_key, prefix_value, scaling, softcap)

A batch of perturbations is many short suffixes, each extending a cached prefix (its clean text's, or a
prefix shared by several coalitions). Laid out as one packed row of query tokens, each query needs
two contiguous key ranges: [prefix_lo, prefix_hi) of the batch's cached prefixes (concatenated once
per batch, not copied into every row), and [own_lo, own_hi) of the row itself (its own suffix, up to
itself). Attention over the union of the two (FlashInfer's cascade attention; vLLM's cascade
attention for a common prefix):

- "triton": pass 1 attends each query to its prefix interval (a query block reads its group's
  prefix once for all its queries), pass 2 to its own interval, each an online-softmax kernel that
  returns its output and log-sum-exp, merged by `merge_states`;
- "torch" (the CPU path): queries in blocks (`CascadeIntervals`, within one group each); a block
  gathers the span of prefix keys and the span of own keys its queries need, side by side, once per
  forward's layer, and one fused SDPA call per layer attends every block to its keys under an
  additive bias: the same softmax over the same union of keys, in one pass, so no log-sum-exp is
  needed and autograd differentiates it (packed IG steps);
- "auto": Triton on CUDA tensors that do not require grad, torch elsewhere.

Whole texts packed end to end (the clean pass, IG steps) have no prefix: block-diagonal causal
attention (the varlen form). `cascade_attention_ref` is the oracle: one query and head at a time, its
keys concatenated explicitly, a plain softmax.

Shapes (one packed row: the model's batch dimension of 1 is dropped): `query` (Hq, Nq, d), `key` and
`value` (Hkv, Nq, d) (the row's own), `prefix_key` and `prefix_value` (Hkv, P, d); grouped-query heads
(query head h reads key head h // (Hq / Hkv)); intervals (Nq,) int64. Output (Hq, Nq, d) in the query's
dtype. `softcap` (Gemma 2) caps scores as tanh(s / cap) * cap. Every query must have at least one key
(its own position).

Memory traffic per layer: the prefixes' K and V are read once per query block (Triton) or gathered
once into (nblocks, width, Hkv, d) (torch); the dense packed-row layout this replaces copied each
prefix into every row that served one of its suffixes and computed every key column of the row
(other texts' prefixes and suffixes, masked) for every query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import choose_backend, upcast

TORCH_BLOCK = 32  # queries per block on the torch path: a block's own-key span is its width plus its longest suffix


def _spans(lo, hi, nblocks: int, block: int, slots):
    """Per block: the first key of its non-empty intervals and how many keys its span holds, and
    each slot's interval ((nblocks, block); empty slots get [0, 0))."""
    lo_p = lo.new_zeros(nblocks * block).index_copy_(0, slots, lo).view(nblocks, block)
    hi_p = hi.new_zeros(nblocks * block).index_copy_(0, slots, hi).view(nblocks, block)
    nonempty = hi_p > lo_p
    big = torch.iinfo(torch.int64).max
    first = torch.where(nonempty, lo_p, big).amin(1)
    first = torch.where(first == big, 0, first)
    width = int((torch.where(nonempty, hi_p, 0).amax(1) - first).clamp(min=0).max())
    return first, width, lo_p, hi_p


@dataclass(frozen=True)
class CascadeIntervals:
    """Each query's two key intervals, and the torch path's blocking of them, computed once per
    forward (every layer and head reuses it)."""

    own_lo: torch.Tensor  # (Nq,) int64: first own key (the row's) each query may attend to
    own_hi: torch.Tensor  # (Nq,) int64: one past its last
    prefix_lo: torch.Tensor | None  # (Nq,) int64: first prefix key; None: no query reads a prefix
    prefix_hi: torch.Tensor | None
    n_own: int  # keys of the row
    n_prefix: int  # keys of the concatenated prefixes
    slots: torch.Tensor  # (Nq,) int64: each query's slot in the torch path's (nblocks * block) grid
    queries: torch.Tensor  # (nblocks, block) int64: the query in each slot (0 for an empty slot)
    index: torch.Tensor  # (nblocks, width) int64: the keys each block gathers, into [prefixes | own]
    bias: torch.Tensor  # (nblocks, 1, block, width) float32: 0 where the slot's query may attend, -inf elsewhere

    @classmethod
    def of(cls, own_lo, own_hi, n_own: int, prefix_lo=None, prefix_hi=None, n_prefix: int = 0,
           segments: torch.Tensor | None = None, block: int = TORCH_BLOCK) -> CascadeIntervals:  # fmt: skip
        """`segments` (Nq,): queries are blocked within runs of equal segment ids (the prefix group),
        so a block's prefix span is one group's prefix, not two; without it, blocks are consecutive."""
        own_lo, own_hi = own_lo.long(), own_hi.long()
        nq = own_lo.numel()
        pairs = [(own_lo, own_hi, n_own, "own")]
        if prefix_lo is not None:
            prefix_lo, prefix_hi = prefix_lo.long(), prefix_hi.long()
            pairs.insert(0, (prefix_lo, prefix_hi, n_prefix, "prefix"))
        for lo, hi, n, name in pairs:
            if lo.shape != (nq,) or hi.shape != (nq,):
                raise ValueError(f"{name} intervals must be ({nq},), got {tuple(lo.shape)} and {tuple(hi.shape)}")
            if nq and (bool((lo < 0).any()) or bool((hi > n).any())):
                raise ValueError(f"{name} intervals must lie within its {n} keys")
        if nq and not bool((own_hi > own_lo).all()):
            raise ValueError("every query needs a non-empty own interval (at least itself)")
        at = torch.arange(nq, device=own_lo.device)
        if segments is None:
            slots = at
        else:  # each run of equal segment ids starts a new block
            starts = torch.ones(nq, dtype=torch.bool, device=at.device)
            starts[1:] = segments[1:] != segments[:-1]
            run_pos = at - torch.cummax(torch.where(starts, at, 0), 0).values
            slots = (torch.cumsum(run_pos % block == 0, 0) - 1) * block + run_pos % block
        nblocks = int(slots[-1]) // block + 1 if nq else 1
        queries = at.new_zeros(nblocks * block).index_copy_(0, slots, at).view(nblocks, block)
        index, allowed, offset = [], [], 0
        for lo, hi, n, _ in pairs:  # the prefix span first, then the own span: keys [prefixes | own]
            first, width, lo_p, hi_p = _spans(lo, hi, nblocks, block, slots)
            keys = first[:, None] + torch.arange(width, device=at.device)
            allowed.append((keys[:, None, :] >= lo_p[..., None]) & (keys[:, None, :] < hi_p[..., None]))
            index.append(keys.clamp(max=max(n - 1, 0)) + offset)
            offset += n
        allowed = torch.cat(allowed, -1)
        allowed[..., -1] |= ~allowed.any(-1)  # an empty slot attends to one key: no row of -inf only
        bias = torch.zeros(allowed.shape, device=at.device).masked_fill_(~allowed, float("-inf"))[:, None]
        return cls(own_lo, own_hi, prefix_lo, prefix_hi, n_own, n_prefix, slots, queries, torch.cat(index, -1), bias)


def _softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def cascade_attention_torch(query, key, value, intervals: CascadeIntervals, prefix_key=None, prefix_value=None,
                            scaling=None, softcap=None):  # fmt: skip
    """The torch path: gather each block's queries and its keys [prefix span | own span], one
    attention call over all blocks (SDPA; a step-by-step softmax where scores are soft-capped)."""
    hq, nq, dim = query.shape
    hkv = key.shape[0]
    scaling = dim**-0.5 if scaling is None else scaling
    nblocks, _, block, width = intervals.bias.shape
    # token-major gathers: a model's (H, N, d) states are views of (N, H, d) memory
    q = upcast(query).transpose(0, 1).index_select(0, intervals.queries.view(-1))
    q = q.view(nblocks, block, hq, dim).transpose(1, 2)  # (nblocks, Hq, block, d)
    k, v = upcast(key).transpose(0, 1), upcast(value).transpose(0, 1)
    if intervals.prefix_lo is not None:  # one key source, [prefixes | own]: one gather per block
        k = torch.cat([upcast(prefix_key).transpose(0, 1), k])
        v = torch.cat([upcast(prefix_value).transpose(0, 1), v])
    keys = intervals.index.view(-1)
    k = k.index_select(0, keys).view(nblocks, width, hkv, dim).transpose(1, 2)  # (nblocks, Hkv, width, d)
    v = v.index_select(0, keys).view(nblocks, width, hkv, dim).transpose(1, 2)
    bias = intervals.bias.to(q.dtype)
    if softcap:
        group = hq // hkv
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = _softcapped(torch.matmul(q, k.transpose(-1, -2)) * scaling, softcap) + bias
        out = torch.matmul(torch.softmax(scores, -1), v)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=scaling, enable_gqa=hq != hkv
        )
    # back to the queries' order: (Nq, Hq, d) memory, returned as (Hq, Nq, d)
    out = out.transpose(1, 2).reshape(nblocks * block, hq, dim).index_select(0, intervals.slots)
    return out.transpose(0, 1).to(query.dtype)


def interval_attention_triton(query, key, value, lo, hi, scaling=None, softcap=None):
    """(out (Hq, Nq, d), lse (Hq, Nq) float32) of each query over its key interval [lo, hi) of `key`:
    the host wrapper (check, allocate, grid, launch) of `_cascade_attention_triton`. A query whose
    interval is empty gets output 0 and log-sum-exp -inf."""
    import triton

    from ._cascade_attention_triton import interval_attention_kernel

    hq, nq, dim = query.shape
    hkv, nk = key.shape[0], key.shape[1]
    scaling = dim**-0.5 if scaling is None else float(scaling)
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    lo, hi = lo.contiguous(), hi.contiguous()
    out = torch.empty(hq, nq, dim, device=query.device, dtype=torch.float32)
    lse = torch.empty(hq, nq, device=query.device, dtype=torch.float32)
    block_m, block_n = 32, 32
    block_d = max(16, triton.next_power_of_2(dim))
    grid = (triton.cdiv(max(nq, 1), block_m), hq)
    interval_attention_kernel[grid](
        q, k, v, lo, hi, out, lse,
        nq, nk, dim, hq // hkv, scaling, float(softcap or 0.0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        HAS_SOFTCAP=bool(softcap), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return out, lse


def merge_states(out_a, lse_a, out_b, lse_b):
    """Two partial attentions over disjoint key sets -> the attention over their union: each output
    weighted by its share of the total softmax mass, exp(lse_x - lse). A side with lse = -inf (no
    keys) gets weight 0; the other must have keys."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None], lse


def cascade_attention_triton(query, key, value, intervals: CascadeIntervals, prefix_key=None, prefix_value=None,
                             scaling=None, softcap=None):  # fmt: skip
    """Pass 2 (own suffix) and, where a prefix is read, pass 1 (prefix), merged by log-sum-exp."""
    out, lse = interval_attention_triton(query, key, value, intervals.own_lo, intervals.own_hi, scaling, softcap)
    if intervals.prefix_lo is not None:
        out_p, lse_p = interval_attention_triton(
            query, prefix_key, prefix_value, intervals.prefix_lo, intervals.prefix_hi, scaling, softcap
        )
        out, _ = merge_states(out_p, lse_p, out, lse)
    return out.to(query.dtype)


def cascade_attention(query, key, value, intervals: CascadeIntervals, prefix_key=None, prefix_value=None,
                      scaling=None, softcap=None, backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """Each query's attention over its prefix interval of `prefix_key` and its own interval of `key`
    (the module docstring); returns (Hq, Nq, d)."""
    if query.dim() != 3 or key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            f"query must be (Hq, Nq, d) and key, value (Hkv, Nq, d) alike; got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[2] != key.shape[2] or query.shape[0] % key.shape[0] != 0:
        raise ValueError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)}: same head dim, "
                         "and the query heads a multiple of the key heads")  # fmt: skip
    if intervals.own_lo.numel() != query.shape[1] or intervals.n_own != key.shape[1]:
        raise ValueError(f"intervals are for {intervals.own_lo.numel()} queries over {intervals.n_own} own keys, "
                         f"got {query.shape[1]} queries and {key.shape[1]} keys")  # fmt: skip
    if intervals.prefix_lo is not None and (prefix_key is None or prefix_key.shape[1] != intervals.n_prefix):
        raise ValueError(f"the intervals read {intervals.n_prefix} prefix keys: pass prefix_key and prefix_value")
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, prefix_key))
    triton_ok = not grad and query.dtype != torch.float64
    if choose_backend(backend, query, triton_ok=triton_ok) == "triton":
        return cascade_attention_triton(query, key, value, intervals, prefix_key, prefix_value, scaling, softcap)
    return cascade_attention_torch(query, key, value, intervals, prefix_key, prefix_value, scaling, softcap)


def cascade_attention_ref(query, key, value, own_lo, own_hi, prefix_key=None, prefix_value=None,
                          prefix_lo=None, prefix_hi=None, scaling=None, softcap=None):  # fmt: skip
    """The oracle: for each query, its keys [prefix_key[plo:phi] | key[lo:hi]] concatenated explicitly
    and a plain softmax over them, one query and one head at a time, in the inputs' dtype (float64 in
    the tests)."""
    hq, nq, dim = query.shape
    group = hq // key.shape[0]
    scaling = dim**-0.5 if scaling is None else scaling
    out = torch.zeros_like(query)
    for i in range(nq):
        for h in range(hq):
            ks, vs = [key[h // group, own_lo[i] : own_hi[i]]], [value[h // group, own_lo[i] : own_hi[i]]]
            if prefix_key is not None:
                ks.insert(0, prefix_key[h // group, prefix_lo[i] : prefix_hi[i]])
                vs.insert(0, prefix_value[h // group, prefix_lo[i] : prefix_hi[i]])
            k, v = torch.cat(ks), torch.cat(vs)
            out[h, i] = torch.softmax(_softcapped(k @ query[h, i] * scaling, softcap), 0) @ v
    return out
