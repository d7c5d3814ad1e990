"""The Shapley oracles: one forward per coalition, one text at a time, no batching, no caches.

A coalition keeps its tokens and replaces the others by the replacement token (length and positions
unchanged, as leave-one-out); its value is the target's probability (or logit, or log-probability) at
the scored position. `shapley_values` enumerates every subset with plain loops; the samplers draw
their permutations and coalitions with the methods' own drawing functions (so that a seed means the
same draws) and evaluate each one here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from kernels.common import upcast

from ..encoding import encode
from ..methods.kernel_shap import coalitions, constrained_fit
from ..methods.shapley_sampling import permutations
from ..models import replacement_id
from .methods import _forward_ids, _model_inputs, _predicted, scored_logits


def _value_function(model, tokenizer, text: str, target_id: int | None, value: str):
    """(v(present) for a tuple of present positions, n tokens)."""
    inputs, tokens = encode(tokenizer, text)
    with torch.no_grad():
        clean = upcast(scored_logits(model(**_model_inputs(model, inputs)).logits))
    target = _predicted(clean, target_id)
    fill = replacement_id(tokenizer)
    cache: dict[tuple, float] = {}

    def v(present) -> float:
        key = tuple(sorted(present))
        if key not in cache:
            ids = torch.full_like(inputs["input_ids"], fill)
            for i in key:
                ids[0, i] = inputs["input_ids"][0, i]
            logits = _forward_ids(model, ids)
            if value == "logit":
                cache[key] = logits[target].item()
            else:
                log_prob = torch.log_softmax(logits, -1)[target].item()
                cache[key] = log_prob if value == "log_prob" else math.exp(log_prob)
        return cache[key]

    return v, len(tokens)


def shapley_values(model, tokenizer, text: str, target_id: int | None = None, value: str = "prob") -> np.ndarray:
    """phi_i = sum over S of the other tokens |S|! (n - |S| - 1)! / n! (v(S + i) - v(S))."""
    v, n = _value_function(model, tokenizer, text, target_id, value)
    phi = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                phi[i] += weight * (v(subset + (i,)) - v(subset))
    return phi


def shapley_value_sampling(
    model, tokenizer, text: str, n_samples: int = 25, antithetic: bool = True, seed: int = 0,
    target_id: int | None = None, value: str = "prob",
) -> np.ndarray:  # fmt: skip
    """Mean over the permutations of each token's marginal contribution when added in order."""
    v, n = _value_function(model, tokenizer, text, target_id, value)
    perms = permutations(n, n_samples, antithetic, seed)
    total = np.zeros(n)
    for perm in perms:
        present: list[int] = []
        for i in perm:
            before = v(present)
            present.append(i)
            total[i] += v(present) - before
    return total / len(perms)


def kernel_shap(
    model, tokenizer, text: str, n_samples: int = 64, seed: int = 0, target_id: int | None = None,
    value: str = "prob",
) -> np.ndarray:  # fmt: skip
    """The constrained weighted least-squares fit over the method's coalitions, each evaluated here."""
    v, n = _value_function(model, tokenizer, text, target_id, value)
    present, weights = coalitions(n, n_samples, seed)
    empty, full = v(()), v(tuple(range(n)))
    y = np.array([v(tuple(np.flatnonzero(row))) - empty for row in present])
    return constrained_fit(present, weights, y, full - empty)
