"""Integrated gradients on the input embeddings (Sundararajan et al. 2017), with Captum's step rules.

Each text expands into one work item per step (and one for f(baseline), for the completeness gap):
a forward and backward at baseline + alpha (x - baseline), batched with the steps of other texts:
packed end to end into one row on cascade attention (causal LMs), else stacked with the steps of
texts of the same length. The step rule, the baseline and the per-token contribution are stated here once; the
reference (`engine.reference.integrated_gradients`) uses the same three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels.common import upcast

from ..options import check_choice, check_int, normalize
from ..runtime.cascade import cascade_forward
from ..runtime.forward import head_logits, read_logits
from ..runtime.layout import Suffix
from ..runtime.runner import frozen_weights
from ..runtime.types import CallPayload, Work, call_group
from . import register
from ._base import Method

IG_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
IG_BASELINES = ("replacement", "zeros")


@dataclass(frozen=True)
class IntegratedGradientsOptions:
    n_steps: int = 50
    ig_method: str = "gausslegendre"
    baseline: str = "replacement"

    def __post_init__(self):
        normalize(self, "n_steps", check_int("n_steps", self.n_steps, minimum=1))
        check_choice("ig_method", self.ig_method, IG_METHODS)
        check_choice("baseline", self.baseline, IG_BASELINES)
        if self.ig_method == "riemann_trapezoid" and self.n_steps < 2:
            raise ValueError("riemann_trapezoid needs n_steps >= 2")


def ig_steps(n_steps: int, method: str = "gausslegendre") -> tuple[list[float], list[float]]:
    """(alphas, weights) of Captum's step rules, so results can be checked against Captum.

    gausslegendre: Gauss-Legendre nodes and weights mapped from [-1, 1] to [0, 1];
    riemann_left/right/middle: n equal steps of 1/n at the left ends, right ends or midpoints;
    riemann_trapezoid: n points from 0 to 1, the two end weights halved (needs n > 1).
    """
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return (0.5 * (1 + nodes)).tolist(), (0.5 * weights).tolist()
    if method not in IG_METHODS:
        raise ValueError(f"ig_method must be one of {IG_METHODS}, got {method!r}")
    if n_steps < 2:
        raise ValueError(f"{method} needs n_steps >= 2, got {n_steps}")
    n = n_steps
    deltas = [1 / n] * n
    if method == "riemann_trapezoid":
        deltas[0] /= 2
        deltas[-1] /= 2
        alphas = torch.linspace(0, 1, n)
    elif method == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n, n)
    elif method == "riemann_middle":
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)
    else:  # riemann_right
        alphas = torch.linspace(1 / n, 1, n)
    return alphas.tolist(), deltas


def baseline_embeddings(model, ids: torch.Tensor, baseline: str, replacement_id: int) -> torch.Tensor:
    """The IG baseline in embedding space: the replacement token's embedding at every position
    (as Captum's LayerIntegratedGradients with those ids as baselines), or all zeros."""
    embed = model.get_input_embeddings()
    if baseline == "replacement":
        return embed(torch.full_like(ids, replacement_id))
    if baseline == "zeros":
        return torch.zeros_like(embed(ids))
    raise ValueError(f"baseline must be one of {IG_BASELINES}, got {baseline!r}")


def contributions(grads: torch.Tensor, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per-token grad . (x - baseline), summed over the embedding dimension (in float32 or float64)."""
    return (upcast(grads) * upcast(x - base)).sum(-1)


@dataclass(frozen=True)
class _Step:
    ids: tuple[int, ...]
    alpha: float  # interpolation point between baseline (0) and input (1)
    weight: float  # the step rule's weight
    target: int
    baseline: str


def _step_points(ctx, steps: list[_Step]):
    """Per step: the input's embeddings x, the baseline's, and the point baseline + alpha (x - baseline),
    (n, hidden) each, without gradients."""
    model = ctx.model
    with torch.no_grad():
        x = [model.get_input_embeddings()(torch.tensor(s.ids, device=model.device)) for s in steps]
        base = [baseline_embeddings(model, torch.tensor(s.ids, device=model.device), s.baseline, ctx.replacement_id)
                for s in steps]  # fmt: skip
        points = [b + s.alpha * (e - b) for s, e, b in zip(steps, x, base, strict=True)]
    return x, base, points


def _outputs(steps: list[_Step], grads: list, x: list, base: list, target_logits) -> list[tuple[np.ndarray, float]]:
    return [
        ((s.weight * contributions(g, e, b)).cpu().numpy(), logit)
        for s, g, e, b, logit in zip(steps, grads, x, base, target_logits.detach().tolist(), strict=True)
    ]


def run_steps(ctx, steps: list[_Step]) -> list[tuple[np.ndarray, float]]:
    """Each step's per-token contribution w * (grad . (x - x0)) and the target logit at the point:
    steps of equal length stacked (classifiers; causal LMs without cascade attention)."""
    model = ctx.model
    x, base, points = _step_points(ctx, steps)
    points = torch.stack(points)
    targets = torch.tensor([s.target for s in steps], device=model.device)
    with frozen_weights(model), torch.enable_grad():
        points.requires_grad_(True)
        logits = read_logits(model, ctx.kind, {"inputs_embeds": points}, -1)
        target_logits = logits.gather(-1, targets[:, None])[:, 0]
        (grads,) = torch.autograd.grad(target_logits.sum(), points)
    return _outputs(steps, list(grads), x, base, target_logits)


def run_packed_steps(ctx, steps: list[_Step]) -> list[tuple[np.ndarray, float]]:
    """As `run_steps`, for the steps of texts of any lengths packed end to end into one row (causal
    LMs with cascade attention: each step attends to itself only, so short texts fill a batch too)."""
    model = ctx.model
    x, base, points = _step_points(ctx, steps)
    targets = torch.tensor([s.target for s in steps], device=model.device)
    whole = [Suffix(0, 0, s.ids) for s in steps]
    with frozen_weights(model), torch.enable_grad():
        for point in points:
            point.requires_grad_(True)
        hidden = cascade_forward(model, [], whole, embeds=points)
        target_logits = head_logits(model, hidden).gather(-1, targets[:, None])[:, 0]
        grads = torch.autograd.grad(target_logits.sum(), points)
    return _outputs(steps, list(grads), x, base, target_logits)


def expand(ctx, p, opts: IntegratedGradientsOptions) -> list[Work]:
    alphas, weights = ig_steps(opts.n_steps, opts.ig_method)
    n = len(p.input_ids)
    # packed steps share rows: one text's non-finite values may reach another's (`runner.shares_rows`)
    group = (
        call_group(run_packed_steps, opts.baseline, shares_rows=True)
        if ctx.cascade
        else call_group(run_steps, n, opts.baseline)
    )
    steps = [_Step(p.input_ids, a, w, p.target_id, opts.baseline) for a, w in zip(alphas, weights, strict=True)]
    steps.append(_Step(p.input_ids, 0.0, 0.0, p.target_id, opts.baseline))  # f(baseline), for the gap
    return [Work(group, n, CallPayload(s)) for s in steps]


def reduce(ctx, p, opts, outputs) -> dict:
    scores = np.sum([contrib for contrib, _ in outputs[:-1]], axis=0, dtype=np.float64)
    f_baseline = outputs[-1][1]
    return {"scores": scores, "completeness_gap": float(scores.sum() - (p.target_logit - f_baseline))}


def reference(model, tokenizer, text, *, target_id, read_pos, options: IntegratedGradientsOptions):
    from ..reference import integrated_gradients

    return integrated_gradients(
        model, tokenizer, text, options.n_steps, options.ig_method, options.baseline, target_id=target_id
    )[0]


register(Method("integrated_gradients", IntegratedGradientsOptions, expand, reduce, reference, order=3))
