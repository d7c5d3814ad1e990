"""What the facade returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Attribution:
    """One text's attribution by one method."""

    text: str
    tokens: list[str]
    scores: np.ndarray  # one float per token, higher = more important to the target
    method: str
    target_id: int  # token id (causal LM) or class index (classifier) that was explained
    target_token: str  # its decoded text (or class label)
    target_prob: float  # its probability on the unperturbed text
    options: dict = field(default_factory=dict)  # the method's options as used
    matrix: np.ndarray | None = None  # (S, S) for rollout and grad_attention; the row read is `scores`
    regions: list[dict] | None = None  # sliding_window: windows sorted by impact, descending
    completeness_gap: float | None = None  # integrated_gradients: sum(scores) - (f(x) - f(baseline))
    target_logit: float = float("nan")  # its logit on the unperturbed text (LRP conserves it: sum(scores))
    std_error: np.ndarray | None = None  # shapley_sampling: the standard error of each score
    n_evaluations: int | None = None  # the Shapley methods: distinct perturbed sequences evaluated
    token_ids: list[int] | None = None  # the ids of `tokens`

    def __bool__(self) -> bool:
        return True


class NonFiniteOutputError(ValueError):
    """The model's output for a text is NaN or infinite (at the read position of the clean text, or of a
    perturbation, or in the scores computed from them). Other texts of the same call are unaffected."""


@dataclass
class AttributionFailure:
    """Stands in a result list where one text could not be attributed; the others are unaffected.

    Falsy, so `[a for a in results if a]` keeps the successes.
    """

    index: int  # position of the text in the list passed in
    text: object
    method: str
    error: Exception

    def __bool__(self) -> bool:
        return False


@dataclass
class Comparison:
    """Several methods on one text, as in the seed's `compare_attribution_methods`."""

    text: str
    tokens: list[str]
    target_token: str
    target_prob: float
    attributions: dict[str, Attribution]
    normalized: dict[str, np.ndarray]  # min-max normalized scores per method
    spearman: np.ndarray  # (M, M) rank correlation, methods in the order of `attributions`
    spearman_p: np.ndarray  # (M, M) p-values
    top_k: dict[str, list[tuple[str, float]]]  # method -> [(token, normalized score)], most important first
