"""Scoring explanations over a corpus (`Explainer.evaluate`): `plan` (the perturbations every metric
needs), `score` (per text, as its outputs complete), `aggregate` (running sums), `evaluate` (the
orchestration and the `Evaluation` it returns)."""

from ..options import resolve_k
from .evaluate import Evaluation, evaluate
from .plan import DELETIONS

__all__ = ["DELETIONS", "Evaluation", "evaluate", "resolve_k"]
