"""What every method shares: the prepared text, the method's registry entry, the clean pass, and the
perturbation work items (one replaced-token rule for leave-one-out, occlusion, faithfulness and the
evaluation's curves)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..runtime.context import ModelContext
from ..runtime.types import ForwardOutput, FullPayload, SuffixPayload, Work


@dataclass(frozen=True)
class PreparedText:
    index: int  # position in the caller's list
    text: str
    input_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    target_id: int | None  # token id (causal LM) or class index; None until the clean pass predicts it
    target_prob: float = float("nan")  # p(target) on the clean text, from the clean pass
    target_logit: float = float("nan")  # logit(target) on the clean text
    read_pos: int = -1  # the position whose output (causal LM) or whose attention row (classifier) is read


@dataclass(frozen=True)
class Method:
    """A method's registry entry (`engine.methods.register`).

    `expand(context, text, options) -> [Work]` and `reduce(context, text, options, outputs) -> fields`
    (the `Attribution` fields: "scores", and "matrix", "regions", "completeness_gap", ... as the method
    has them); `reference(model, tokenizer, text, *, target_id, read_pos, options) -> scores` is the
    oracle the tests compare the method with (`engine.reference`)."""

    name: str
    options: type  # a frozen dataclass validated on construction
    expand: Callable
    reduce: Callable
    reference: Callable
    order: int  # where it is listed (`available_methods()`): the specification's order
    scores_itself: bool = False  # its own forward scores the clean text: no separate clean pass
    check_model: Callable | None = None  # (context, options) -> None; raises for an unsupported model
    check_text: Callable | None = None  # (text, options) -> None; raises for a text it cannot attribute
    default: bool = True  # in the default set of compare / evaluate / the CLI (False: cost exponential in n)
    perturbs_clean_text: bool = False  # its work runs over the clean text's prefix cache: the clean pass keeps it


def replaced(ids, positions, fill: int) -> list[int]:
    """`ids` with the tokens at `positions` replaced by `fill` (length and positions unchanged)."""
    out = list(ids)
    for i in positions:
        out[i] = fill
    return out


def perturbation_work(ctx: ModelContext, p: PreparedText, perturbed: list[int], need_prob: bool) -> Work:
    """One perturbed copy of `p`: a suffix over the clean prefix cache (causal LMs with prefix reuse)
    or a full sequence. A suffix's own tokens are those it recomputes; the layout's `batch_cost` adds
    the cached prefixes its batch's rows hold, and the padding."""
    n = len(perturbed)
    if ctx.prefix_reuse:
        start = next((i for i in range(n) if perturbed[i] != p.input_ids[i]), n - 1)
        start = min(start, n - 1)  # an unchanged copy still recomputes the read position
        payload = SuffixPayload(p.input_ids, start, tuple(perturbed[start:]), p.target_id, need_prob)
        return Work(("suffix",), n - start, payload)
    return Work(("full", n), n, FullPayload(tuple(perturbed), p.target_id, need_prob))


def zeroed_work(p: PreparedText, positions: tuple[int, ...]) -> Work:
    """`p` with the token embeddings at `positions` zeroed (the AttnLRP paper's deletion)."""
    n = len(p.input_ids)
    return Work(("zero", n), n, FullPayload(p.input_ids, p.target_id, True, zeroed=positions))


def clean_work(ctx: ModelContext, p: PreparedText, keep_cache: bool = False) -> Work:
    """The clean text scored once: prediction, probability, logit. Causal LMs pack texts of any length
    end to end (and keep the text's prefix cache where `keep_cache` and the caller pinned it);
    classifiers batch texts of equal length."""
    n = len(p.input_ids)
    group = ("packed",) if ctx.packs_texts else ("full", n)
    return Work(group, n, FullPayload(p.input_ids, p.target_id, need_prob=True, keep_cache=keep_cache))


def cleaned(p: PreparedText, out: ForwardOutput) -> PreparedText:
    """`p` with its clean-pass result: the target (the given one or the prediction), p and logit."""
    target = out.argmax if p.target_id is None else p.target_id
    return dataclasses.replace(p, target_id=target, target_prob=out.prob, target_logit=out.logit)


def finite_fields(fields: dict) -> bool:
    """Whether a text's result has finite scores, matrix and clean-text probability and logit."""
    arrays = [fields[k] for k in ("scores", "matrix") if fields.get(k) is not None]
    numbers = [fields[k] for k in ("target_prob", "target_logit") if k in fields]
    return all(np.isfinite(a).all() for a in arrays) and all(np.isfinite(numbers))
