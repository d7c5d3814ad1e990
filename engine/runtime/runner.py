"""The runner: executes one batch of the scheduler's on the model's device, and holds no per-call state.

The forward kinds ("full", "zero", "packed", "suffix": `runtime.types`) are run here; a "call" batch is
handed to the method's own batch function with the model context. Two retries keep results independent
of what shares a batch:
- out of memory: the batch runs again in halves (with one warning);
- non-finite outputs in a batch whose items share rows: in a packed row a text's queries give zero
  weight to the other texts' keys, but 0 x NaN is NaN, so one text's NaN spreads to its row-mates. The
  batch runs again in halves, down to single items, so every item gets what it gets without the
  non-finite one; the prefix caches built in that forward are dropped and rebuilt.
Every batch runs holding the model's lock in eval mode (`models.exclusive_eval`): two loops on one
model never interleave, and the user's train/eval mode is restored after.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from numbers import Number

import numpy as np
import torch

from ..models import exclusive_eval
from .caches import PrefixCaches
from .cascade import cascade_forward
from .compiled import compiled_forwards
from .context import ModelContext
from .forward import full_forward, head_logits, packed_suffix_forward, score_logits
from .layout import Suffix, batch_cost, suffixes_over_caches, whole_texts
from .types import Batch, ForwardOutput, FullPayload, SuffixPayload


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
    """Whether an item's output is finite: a `ForwardOutput`, or whatever a batch function returns
    (numbers, arrays, and tuples, lists or dicts of them; other values count as finite)."""
    if isinstance(out, ForwardOutput):
        return math.isfinite(out.logit) and (out.prob is None or math.isfinite(out.prob))
    if isinstance(out, bool) or out is None:
        return True
    if isinstance(out, Number):
        return math.isfinite(out)
    if isinstance(out, np.ndarray):
        return out.dtype.kind not in "fc" or bool(np.isfinite(out).all())
    if isinstance(out, (tuple, list)):
        return all(map(is_finite_output, out))
    if isinstance(out, dict):
        return all(map(is_finite_output, out.values()))
    return True


def _cache_key(payload):
    """The prefix cache an item reads (a suffix) or keeps (a clean pass), or None."""
    if isinstance(payload, SuffixPayload):
        return payload.prefix
    return payload.ids if isinstance(payload, FullPayload) and payload.keep_cache else None


def shares_rows(group) -> bool:
    """Whether a batch's items share rows (one item's non-finite values can reach another's)."""
    return group[0] in ("packed", "suffix") or (group[0] == "call" and group[2])


class ModelRunner:
    def __init__(self, context: ModelContext):
        self.context = context
        self.model = context.model
        self._warned_oom = False

    def batch_cost(self, group, items) -> int:
        return batch_cost(group, items, self.context.row_capacity, self.context.cascade)

    def execute(self, batch: Batch, caches: PrefixCaches) -> list:
        """One output per item of `batch`, in item order."""
        with exclusive_eval(self.model), compiled_forwards(self.model, self.context.compile):
            return self._isolating_non_finite(batch, caches)

    def _halves(self, batch: Batch) -> list[Batch]:
        half = len(batch.items) // 2
        parts = [batch.items[:half], batch.items[half:]]
        return [Batch(batch.group, part, self.batch_cost(batch.group, part)) for part in parts]

    def _isolating_non_finite(self, batch: Batch, caches: PrefixCaches) -> list:
        outputs = self._splitting_on_oom(batch, caches)
        if len(batch.items) == 1 or not shares_rows(batch.group) or all(map(is_finite_output, outputs)):
            return outputs
        caches.drop(_cache_key(item.payload) for item in batch.items)
        return [out for part in self._halves(batch) for out in self._isolating_non_finite(part, caches)]

    def _splitting_on_oom(self, batch: Batch, caches: PrefixCaches) -> list:
        try:
            return self._run(batch, caches)
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
                    stacklevel=2,
                )
                self._warned_oom = True
            return [out for part in self._halves(batch) for out in self._splitting_on_oom(part, caches)]

    # ------------------------------------------------------------------------------------ executing

    def _run(self, batch: Batch, caches: PrefixCaches) -> list:
        kind = batch.group[0]
        payloads = [item.payload for item in batch.items]
        if kind in ("full", "zero"):
            return self._run_full(payloads)
        if kind == "packed":
            return self._run_packed(payloads, caches)
        if kind == "suffix":
            return self._run_suffixes(payloads, caches)
        if kind == "call":
            outputs = batch.group[1](self.context, [p.data for p in payloads])
            if len(outputs) != len(payloads):
                raise RuntimeError(f"{batch.group[1].__qualname__} returned {len(outputs)} outputs for {len(payloads)}")
            return outputs
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
        kind = self.context.kind
        return self._outputs(full_forward(self.model, kind, ids, ids.shape[1] - 1, targets, need_prob, zeroed))

    def _packed_forward(self, prefixes, suffixes: list[Suffix], return_caches: bool = False):
        """Suffixes over prefix caches (or whole texts) packed end to end: with cascade attention (one
        row, each prefix read once) or as rows with a dense 4-D mask (`context.cascade`)."""
        if self.context.cascade:
            return cascade_forward(self.model, prefixes, suffixes, return_caches)
        return packed_suffix_forward(self.model, prefixes, suffixes, self.context.row_capacity, return_caches)

    def build_caches(self, texts: list[tuple[int, ...]]) -> list[list]:
        """The clean caches of `texts` from one packed forward (each text a suffix starting at 0)."""
        return self._packed_forward([], [Suffix(0, 0, ids) for ids in texts], return_caches=True)[1]

    @torch.no_grad()
    def _run_packed(self, payloads: list[FullPayload], caches: PrefixCaches) -> list[ForwardOutput]:
        """Whole sequences of any lengths packed end to end (causal LMs): no padding, no length groups.
        The texts whose caches a caller pinned keep them (the same forward computes them)."""
        if not any(p.keep_cache for p in payloads):
            return self._scored(self._packed_forward([], whole_texts(payloads)), payloads)
        hidden, own = self._packed_forward([], whole_texts(payloads), return_caches=True)
        for p, cache in zip(payloads, own, strict=True):
            if p.keep_cache:
                caches.keep(p.ids, cache)
        return self._scored(hidden, payloads)

    @torch.no_grad()
    def _run_suffixes(self, payloads: list[SuffixPayload], caches: PrefixCaches) -> list[ForwardOutput]:
        keys, suffixes = suffixes_over_caches(payloads)
        prefixes = caches.get(keys, self.build_caches)
        return self._scored(self._packed_forward(prefixes, suffixes), payloads)

    def _scored(self, hidden, payloads) -> list[ForwardOutput]:
        need_prob = any(p.need_prob for p in payloads)
        return self._outputs(score_logits(head_logits(self.model, hidden), [p.target for p in payloads], need_prob))
