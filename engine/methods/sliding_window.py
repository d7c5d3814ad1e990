"""Sliding-window occlusion (the seed's): every window of `window_size` tokens replaced in turn; a
window's impact is the drop in the target's logit, a token's score the mean impact of the windows
that cover it (Captum `Occlusion` with stride 1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..options import check_int, normalize
from . import register
from ._base import Method, perturbation_work, replaced


@dataclass(frozen=True)
class SlidingWindowOptions:
    window_size: int = 3  # checked against each text's length when it runs

    def __post_init__(self):
        normalize(self, "window_size", check_int("window_size", self.window_size, minimum=1))


def window_scores_per_token(regions: list[dict], seq_len: int) -> np.ndarray:
    """Per-token vector from window impacts: the mean impact of the windows covering each token.

    Every window adds its impact to each token it covers, then each token is divided by the number of
    windows covering it."""
    total = np.zeros(seq_len)
    count = np.zeros(seq_len)
    for r in regions:
        total[r["start"] : r["end"]] += r["impact"]
        count[r["start"] : r["end"]] += 1
    return total / np.maximum(count, 1)


def check_text(p, opts: SlidingWindowOptions) -> None:
    if opts.window_size > len(p.tokens):
        raise ValueError(f"window_size {opts.window_size} is larger than the text ({len(p.tokens)} tokens)")


def expand(ctx, p, opts: SlidingWindowOptions):
    fill, w = ctx.replacement_id, opts.window_size
    starts = range(len(p.input_ids) - w + 1)
    return [perturbation_work(ctx, p, replaced(p.input_ids, range(s, s + w), fill), False) for s in starts]


def reduce(ctx, p, opts: SlidingWindowOptions, outputs) -> dict:
    w = opts.window_size
    regions = [
        {"start": s, "end": s + w, "tokens": list(p.tokens[s : s + w]), "impact": p.target_logit - o.logit}
        for s, o in enumerate(outputs)
    ]
    regions.sort(key=lambda r: r["impact"], reverse=True)
    return {"scores": window_scores_per_token(regions, len(p.tokens)), "regions": regions}


def reference(model, tokenizer, text, *, target_id, read_pos, options: SlidingWindowOptions):
    from ..reference import sliding_window_occlusion

    regions = sliding_window_occlusion(model, tokenizer, text, options.window_size, target_id=target_id)
    return window_scores_per_token(regions, len(tokenizer(text)["input_ids"]))


register(
    Method(
        "sliding_window",
        SlidingWindowOptions,
        expand,
        reduce,
        reference,
        order=5,
        check_text=check_text,
        perturbs_clean_text=True,
    )
)
