"""What the Shapley methods share: the value of a coalition (the tokens present; the absent ones replaced
by the replacement token, length and positions unchanged, as leave-one-out), its options, and the plan
that turns coalitions into work items, each distinct sequence once."""

from __future__ import annotations

import math

import numpy as np

from ..options import check_choice
from ..runtime.context import ModelContext
from ..runtime.types import ForwardOutput, SuffixPayload, Work
from ._base import PreparedText, perturbation_work, replaced

VALUES = ("prob", "logit", "log_prob")


def check_value(value: str) -> None:
    check_choice("value", value, VALUES)


def value_of(out: ForwardOutput, value: str) -> float:
    """A coalition's value: the target's probability, logit or log-probability at the read position."""
    if value == "prob":
        return out.prob
    if value == "logit":
        return out.logit
    return math.log(out.prob) if out.prob > 0 else -math.inf


class CoalitionPlan:
    """The distinct perturbed sequences of one text's coalitions, as work, each run once.

    On a causal LM with prefix reuse the sequences share prefixes with each other, not only with the
    clean text (coalitions replace tokens everywhere, so few share a long clean prefix). `work` lays
    them out as a one-level prefix tree: at one split depth d, chosen to compute the fewest tokens,
    the sequences whose first d tokens are equal (and differ from the clean text's before d) form a
    group whose prefix cache of d tokens is built once (shared by content, like a clean cache); each
    runs only its tokens from d. A group is made only where it saves more tokens than its cache
    costs; every other sequence runs from its first replaced token over the clean cache."""

    def __init__(self, ctx: ModelContext, p: PreparedText):
        self.ctx, self.p = ctx, p
        self._sequences: list[tuple[int, ...]] = []
        self._index: dict[bytes, int] = {}
        self._work: list[Work] | None = None

    def of(self, present: np.ndarray) -> int:
        """Work index of the coalition `present` (bool per token)."""
        key = np.packbits(present).tobytes()
        if key not in self._index:
            absent = np.flatnonzero(~present).tolist()
            self._index[key] = len(self._sequences)
            self._sequences.append(tuple(replaced(self.p.input_ids, absent, self.ctx.replacement_id)))
            self._work = None
        return self._index[key]

    @property
    def work(self) -> list[Work]:
        if self._work is None:
            seqs = self._sequences
            if self.ctx.packs_texts and len(seqs) > 2:
                self._work = shared_prefix_work(self.p, seqs)
            else:
                self._work = [perturbation_work(self.ctx, self.p, list(ids), need_prob=True) for ids in seqs]
        return self._work


def split_depth(clean: tuple[int, ...], seqs: list[tuple[int, ...]]) -> tuple[int, np.ndarray, np.ndarray]:
    """The one-level prefix tree of `seqs` that computes the fewest tokens -> (depth d, whether each
    sequence runs from d over its group's cache, each sequence's first position differing from
    `clean`). d = 0: no group pays for its cache."""
    n, m = len(clean), len(seqs)
    ids = np.array(seqs, dtype=np.int64)
    differs = ids != np.array(clean, dtype=np.int64)
    first = np.where(differs.any(axis=1), differs.argmax(axis=1), n - 1).clip(max=n - 1)
    # node[i, d]: the prefix-tree node of sequence i's first d tokens (equal nodes = equal prefixes)
    node = np.zeros((m, n), dtype=np.int64)
    for d in range(1, n):
        _, node[:, d] = np.unique(np.stack([node[:, d - 1], ids[:, d - 1]], axis=1), axis=0, return_inverse=True)
    best, best_d, best_grouped = 0, 0, np.zeros(m, dtype=bool)
    for d in range(1, n):  # at least the read position stays in the suffix
        benefits = first < d  # only those whose clean prefix is shorter than d can gain
        if not benefits.any():
            continue
        keys = node[benefits, d]
        gain = np.bincount(keys, weights=(d - first[benefits]).astype(np.float64), minlength=int(node[:, d].max()) + 1)
        worth = gain > d  # a group saves more than its cache of d tokens costs
        saved = float((gain[worth] - d).sum())
        if saved > best:
            grouped = np.zeros(m, dtype=bool)
            grouped[np.flatnonzero(benefits)[worth[keys]]] = True
            best, best_d, best_grouped = saved, d, grouped
    return best_d, best_grouped, first


def shared_prefix_work(p: PreparedText, seqs: list[tuple[int, ...]]) -> list[Work]:
    """Each sequence as a suffix: over its group's prefix cache from the split depth, else over the
    clean text's from its first replaced token (see `CoalitionPlan`)."""
    d, grouped, first = split_depth(p.input_ids, seqs)
    work = []
    for ids, in_group, start in zip(seqs, grouped, first, strict=True):
        prefix, start = (ids[:d], d) if in_group else (p.input_ids, int(start))
        payload = SuffixPayload(prefix, start, ids[start:], p.target_id, True)
        work.append(Work(("suffix",), len(ids) - start, payload))
    return work


def mask_bits(masks: np.ndarray, n: int) -> np.ndarray:
    """(m,) integer masks -> (m, n) bool: bit i set = token i present."""
    return ((masks[:, None] >> np.arange(n)) & 1).astype(bool)


def plan_values(plan_work_indices: np.ndarray, outputs: list, value: str) -> np.ndarray:
    """The values of the coalitions, in the order their work indices are given (float64)."""
    per_work = np.array([value_of(o, value) for o in outputs], dtype=np.float64)
    return per_work[plan_work_indices]
