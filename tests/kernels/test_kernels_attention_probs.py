"""kernels.attention_probs: the torch path against float64 eager softmax, the Triton kernels (under
TRITON_INTERPRET=1 on the CPU) against the float64 reference with an error at most 3x the float32
torch path's, and both against the tiny models' own `output_attentions`."""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from conftest import assert_within_fp32_noise, float64_copy

from engine import reference as ref
from kernels.attention_probs import attention_probs, row_logsumexp_torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def _inputs(batch, heads, kv_heads, seq, keys, dim, mask_kind, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, keys, dim, generator=g, dtype=torch.float64)
    mask = None
    if mask_kind == "causal":  # queries are the last `seq` of `keys` positions (a cached prefix before them)
        allowed = torch.ones(seq, keys, dtype=torch.bool).tril(keys - seq)
        mask = torch.zeros(1, 1, seq, keys, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float32).min)
    elif mask_kind == "padding":  # per sequence: keys beyond its length are blocked
        lengths = torch.randint(1, keys + 1, (batch,), generator=g)
        allowed = torch.arange(keys)[None, :] < lengths[:, None]
        mask = torch.zeros(batch, 1, seq, keys, dtype=torch.float64)
        mask = mask.masked_fill(~allowed[:, None, None, :], -1e30)
    return q, k, mask


def _reference(q, k, mask, fusion, scaling):
    group = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * scaling
    if mask is not None:
        s = s + mask
    return ref.fuse_heads(torch.softmax(s, -1), fusion)


SHAPES = [  # batch, heads, kv heads, queries, keys, head dim
    (1, 1, 1, 1, 1, 4),
    (2, 4, 2, 7, 7, 8),
    (3, 3, 1, 17, 23, 5),
    (2, 6, 3, 70, 70, 16),
]


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("mask_kind", [None, "causal", "padding"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_path_equals_float64_softmax(fusion, mask_kind, shape):
    q, k, mask = _inputs(*shape, mask_kind, seed=zlib.crc32(repr((fusion, mask_kind, shape)).encode()))
    scaling = 0.37
    expected = _reference(q, k, mask, fusion, scaling)
    got = attention_probs(
        q.float(), k.float(), fusion, None if mask is None else mask.float(), scaling, backend="torch"
    )
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # within the float32 noise of the reference formula itself on these inputs
    fp32 = _reference(q.float(), k.float(), None if mask is None else mask.float(), fusion, scaling)
    assert_within_fp32_noise(got, expected, fp32)
    # a given log-sum-exp (what flash attention returns) gives the same maps
    lse = row_logsumexp_torch(q.float(), k.float(), None if mask is None else mask.float(), scaling)
    again = attention_probs(q.float(), k.float(), fusion, None if mask is None else mask.float(), scaling, lse=lse)
    torch.testing.assert_close(again, got)


@pytest.mark.skipif(not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1 (the test suite's conftest sets it)")
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("mask_kind", [None, "causal", "padding"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_kernel_error_within_3x_of_torch(fusion, mask_kind, shape):
    q, k, mask = _inputs(*shape, mask_kind, seed=1 + zlib.crc32(repr((fusion, mask_kind, shape)).encode()))
    scaling = shape[-1] ** -0.5
    expected = _reference(q, k, mask, fusion, scaling)
    args = (q.float(), k.float(), fusion, None if mask is None else mask.float(), scaling)
    torch_err = (attention_probs(*args, backend="torch").double() - expected).abs().max().item()
    triton_err = (attention_probs(*args, backend="triton").double() - expected).abs().max().item()
    assert triton_err <= 3 * torch_err + 1e-7, (triton_err, torch_err)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_equals_the_models_output_attentions(family, backend, monkeypatch):
    """Post-rotary queries and keys from the model's own attention calls (the engine's "recompute"
    capture), through either backend, against the model's eager `output_attentions`."""
    if backend == "triton" and not INTERPRETED:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    import kernels.attention_probs as module
    from engine.runtime.attention_capture import fused_attention

    name, model, tok = family
    ids = tok("the cat sat on the mat today", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids, output_attentions=True).attentions
        exact = float64_copy(model)(ids, output_attentions=True).attentions
    real = module.attention_probs
    monkeypatch.setattr(module, "attention_probs", lambda *a, **k: real(*a, **{**k, "backend": backend}))
    got = {}
    with torch.no_grad(), fused_attention(model, "min", lambda layer, f: got.setdefault(layer, f), "recompute"):
        model(ids)
    for layer, attn in enumerate(expected):
        e, r = ref.fuse_heads(exact[layer], "min"), ref.fuse_heads(attn, "min")
        assert_within_fp32_noise(got[layer], e, r, what=f"{name} layer {layer}")


def test_bad_input_is_a_clear_error():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match="multiple of the key heads"):
        attention_probs(q, k)
    with pytest.raises(ValueError, match="head_fusion"):
        attention_probs(q, q, "median")
    with pytest.raises(ValueError, match="mask must be"):
        attention_probs(q, q, mask=torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="backend"):
        attention_probs(q, q, backend="cuda")
