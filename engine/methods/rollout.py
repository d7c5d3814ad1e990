"""Attention rollout (Abnar & Zuidema 2020): per layer 0.5 A + 0.5 I with heads fused (and low
entries discarded), multiplied through the layers; the row of the read position (`kernels.rollout`)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from kernels.common import HEAD_FUSIONS

from ..options import check_choice, normalize
from . import register
from ._base import Method
from ._text_batches import fused_attention_blocks, only_output, text_work


@dataclass(frozen=True)
class RolloutOptions:
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    causal_quantile: bool = False  # take the discard quantile over the lower triangle only
    full_matrix: bool = True  # also return the (S, S) rollout; False computes only the row read (O(L S^2))

    def __post_init__(self):
        check_choice("head_fusion", self.head_fusion, HEAD_FUSIONS)
        if isinstance(self.discard_ratio, bool) or not isinstance(self.discard_ratio, numbers.Real):
            raise TypeError(f"discard_ratio must be a float, got {self.discard_ratio!r}")
        normalize(self, "discard_ratio", float(self.discard_ratio))
        if not 0.0 <= self.discard_ratio < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {self.discard_ratio}")
        for name in ("causal_quantile", "full_matrix"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")


def run_batch(ctx, inputs) -> list[dict]:
    from kernels import rollout

    batch = [p for p, _ in inputs]
    opts = inputs[0][1]
    per_text, scored = fused_attention_blocks(ctx, batch, opts.head_fusion)
    lengths = [len(p.input_ids) for p in batch]
    size = max(lengths)
    # texts of different lengths, padded into one (B, S, S) per layer: `lengths` keeps each to its block
    stacked = []
    for layer in range(len(per_text[0])):
        first = per_text[0][0]
        fused = torch.zeros(len(batch), size, size, dtype=first.dtype, device=first.device)
        for b, blocks in enumerate(per_text):
            fused[b, : lengths[b], : lengths[b]] = blocks[layer]
        stacked.append(fused)
    kwargs = {
        "discard_ratio": opts.discard_ratio,
        "causal_quantile": opts.causal_quantile,
        "fused": True,
        "lengths": lengths,
    }
    if opts.full_matrix:
        matrix = rollout(stacked, **kwargs).cpu().numpy()
        return [
            {
                "scores": matrix[b, p.read_pos, : lengths[b]],
                "matrix": matrix[b, : lengths[b], : lengths[b]],
                **scored[b],
            }
            for b, p in enumerate(batch)
        ]
    rows = rollout(stacked, rows=[p.read_pos for p in batch], **kwargs).cpu().numpy()
    return [{"scores": rows[b, : lengths[b]], **scored[b]} for b in range(len(batch))]


def expand(ctx, p, opts):
    return [text_work(ctx, p, run_batch, opts)]


def reference(model, tokenizer, text, *, target_id, read_pos, options: RolloutOptions):
    from ..reference import compute_rollout

    return compute_rollout(
        model, tokenizer, text, options.head_fusion, options.discard_ratio, options.causal_quantile, read_pos=read_pos
    )


register(Method("rollout", RolloutOptions, expand, only_output, reference, order=1, scores_itself=True))
