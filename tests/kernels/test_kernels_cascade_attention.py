"""kernels.cascade_attention: the torch path (values and gradients) against the float64 oracle that
concatenates each query's keys explicitly, within the float32 noise of the oracle itself; the Triton
kernels (under TRITON_INTERPRET=1 on the CPU) against the oracle with an error at most 3x the float32
torch path's; the log-sum-exp merge; the engine's scope restores the model."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch
from conftest import assert_within_fp32_noise, make_tokenizer, tiny_llama

from kernels.cascade_attention import CascadeIntervals, cascade_attention, cascade_attention_ref, merge_states

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def _layout(prefix_lengths, n_suffixes, seed, window=None):
    """A packed row of suffixes over prefixes of `prefix_lengths` (concatenated), as the engine lays them
    out: each suffix starts at a random position of its group's prefix (0: reads none; the prefix's
    length: reads it all) and is 1 to 9 tokens long; with `window`, intervals narrowed as a sliding
    window narrows them. -> (own_lo, own_hi, prefix_lo, prefix_hi, groups, n_own, n_prefix)."""
    rng = random.Random(seed)
    offsets = [sum(prefix_lengths[:g]) for g in range(len(prefix_lengths))]
    suffixes = sorted((rng.randrange(len(prefix_lengths)), rng.randint(1, 9)) for _ in range(n_suffixes))
    own_lo, own_hi, p_lo, p_hi, groups, col = [], [], [], [], [], 0
    for g, n in suffixes:
        start = rng.choice([0, prefix_lengths[g], rng.randint(0, prefix_lengths[g])])
        for j in range(n):
            lo, plo = col, offsets[g]
            if window is not None:  # keys less than `window` positions back
                lo = max(col, col + j - window + 1)
                plo = min(max(offsets[g], offsets[g] + start + j - window + 1), offsets[g] + start)
            own_lo.append(lo), own_hi.append(col + j + 1), p_lo.append(plo), p_hi.append(offsets[g] + start)
            groups.append(g)
        col += n
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return t(own_lo), t(own_hi), t(p_lo), t(p_hi), t(groups), col, sum(prefix_lengths)


def _tensors(heads, kv_heads, n_own, n_prefix, dim, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(heads, n_own, dim)] + [(kv_heads, n_own, dim)] * 2 + [(kv_heads, max(n_prefix, 1), dim)] * 2
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


CASES = [  # query heads, key heads, head dim, prefix lengths, suffixes, sliding window
    (1, 1, 4, [1], 1, None),
    (4, 2, 8, [5, 7], 6, None),
    (6, 3, 5, [3, 17, 1, 9], 13, None),
    (4, 4, 16, [40], 20, None),
    (4, 2, 8, [6, 11], 9, 4),
    (2, 1, 8, [], 7, None),  # whole texts, no prefix: the varlen form
]


def _args(case, seed):
    heads, kv_heads, dim, prefixes, n_suffixes, window = case
    own_lo, own_hi, p_lo, p_hi, groups, n_own, n_prefix = _layout(prefixes or [0], n_suffixes, seed, window)
    q, k, v, pk, pv = _tensors(heads, kv_heads, n_own, n_prefix, dim, seed)
    prefix = (p_lo, p_hi) if prefixes else (None, None)
    pkv = (pk, pv) if prefixes else (None, None)
    return (q, k, v, own_lo, own_hi, *prefix, n_own, n_prefix, groups, pkv)


def _run(args, backend, dtype, block=32, segmented=True, softcap=None, scaling=0.4):
    q, k, v, own_lo, own_hi, p_lo, p_hi, n_own, n_prefix, groups, (pk, pv) = args
    intervals = CascadeIntervals.of(
        own_lo, own_hi, n_own, p_lo, p_hi, n_prefix, groups if segmented else None, block=block
    )
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cascade_attention(
        cast(q), cast(k), cast(v), intervals, cast(pk), cast(pv), scaling=scaling, softcap=softcap, backend=backend
    )


def _oracle(args, dtype=torch.float64, softcap=None, scaling=0.4):
    q, k, v, own_lo, own_hi, p_lo, p_hi, _, _, _, (pk, pv) = args
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cascade_attention_ref(
        cast(q), cast(k), cast(v), own_lo, own_hi, cast(pk), cast(pv), p_lo, p_hi, scaling=scaling, softcap=softcap
    )


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("block,segmented", [(1, True), (7, False), (7, True), (32, True)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}p{len(c[3])}s{c[4]}w{c[5]}")
def test_torch_path_equals_the_oracle(case, block, segmented, softcap):
    args = _args(case, _seed(case, block))
    got = _run(args, "torch", torch.float32, block, segmented, softcap)
    assert got.dtype == torch.float32 and got.shape == args[0].shape
    assert_within_fp32_noise(got, _oracle(args, softcap=softcap), _oracle(args, torch.float32, softcap=softcap))
    # float64 in, float64 out, to float64 rounding
    in64 = _run(args, "torch", torch.float64, block, segmented, softcap)
    torch.testing.assert_close(in64, _oracle(args, softcap=softcap))


@pytest.mark.parametrize("case", CASES[1:], ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}p{len(c[3])}s{c[4]}w{c[5]}")
def test_torch_path_gradients_equal_the_oracles(case):
    """The torch path is differentiable (IG and LRP run through it): gradients of a random projection
    of the output w.r.t. queries, keys and values (own and prefix) equal the oracle's, in float64."""
    args = _args(case, _seed(case, "grad"))
    weights = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (*args[:3], *args[-1])]
        new = (*leaves[:3], *args[3:-1], (leaves[3], leaves[4]))
        (fn(new) * weights).sum().backward()
        return [t.grad for t in leaves if t is not None]

    for got, expected in zip(grads(lambda a: _run(a, "torch", torch.float64)), grads(_oracle), strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.skipif(not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1 (the test suite's conftest sets it)")
@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}p{len(c[3])}s{c[4]}w{c[5]}")
def test_triton_kernel_error_within_3x_of_torch(case, softcap):
    args = _args(case, _seed(case, "triton"))
    expected = _oracle(args, softcap=softcap)
    torch_err = (_run(args, "torch", torch.float32, softcap=softcap).double() - expected).abs().max().item()
    triton_err = (_run(args, "triton", torch.float32, softcap=softcap).double() - expected).abs().max().item()
    assert triton_err <= 3 * torch_err + 1e-7, (triton_err, torch_err)


@pytest.mark.skipif(not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1 (the test suite's conftest sets it)")
def test_triton_interval_pass_and_merge():
    """One pass of the kernel returns each query's log-sum-exp (-inf for an empty interval), and
    merging two passes over a split of the keys equals one softmax over all of them."""
    from kernels.cascade_attention import interval_attention_triton

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, n, 8, generator=g, dtype=torch.float64) for n in (9, 12, 12))
    k, v = k[:2], v[:2]
    lo = torch.tensor([0, 0, 3, 5, 0, 7, 2, 4, 4])
    hi = torch.tensor([12, 1, 9, 5, 6, 12, 3, 11, 4])  # two empty intervals
    scores = torch.einsum("hnd,hkd->hnk", q, k.repeat_interleave(2, 0)) * 0.5
    inside = (torch.arange(12) >= lo[:, None]) & (torch.arange(12) < hi[:, None])
    lse = torch.logsumexp(scores.masked_fill(~inside, float("-inf")), -1)
    out, got = interval_attention_triton(q.float(), k.float(), v.float(), lo, hi, 0.5)
    assert torch.isinf(got[:, [3, 8]]).all() and (out[:, [3, 8]] == 0).all()
    keep = hi > lo
    torch.testing.assert_close(got[:, keep].double(), lse[:, keep], rtol=1e-5, atol=1e-5)
    mid = 6  # keys [0, 6) and [6, 12), merged
    a = interval_attention_triton(q.float(), k.float(), v.float(), lo.clamp(max=mid), hi.clamp(max=mid), 0.5)
    b = interval_attention_triton(q.float(), k.float(), v.float(), lo.clamp(min=mid), hi.clamp(min=mid), 0.5)
    merged, merged_lse = merge_states(*a, *b)
    torch.testing.assert_close(merged[:, keep], out[:, keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged_lse[:, keep], got[:, keep], rtol=1e-5, atol=1e-5)


def test_bad_input_is_a_clear_error():
    lo, hi = torch.tensor([0, 0]), torch.tensor([1, 2])
    intervals = CascadeIntervals.of(lo, hi, 2)
    q, k = torch.randn(4, 2, 8), torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="multiple of the key heads"):
        cascade_attention(q, k, k, intervals)
    with pytest.raises(ValueError, match="intervals are for"):
        cascade_attention(torch.randn(4, 3, 8), k[:2], k[:2], intervals)
    with pytest.raises(ValueError, match="must lie within"):
        CascadeIntervals.of(lo, torch.tensor([1, 3]), 2)
    with pytest.raises(ValueError, match="non-empty own interval"):
        CascadeIntervals.of(lo, torch.tensor([1, 0]), 2)
    with_prefix = CascadeIntervals.of(lo, hi, 2, lo, hi, 2)
    with pytest.raises(ValueError, match="prefix_key"):
        cascade_attention(q, k[:2], k[:2], with_prefix)
    with pytest.raises(ValueError, match="backend"):
        cascade_attention(q, k[:2], k[:2], intervals, backend="cuda")


def test_scope_restores_the_model_even_on_error():
    """The engine's cascade scope switches one model's attention and marks its attention modules for
    the forward, and undoes both on exit, also when the forward raises."""
    from engine.runtime.attention_capture import attention_modules
    from engine.runtime.cascade import _STATE, CascadePlan, cascade_scope

    model, _ = tiny_llama(), make_tokenizer()
    before = model.config._attn_implementation
    plan = CascadePlan(["full_attention"] * 3, {}, None, "torch")
    with pytest.raises(RuntimeError, match="boom"), cascade_scope(model, plan):
        assert model.config._attn_implementation == "engine_cascade"
        assert all(getattr(m, _STATE)[1] is plan for m, _ in attention_modules(model))
        raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, _STATE) for m, _ in attention_modules(model))


@pytest.mark.skipif(not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1 (the test suite's conftest sets it)")
@pytest.mark.parametrize("family_name", ["llama", "mistral"])
def test_engine_forward_on_the_triton_kernels_equals_dense_rows(family_name):
    """The engine's cascade forward with the Triton kernels (as it runs on CUDA) against the dense
    packed-row forward it replaces, within the float32 noise of the dense forward in float64: leave-one-out
    suffixes of three texts over their prefix caches, shuffled; Mistral with a sliding window of 3."""
    from conftest import float64_copy
    from transformers import MistralConfig, MistralForCausalLM

    from engine.runtime.cascade import cascade_forward
    from engine.runtime.forward import packed_suffix_forward
    from engine.runtime.layout import Suffix

    if family_name == "llama":
        model = tiny_llama()
    else:
        torch.manual_seed(0)
        config = MistralConfig(vocab_size=44, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=3)  # fmt: skip
        model = MistralForCausalLM(config).eval()
    rng = random.Random(_seed(family_name))
    texts = [tuple(rng.randrange(4, 40) for _ in range(n)) for n in (5, 9, 3)]
    suffixes = [Suffix(t, s, (0, *texts[t][s + 1 :])) for t in range(3) for s in range(len(texts[t]))]
    rng.shuffle(suffixes)
    with torch.no_grad():
        dense = {}
        for name, m in (("exact", float64_copy(model)), ("fp32", model)):
            caches = packed_suffix_forward(m, [], [Suffix(0, 0, t) for t in texts], 8, return_caches=True)[1]
            dense[name] = packed_suffix_forward(m, caches, suffixes, 7)
        caches = cascade_forward(model, [], [Suffix(0, 0, t) for t in texts], return_caches=True, backend="triton")[1]
        got = cascade_forward(model, caches, suffixes, backend="triton")
    assert_within_fp32_noise(got, dense["exact"], dense["fp32"], what=family_name)
