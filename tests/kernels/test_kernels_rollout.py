"""kernels.rollout (torch path) against the reference, one sequence at a time, in float64."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from engine import reference as ref
from kernels import rollout


def _attentions(n_layers, batch, heads, size, lengths, generator):
    """Causal-softmax attention per sequence block; rows outside a sequence are noise it must ignore."""
    layers = []
    for _ in range(n_layers):
        a = torch.rand(batch, heads, size, size, generator=generator, dtype=torch.float64)  # padding garbage
        for b, n in enumerate(lengths):
            scores = torch.randn(heads, n, n, generator=generator, dtype=torch.float64)
            scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
            a[b, :, :n, :n] = scores.softmax(-1)
        layers.append(a)
    return layers


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("sizes", [[1], [7], [13, 5, 1, 13], [97, 64, 3]])
@pytest.mark.parametrize("causal_quantile", [False, True])
def test_rollout_torch_equals_reference_per_sequence(fusion, discard, sizes, causal_quantile):
    g = torch.Generator().manual_seed(zlib.crc32(repr((fusion, discard, tuple(sizes), causal_quantile)).encode()))
    size = max(sizes)
    layers = _attentions(3, len(sizes), 4, size, sizes, g)
    rows = [n - 1 - (n // 3) for n in sizes]  # not always the last position
    full = rollout(layers, fusion, discard, lengths=sizes, causal_quantile=causal_quantile)
    row = rollout(layers, fusion, discard, lengths=sizes, rows=rows, causal_quantile=causal_quantile)
    assert full.shape == (len(sizes), size, size) and row.shape == (len(sizes), size)
    for b, n in enumerate(sizes):
        alone = [a[b : b + 1, :, :n, :n] for a in layers]
        expected = ref.attention_rollout(alone, fusion, discard, causal_quantile)
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(full[b, :n, :n].double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(row[b, :n].double(), expected[rows[b]], rtol=1e-5, atol=1e-6)
        assert (full[b, n:] == 0).all() and (full[b, :, n:] == 0).all() and (row[b, n:] == 0).all()


def test_prefused_layers_and_bad_input():
    g = torch.Generator().manual_seed(0)
    layers = _attentions(2, 2, 3, 6, [6, 6], g)
    fused = [a.amax(1) for a in layers]
    torch.testing.assert_close(rollout(fused, fused=True), rollout(layers, "max"))
    with pytest.raises(ValueError, match="backend"):
        rollout(layers, backend="cuda")
    with pytest.raises(ValueError, match="head_fusion"):
        rollout(layers, "median")
    with pytest.raises(ValueError, match="discard_ratio"):
        rollout(layers, discard_ratio=1.0)
    with pytest.raises(ValueError, match="lengths"):
        rollout(layers, lengths=[7, 6])
    with pytest.raises(ValueError, match="rows"):
        rollout(layers, lengths=[3, 6], rows=[3, 0])
    with pytest.raises(ValueError, match="same shape"):
        rollout([layers[0], layers[1][:, :, :5, :5]])
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs CUDA"):
            rollout(layers, backend="triton")
    with pytest.raises(ValueError, match="fuses heads itself"):
        rollout(fused, backend="triton", fused=True)


# ------------------------------------------------------------------ Triton, under the CPU interpreter

triton = pytest.importorskip("triton")


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("sizes", [[1], [5, 17, 3], [23], [70, 13]])  # 70: more than one 64-wide tile
def test_triton_kernels_within_3x_of_torch_fp32_error(fusion, discard, sizes):
    g = torch.Generator().manual_seed(zlib.crc32(repr((fusion, discard, tuple(sizes))).encode()))
    size = max(sizes)
    layers64 = _attentions(3, len(sizes), 3, size, sizes, g)
    layers32 = [a.float() for a in layers64]
    rows = [n - 1 for n in sizes]
    for kwargs in ({}, {"rows": rows}):
        exact = rollout(layers64, fusion, discard, lengths=sizes, backend="torch", **kwargs)
        torch32 = rollout(layers32, fusion, discard, lengths=sizes, backend="torch", **kwargs)
        kernel = rollout(layers32, fusion, discard, lengths=sizes, backend="triton", **kwargs)
        assert kernel.shape == exact.shape
        torch_err = (torch32.double() - exact).abs().max().item()
        kernel_err = (kernel.double() - exact).abs().max().item()
        assert kernel_err <= 3 * torch_err + 1e-6, (kwargs, kernel_err, torch_err)
