"""The runner: executes the scheduler's batches on the model's device.

Three kinds of work item (the first element of an item's group):
- "full": an equal-length sequence scored at its read position (classifiers, or causal LMs with
  prefix reuse switched off);
- "packed": a whole sequence of a causal LM, packed end to end with others of any length (the clean
  pass);
- "suffix": a perturbation of a causal LM run from its first changed token over the clean
  prefix cache (`forward.packed_suffix_forward`);
- "ig": one integrated-gradients step of one text (forward and backward, grads w.r.t. the input
  embeddings only).
Prefix caches are built the first time a batch needs a text's prefix and dropped as soon as that
text's last suffix item is done, so memory follows the budget, not the number of texts.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from kernels.common import upcast

from .forward import (
    RowLayout,
    Suffix,
    _head_logits,
    full_forward,
    packed_clean_caches,
    packed_suffix_forward,
    score_logits,
)
from .models import CLASSIFIER
from .scheduler import Batch, Scheduler, WorkItem


@dataclass(frozen=True)
class FullPayload:
    ids: tuple[int, ...]
    target: int | None  # None: score the argmax (the clean pass finds the prediction)
    need_prob: bool
    zeroed: tuple[int, ...] | None = None  # positions whose token embedding is zeroed (work kind "zero")


@dataclass(frozen=True)
class SuffixPayload:
    text: Hashable  # key of the clean text whose prefix cache this suffix reads
    start: int  # first changed position
    ids: tuple[int, ...]  # perturbed tokens from `start` to the end
    target: int
    need_prob: bool


@dataclass(frozen=True)
class IGPayload:
    text: Hashable  # key of the text (its ids are in the runner's text table)
    alpha: float  # interpolation point between baseline (0) and input (1)
    weight: float  # the step rule's weight
    target: int
    baseline: str  # "replacement" or "zeros"


@dataclass(frozen=True)
class ForwardOutput:
    logit: float
    prob: float | None
    argmax: int


@contextlib.contextmanager
def frozen_weights(model):
    """Weights stop requiring grad inside the block (saves a third of time and memory in backward)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def is_finite_output(out) -> bool:
    """Whether a work item's output is finite: a `ForwardOutput`, or an IG step's (contributions, logit)."""
    if isinstance(out, ForwardOutput):
        return math.isfinite(out.logit) and (out.prob is None or math.isfinite(out.prob))
    contrib, logit = out
    return math.isfinite(logit) and bool(np.isfinite(contrib).all())


# Work kinds whose items share rows: in a packed row, a text's queries give zero weight to the other
# texts' keys, but 0 x NaN is NaN, so one text's non-finite values make its row-mates' outputs NaN too.
# Stacked kinds ("full", "zero", "ig") give each item its own row: nothing crosses between them.
SHARES_ROWS = ("packed", "suffix")


def _suffixes_over_caches(payloads: list[SuffixPayload]) -> tuple[list[Hashable], list[Suffix]]:
    """The batch's text keys in first-seen order, and each payload as a `Suffix` over the cache slot
    of its text in that order (the layout `batch_cost` prices and `_run_suffixes` runs)."""
    keys = list(dict.fromkeys(p.text for p in payloads))
    slot = {key: i for i, key in enumerate(keys)}
    return keys, [Suffix(slot[p.text], p.start, p.ids) for p in payloads]


def _whole_texts(payloads: list[FullPayload]) -> list[Suffix]:
    """Whole sequences as suffixes that start at 0 and read no cache (the packed clean pass)."""
    return [Suffix(0, 0, p.ids) for p in payloads]


class BatchRunner:
    def __init__(
        self,
        model,
        kind: str,
        replacement_id: int,
        max_batch_tokens: int,
        max_batch_size: int | None = None,
        row_capacity: int = 256,
        progress: bool | None = None,
    ):
        self.model = model
        self.kind = kind
        self.replacement_id = replacement_id
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.row_capacity = row_capacity
        self.progress = progress
        self._texts: dict[Hashable, tuple[int, ...]] = {}  # text key -> clean ids
        self._caches: dict[Hashable, list] = {}  # text key -> clean prefix cache, while in use
        self._suffix_left: dict[Hashable, int] = {}  # text key -> suffix items not yet done
        self._warned_oom = False

    # ------------------------------------------------------------------------------------- driving

    def run(
        self,
        requests: dict[Hashable, list[WorkItem]],
        texts: dict[Hashable, tuple[int, ...]],
        desc: str = "attributing",
    ) -> dict[Hashable, list]:
        """Run every request's items; return request -> outputs in item order."""
        self._texts = texts
        self._suffix_left = {}
        scheduler = Scheduler(self.max_batch_tokens, self.max_batch_size, self.batch_cost)
        n_items = 0
        for request, items in requests.items():
            scheduler.add(request, items)
            n_items += len(items)
            for item in items:
                if isinstance(item.payload, SuffixPayload):
                    key = item.payload.text
                    self._suffix_left[key] = self._suffix_left.get(key, 0) + 1
        results = {request: [] for request, items in requests.items() if not items}
        show = self.progress if self.progress is not None else len(requests) >= 16
        with tqdm(total=n_items, desc=desc, disable=not show, leave=False) as bar:
            while (batch := scheduler.schedule()) is not None:
                outputs = self._execute_isolating_non_finite(batch)
                self._release_caches(batch)
                for request, outs in scheduler.complete(batch, outputs):
                    results[request] = outs
                bar.update(len(batch.items))
        self._caches.clear()
        return results

    def batch_cost(self, group, items: list[WorkItem]) -> int:
        """Padded tokens of a batch as it will be laid out: packed rows hold their texts' cached
        prefixes and their suffixes end to end (rows x (prefix + query columns)); other kinds stack
        equal lengths, so they cost their tokens."""
        payloads = [item.payload for item in items]
        if group[0] == "suffix":
            keys, suffixes = _suffixes_over_caches(payloads)
            cached = [len(self._texts[key]) for key in keys]
        elif group[0] == "packed":
            cached, suffixes = [], _whole_texts(payloads)
        else:
            return sum(item.tokens for item in items)
        return RowLayout.of(suffixes, cached, self.row_capacity).padded_tokens

    def _halves(self, batch: Batch) -> list[Batch]:
        half = len(batch.items) // 2
        parts = [batch.items[:half], batch.items[half:]]
        return [Batch(group=batch.group, items=part, tokens=self.batch_cost(batch.group, part)) for part in parts]

    def _execute_isolating_non_finite(self, batch: Batch) -> list:
        """`execute`, and where a batch of row-sharing items has non-finite outputs, the batch again in
        halves (down to single items) until the non-finite outputs are traced to their own items: the
        items packed beside them then get the outputs they get without them. The halves rebuild their
        prefix caches, since a cache built in one forward with a non-finite text may be NaN too."""
        outputs = self._execute_splitting_on_oom(batch)
        if len(batch.items) == 1 or batch.group[0] not in SHARES_ROWS or all(map(is_finite_output, outputs)):
            return outputs
        for item in batch.items:
            if isinstance(item.payload, SuffixPayload):
                self._caches.pop(item.payload.text, None)
        return [out for part in self._halves(batch) for out in self._execute_isolating_non_finite(part)]

    def _execute_splitting_on_oom(self, batch: Batch) -> list:
        try:
            return self.execute(batch)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err) or len(batch.items) == 1:
                raise
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            if not self._warned_oom:
                warnings.warn(
                    f"out of memory on a batch of {len(batch.items)} items ({batch.tokens} tokens): halving "
                    "batches that fail; lower max_batch_tokens to avoid the retries",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned_oom = True
            return [out for part in self._halves(batch) for out in self._execute_splitting_on_oom(part)]

    def _release_caches(self, batch: Batch) -> None:
        for item in batch.items:
            if isinstance(item.payload, SuffixPayload):
                key = item.payload.text
                self._suffix_left[key] -= 1
                if self._suffix_left[key] == 0:
                    self._caches.pop(key, None)

    # ------------------------------------------------------------------------------------ executing

    def execute(self, batch: Batch) -> list:
        kind = batch.group[0]
        payloads = [item.payload for item in batch.items]
        if kind in ("full", "zero"):
            return self._run_full(payloads)
        if kind == "packed":
            return self._run_packed(payloads)
        if kind == "suffix":
            return self._run_suffixes(payloads)
        if kind == "ig":
            return self._run_ig(payloads)
        raise ValueError(f"unknown work kind {kind!r}")

    @staticmethod
    def _outputs(scores) -> list[ForwardOutput]:
        probs = scores.prob.tolist() if scores.prob is not None else [None] * len(scores.logit)
        return [
            ForwardOutput(lg, pr, am)
            for lg, pr, am in zip(scores.logit.tolist(), probs, scores.argmax.tolist(), strict=True)
        ]

    @torch.no_grad()
    def _run_full(self, payloads: list[FullPayload]) -> list[ForwardOutput]:
        ids = torch.tensor([p.ids for p in payloads])
        need_prob = any(p.need_prob for p in payloads)
        zeroed = [p.zeroed or () for p in payloads] if any(p.zeroed is not None for p in payloads) else None
        targets = [p.target for p in payloads]
        return self._outputs(full_forward(self.model, self.kind, ids, ids.shape[1] - 1, targets, need_prob, zeroed))

    @torch.no_grad()
    def _run_packed(self, payloads: list[FullPayload]) -> list[ForwardOutput]:
        """Whole sequences of any lengths packed end to end (causal LMs): no padding, no length groups."""
        hidden = packed_suffix_forward(self.model, [], _whole_texts(payloads), self.row_capacity)
        need_prob = any(p.need_prob for p in payloads)
        return self._outputs(score_logits(_head_logits(self.model, hidden), [p.target for p in payloads], need_prob))

    @torch.no_grad()
    def _run_suffixes(self, payloads: list[SuffixPayload]) -> list[ForwardOutput]:
        keys, suffixes = _suffixes_over_caches(payloads)
        missing = [key for key in keys if key not in self._caches]
        if missing:  # the clean prefixes of every text new to this batch, in one packed forward
            built = packed_clean_caches(self.model, [self._texts[k] for k in missing], self.row_capacity)
            self._caches.update(zip(missing, built, strict=True))
        hidden = packed_suffix_forward(self.model, [self._caches[k] for k in keys], suffixes, self.row_capacity)
        need_prob = any(p.need_prob for p in payloads)
        return self._outputs(score_logits(_head_logits(self.model, hidden), [p.target for p in payloads], need_prob))

    def _run_ig(self, payloads: list[IGPayload]) -> list[tuple[np.ndarray, float]]:
        """Each step's per-token contribution w * (grad . (x - x0)) and the target logit at the point."""
        model = self.model
        embed = model.get_input_embeddings()
        device = model.device
        with torch.no_grad():
            ids = torch.tensor([self._texts[p.text] for p in payloads], device=device)
            x = embed(ids)
            if payloads[0].baseline == "replacement":
                base = embed(torch.full_like(ids, self.replacement_id))
            else:
                base = torch.zeros_like(x)
            alphas = torch.tensor([p.alpha for p in payloads], device=device, dtype=x.dtype)[:, None, None]
            points = base + alphas * (x - base)
        targets = torch.tensor([p.target for p in payloads], device=device)
        with frozen_weights(model), torch.enable_grad():
            points.requires_grad_(True)
            if self.kind == CLASSIFIER:
                logits = upcast(model(inputs_embeds=points).logits)
            else:
                hidden = model.base_model(inputs_embeds=points, use_cache=False).last_hidden_state[:, -1]
                logits = _head_logits(model, hidden)
            target_logits = logits.gather(-1, targets[:, None])[:, 0]
            (grads,) = torch.autograd.grad(target_logits.sum(), points)
        products = upcast(grads) * upcast(x - base)
        weights = torch.tensor([p.weight for p in payloads], device=device, dtype=products.dtype)[:, None]
        contrib = weights * products.sum(-1)
        return list(zip(contrib.cpu().numpy(), target_logits.detach().tolist(), strict=True))
