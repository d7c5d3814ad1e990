"""The hand-off types between the methods, the engine loop, the scheduler and the runner.

A method expands a text into `Work` (what to compute, the group it may share a batch with, its cost);
the loop turns a caller's list of `Work` into one request of `WorkItem`s; the scheduler packs items of
any requests into a `Batch`; the runner executes it and returns one output per item: a
`ForwardOutput` for the forward kinds, whatever the method's function returns for a `CallPayload`.

Work kinds (the first element of a group):
- "full": equal-length sequences stacked and scored at their read position (classifiers, or causal
  LMs without prefix reuse); "zero": the same with some token embeddings zeroed;
- "packed": whole sequences of a causal LM packed end to end (the clean pass);
- "suffix": a perturbation of a causal LM run from its first changed token over its text's clean
  prefix cache;
- "call": a method's own batch function (attention maps, LRP, IG steps) run on a batch of its payloads.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

FORWARD_KINDS = ("full", "zero", "packed", "suffix")


@dataclass(frozen=True)
class Work:
    """One unit of work as a method describes it, before it belongs to a request."""

    group: tuple  # items run together only within one group (kind, length, options, ...)
    tokens: int  # the tokens it computes; a batch costs their sum, or its row layout's padded tokens
    payload: Any  # what the runner needs: one of the payloads below


@dataclass(frozen=True)
class WorkItem:
    request: Hashable  # the request this item belongs to (unique for the life of a loop)
    index: int  # position among its request's items; outputs come back in this order
    group: Hashable  # as `Work.group`
    tokens: int
    payload: Any = None  # opaque to the scheduler


@dataclass
class Batch:
    group: Hashable  # the group every item shares
    items: list[WorkItem]  # in submission order
    tokens: int  # the batch's cost against max_batch_tokens


@dataclass(frozen=True)
class FullPayload:
    """A whole sequence, scored at `read_pos` ("full", "zero", "packed")."""

    ids: tuple[int, ...]
    target: int | None  # None: score the argmax (the clean pass finds the prediction)
    need_prob: bool
    zeroed: tuple[int, ...] | None = None  # positions whose token embedding is zeroed (kind "zero")
    read_pos: int = -1  # where a causal LM is read (a classifier reads its class logits)
    keep_cache: bool = False  # the clean pass keeps this text's prefix cache where pinned (`PrefixCaches.pin`)


@dataclass(frozen=True)
class SuffixPayload:
    """A perturbed copy of a clean text, from its first changed position ("suffix")."""

    prefix: tuple[int, ...]  # the clean text's ids: its prefix cache is shared by content
    start: int  # first changed position
    ids: tuple[int, ...]  # perturbed tokens from `start` to the end
    target: int
    need_prob: bool


@dataclass(frozen=True)
class CallPayload:
    """An input of a method's batch function: the runner calls `group[1](context, [data, ...])`."""

    data: Any


@dataclass(frozen=True)
class ForwardOutput:
    logit: float  # the target's logit at the read position
    prob: float | None  # its probability, when asked for
    argmax: int  # the prediction at the read position


def call_group(fn: Callable, *key, shares_rows: bool = False) -> tuple:
    """The group of a method's batch function `fn`: items with equal `key` (options, length) may share
    a batch; `shares_rows` says that the function packs several inputs into one row (non-finite
    values then cross between them, see `runner.shares_rows`)."""
    return ("call", fn, shares_rows, *key)
