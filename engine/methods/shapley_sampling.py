"""Shapley values by permutation sampling (Castro et al. 2009), as Captum's `ShapleyValueSampling`:
per permutation, tokens are added one by one to the empty coalition (all replaced) and each token
scores its marginal contribution; the scores are the mean over permutations. With `antithetic` each
permutation is also run reversed (Covert & Lee 2021: the pair's errors are negatively correlated).
Efficiency holds exactly: per permutation the contributions telescope to v(all) - v(none).

The permutations are `torch.randperm(n, generator=torch.Generator().manual_seed(seed))`, one per sample:
with `antithetic=False`, the same permutations Captum draws after `torch.manual_seed(seed)`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..options import check_int, normalize
from . import register
from ._base import Method
from ._coalitions import CoalitionPlan, check_value, plan_values


@dataclass(frozen=True)
class ShapleySamplingOptions:
    n_samples: int = 25  # permutations (Captum's default); antithetic adds each one reversed
    antithetic: bool = True
    seed: int = 0
    value: str = "prob"

    def __post_init__(self):
        normalize(self, "n_samples", check_int("n_samples", self.n_samples, minimum=1))
        normalize(self, "seed", check_int("seed", self.seed, minimum=0))
        if not isinstance(self.antithetic, bool):
            raise TypeError(f"antithetic must be a bool, got {self.antithetic!r}")
        check_value(self.value)


def permutations(n: int, n_samples: int, antithetic: bool, seed: int) -> list[list[int]]:
    """The permutations, in order (each followed by its reverse when antithetic)."""
    generator = torch.Generator().manual_seed(seed)
    drawn = [torch.randperm(n, generator=generator).tolist() for _ in range(n_samples)]
    return [q for perm in drawn for q in ((perm, perm[::-1]) if antithetic else (perm,))]


def _plan(ctx, p, opts):
    n = len(p.input_ids)
    plan = CoalitionPlan(ctx, p)
    perms = permutations(n, opts.n_samples, opts.antithetic, opts.seed)
    chains = []  # per permutation: the work index of each prefix coalition, from empty to full
    for perm in perms:
        present = np.zeros(n, dtype=bool)
        chain = [plan.of(present)]
        for i in perm:
            present[i] = True
            chain.append(plan.of(present))
        chains.append(chain)
    return plan, perms, np.array(chains)


def expand(ctx, p, opts):
    return _plan(ctx, p, opts)[0].work


def marginals(perms: list[list[int]], chain_values: np.ndarray) -> np.ndarray:
    """(permutations, n): each token's marginal contribution in each permutation."""
    steps = np.diff(chain_values, axis=1)  # (permutations, n): the k-th added token's contribution
    out = np.zeros_like(steps)
    for row, perm in enumerate(perms):
        out[row, perm] = steps[row]
    return out


def reduce(ctx, p, opts, outputs) -> dict:
    plan, perms, chains = _plan(ctx, p, opts)
    contributions = marginals(perms, plan_values(chains.ravel(), outputs, opts.value).reshape(chains.shape))
    # the independent draws: single permutations, or antithetic pairs averaged
    units = contributions.reshape(opts.n_samples, 2, -1).mean(1) if opts.antithetic else contributions
    std_error = units.std(axis=0, ddof=1) / np.sqrt(len(units)) if len(units) > 1 else np.full(units.shape[1], np.nan)
    return {"scores": units.mean(axis=0), "std_error": std_error, "n_evaluations": len(plan.work)}


def reference(model, tokenizer, text, *, target_id, read_pos, options: ShapleySamplingOptions):
    from ..reference.shapley import shapley_value_sampling

    return shapley_value_sampling(
        model, tokenizer, text, options.n_samples, options.antithetic, options.seed, target_id=target_id,
        value=options.value,
    )  # fmt: skip


register(
    Method("shapley_sampling", ShapleySamplingOptions, expand, reduce, reference, order=8, perturbs_clean_text=True)
)
