"""The facade: `Explainer(model, tokenizer).attribute(texts, method=..., **options)`.

The public calls normalize and validate their inputs and resolve each text's target on the caller's
thread; each method's registry entry (`engine.methods`) expands the texts into work, which runs on the
Explainer's engine loop (`engine.runtime.loop`: one thread touches the model, concurrent calls share
batches); the method's reduce step turns each text's outputs into typed results (`engine.results`).
A bad option fails the whole call at once; a bad text in a list becomes an `AttributionFailure` in its
place and the other texts are still attributed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import deque
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from . import methods as registry
from .encoding import encode
from .methods import PreparedText, available_methods, make_options
from .methods._base import clean_work, cleaned, finite_fields, perturbation_work, replaced
from .metrics import comprehensiveness, min_max_normalize, rank_tokens, spearman, sufficiency, top_k_indices
from .models import (
    CAUSAL_LM,
    CLASSIFIER,
    DEFAULT_MODEL,
    classifier_reads_first_token,
    load_model,
    max_length,
    model_kind,
    replacement_id,
)
from .options import check_int, check_k_values, check_method_options
from .results import Attribution, AttributionFailure, Comparison, NonFiniteOutputError
from .runtime import scope as call_scope
from .runtime.context import ModelContext
from .runtime.forward import packs_rows
from .runtime.loop import EngineLoop
from .runtime.runner import ModelRunner

# Token budgets per batch (query tokens + cached prefix tokens). On the 2-core CPU, forwards reach most
# of the matmul peak from a few hundred tokens; on a GPU the budget is limited by memory instead.
DEFAULT_CPU_BATCH_TOKENS = 2048
DEFAULT_GPU_BATCH_TOKENS = 32768


def _scored_finite(p: PreparedText) -> bool:
    """Whether a text's clean pass gave a finite probability and logit for its target."""
    return bool(np.isfinite([p.target_prob, p.target_logit]).all())


def as_float_array(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


class Explainer:
    """Token attributions for one Hugging Face causal LM or sequence classifier.

    Thread-safe: calls from any number of threads run concurrently on one engine loop, whose one
    thread runs the model; their work shares batches. Explainers on one model take turns per batch."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        prefix_reuse: bool = True,
        row_capacity: int = 256,
        cascade_attention: bool = True,
        compile: bool = False,
        progress: bool | None = None,
        attention_maps: str | None = None,
        max_request_share: float | None = 0.5,
    ):
        """`max_batch_tokens`: padded tokens per batch, the cached prefix they attend to included
        (default 2048 on the CPU, 32768 on CUDA); `max_batch_size`: items per batch (default: no limit);
        `prefix_reuse`: run causal-LM perturbations from their first changed token over the clean
        prefix cache (classifiers always recompute in full); `row_capacity`: tokens per packed row of
        suffixes (dense rows only); `cascade_attention`: packed perturbations and texts run on cascade
        attention (one row, each cached prefix read once: `runtime.cascade`) instead of rows with a
        dense 4-D mask; `compile`: the decoder layers' MLPs and norms run through `torch.compile`
        (element-wise work fused; the first batches pay the compilation: `runtime.compiled`);
        `progress`: a tqdm bar (default: on for 16 texts or more); `attention_maps`: how
        `raw_attention` and `rollout` get attention maps, "eager" (eager attention, heads fused by hooks
        as each layer returns them) or "recompute" (the model keeps SDPA; `kernels.attention_probs`
        recomputes the fused maps from queries and keys), default "recompute" on CUDA, "eager" else;
        `max_request_share`: the share of a batch one call may take while other calls wait (None: strict
        arrival order)."""
        self.model = model  # its train/eval mode is the user's: each call runs in eval mode (`exclusive_eval`)
        self.tokenizer = tokenizer
        self.kind = model_kind(model)
        self.max_length = max_length(model, tokenizer)
        self.num_layers = int(model.config.num_hidden_layers)
        self.replacement_id = replacement_id(tokenizer)
        self.vocab_rows = int(model.get_input_embeddings().weight.shape[0])
        if not 0 <= self.replacement_id < self.vocab_rows:
            raise ValueError(
                f"the replacement token id {self.replacement_id} (the tokenizer's pad token) is outside the "
                f"model's embedding table ({self.vocab_rows} rows)"
            )
        # packed rows and prefix caches for causal LMs whose masks the packed layout expresses
        # (`forward.packs_rows`); others recompute every sequence in full, with transformers' own masks
        self.prefix_reuse = bool(prefix_reuse) and self.kind == CAUSAL_LM and packs_rows(model)
        if max_batch_tokens is None:
            on_gpu = model.device.type == "cuda"
            max_batch_tokens = DEFAULT_GPU_BATCH_TOKENS if on_gpu else DEFAULT_CPU_BATCH_TOKENS
        max_batch_tokens = check_int("max_batch_tokens", max_batch_tokens, minimum=1)
        row_capacity = check_int("row_capacity", row_capacity, minimum=1)
        for name, flag in (("cascade_attention", cascade_attention), ("compile", compile)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if max_batch_size is not None:
            max_batch_size = check_int("max_batch_size", max_batch_size, minimum=1)
        from .runtime.attention_capture import MAPS

        if attention_maps is None:
            attention_maps = "recompute" if model.device.type == "cuda" else "eager"
        if attention_maps not in MAPS:
            raise ValueError(f"attention_maps must be one of {list(MAPS)} or None, got {attention_maps!r}")
        self.attention_maps = attention_maps
        self.progress = progress
        self.context = ModelContext(
            model=model,
            tokenizer=tokenizer,
            kind=self.kind,
            num_layers=self.num_layers,
            replacement_id=self.replacement_id,
            reads_first_token=self.kind == CLASSIFIER and classifier_reads_first_token(model),
            prefix_reuse=self.prefix_reuse,
            row_capacity=row_capacity,
            cascade=self.prefix_reuse and cascade_attention,
            compile=compile,
            attention_maps=attention_maps,
        )
        self.loop = EngineLoop(ModelRunner(self.context), max_batch_tokens, max_batch_size, max_request_share)
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer's settings may not change under a running call

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = DEFAULT_MODEL, *, kind: str = "auto", dtype=None, device=None, **explainer_options
    ) -> Explainer:
        """ "smollm2" (the embedded default), a Hugging Face id or a local folder (see `load_model`);
        `dtype`: "float32" (default), "bfloat16" or "float16" (the model runs in that dtype; scores
        are accumulated in float32), or "float64". `explainer_options` are the constructor's
        (max_batch_tokens, prefix_reuse, ...)."""
        import torch

        dtypes = {
            None: torch.float32,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
            "float64": torch.float64,
        }
        if dtype in dtypes:
            dtype = dtypes[dtype]
        elif not isinstance(dtype, torch.dtype) or dtype not in dtypes.values():
            raise ValueError(f"dtype must be one of {list(dtypes)[1:]} (or that torch.dtype), got {dtype!r}")
        model, tokenizer = load_model(name_or_path, kind=kind, dtype=dtype, device=device)
        return cls(model, tokenizer, **explainer_options)

    # ----------------------------------------------------------------------------------- public calls

    def attribute(self, texts: str | Sequence[str], method: str = "leave_one_out", *, target=None, **options):
        """Attribute one text (returns an `Attribution`) or a list (returns one entry per text).

        In a list, a text that cannot be attributed (empty, too long, shorter than the window, a
        target not in the vocabulary, ...) gives an `AttributionFailure` (falsy, with `.error`) at its
        index; the other texts are attributed as usual. A single text raises the error instead.
        `target`: None (the model's prediction), a token id / class index, or a token string / label.
        """
        return self._attribute(texts, method, target, options, clean_cache=None)

    def _attribute(self, texts, method: str, target, options: dict, clean_cache: dict | None):
        """`attribute`; `clean_cache` (text, target) -> clean-pass result, shared by calls that
        attribute the same texts with several methods (`evaluate`), so each text is scored once."""
        spec = registry.get(method)
        opts = make_options(method, **options)
        if spec.check_model is not None:
            spec.check_model(self.context, opts)
        single = isinstance(texts, str)
        batch = [texts] if single else self._as_list(texts)
        prepared, failures = [], {}
        for i, text in enumerate(batch):
            try:
                p = self._prepare(i, text, target)
                if spec.check_text is not None:
                    spec.check_text(p, opts)
                prepared.append(p)
            except (ValueError, TypeError) as err:
                if single:
                    raise
                failures[i] = AttributionFailure(index=i, text=text, method=method, error=err)
        with self._kept_caches(spec, prepared) as (keep, unpin):
            if prepared and not spec.scores_itself:
                prepared = self._clean(prepared, {} if clean_cache is None else clean_cache, keep)
                for p in prepared:
                    if not _scored_finite(p):
                        failures[p.index] = self._non_finite(p, method, "logits at the read position", single)
                prepared = [p for p in prepared if p.index not in failures]
            # once the perturbations are queued they hold the caches they read: the pins can go
            computed = self._run_method(spec, prepared, opts, submitted=unpin) if prepared else []
        results = dict(failures)
        for p, fields in zip(prepared, computed, strict=True):
            if finite_fields(fields):
                results[p.index] = self._attribution(p, method, opts, fields)
            else:
                clean = np.isfinite([fields.get("target_prob", 0.0), fields.get("target_logit", 0.0)]).all()
                what = "scores" if clean else "logits at the read position"
                results[p.index] = self._non_finite(p, method, what, single)
        ordered = [results[i] for i in range(len(batch))]
        return ordered[0] if single else ordered

    @contextlib.contextmanager
    def _kept_caches(self, spec, prepared: list[PreparedText]):
        """(ids, unpin): the texts whose clean pass keeps its prefix cache for the method's
        perturbations: for a method that perturbs the clean text on a causal LM with prefix reuse, the
        first texts up to one batch budget of tokens (their perturbations run first; a bound, so memory
        does not grow with the number of texts), pinned on the loop until `unpin()` (called once their
        perturbations are queued, and on leaving the block in any case)."""
        keys: list[tuple[int, ...]] = []
        if spec.perturbs_clean_text and self.context.packs_texts:
            budget = self.loop.scheduler.max_batch_tokens
            for ids in dict.fromkeys(p.input_ids for p in prepared):
                budget -= len(ids)
                if budget < 0:
                    break
                keys.append(ids)
        pinned = [keys]

        def unpin():
            if pinned:
                self.loop.unpin(pinned.pop())

        self.loop.pin(keys)
        try:
            yield frozenset(keys), unpin
        finally:
            unpin()

    def _run_method(self, spec, prepared: list[PreparedText], opts, submitted=None) -> list[dict]:
        """Expand every text, run all their work as one request on the loop, reduce each text's outputs;
        `submitted()` is called once the work is queued."""
        per_text = [spec.expand(self.context, p, opts) for p in prepared]
        outputs = self._run([w for work in per_text for w in work], spec.name, len(prepared), submitted)
        fields, at = [], 0
        for p, work in zip(prepared, per_text, strict=True):
            fields.append(spec.reduce(self.context, p, opts, outputs[at : at + len(work)]))
            at += len(work)
        return fields

    def _run(self, work: list, desc: str, n_texts: int, submitted=None) -> list:
        """Run `work` on the loop as one request (a tqdm bar for 16 texts or more, unless `progress`);
        an interrupted call (KeyboardInterrupt, an error) cancels its request before it propagates.
        `submitted()`, when given, is called once the request is queued."""
        show = self.progress if self.progress is not None else n_texts >= 16
        call_scope.check_current()
        with tqdm(total=len(work), desc=desc, disable=not show, leave=False) as bar:
            future = self.loop.submit(work, on_progress=bar.update if show else None)
            if submitted is not None:
                submitted()
            return call_scope.wait(self.loop, future)

    def _stream(self, keys, plan, finish, desc: str, window: int) -> None:
        """For each key in order: `plan(key)` (with `.work`) runs as its own request, up to `window` in
        flight, and `finish(key, plan, outputs)` is called as they complete, in order; all requests of
        the call share one owner's share of each batch. Interrupted, every pending request is cancelled."""
        owner = object()
        pending: deque = deque()
        show = self.progress if self.progress is not None else len(keys) >= 16
        with tqdm(total=len(keys), desc=desc, disable=not show, leave=False) as bar:
            try:
                for key in keys:
                    call_scope.check_current()
                    planned = plan(key)
                    pending.append((key, planned, self.loop.submit(planned.work, owner=owner)))
                    while len(pending) >= window or (pending and pending[0][2].done()):
                        done_key, done_plan, future = pending.popleft()
                        finish(done_key, done_plan, call_scope.wait(self.loop, future))
                        bar.update(1)
                while pending:
                    done_key, done_plan, future = pending.popleft()
                    finish(done_key, done_plan, call_scope.wait(self.loop, future))
                    bar.update(1)
            except BaseException:
                for _, _, future in pending:
                    self.loop.cancel(future)
                raise

    @staticmethod
    def scope(timeout_s: float | None = None):
        """`with ex.scope(timeout_s) as scope:` the calls this thread makes inside the block stop at the
        deadline (`DeadlineExceeded`, their queued work purged) and can be cancelled from another
        thread with `scope.cancel()` (`CallCancelled`); see `engine.runtime.scope`."""
        return call_scope.scoped(timeout_s)

    def _clean_pass(self, prepared: list[PreparedText], keep=frozenset()) -> list[PreparedText]:
        work = [clean_work(self.context, p, p.input_ids in keep) for p in prepared]
        outputs = self._run(work, "clean pass", len(prepared))
        return [cleaned(p, out) for p, out in zip(prepared, outputs, strict=True)]

    def _clean_one(self, text: str, target, what: str) -> PreparedText:
        """One text's clean pass; a non-finite output raises `NonFiniteOutputError`."""
        (p,) = self._clean_pass([self._prepare(0, text, target)])
        if not _scored_finite(p):
            self._non_finite(p, what, "logits at the read position", single=True)
        return p

    @staticmethod
    def _non_finite(p: PreparedText, method: str, what: str, single: bool) -> AttributionFailure:
        """The failure of a text whose model outputs are NaN or infinite (raised for a single text)."""
        err = NonFiniteOutputError(
            f"non-finite {what} (token {p.read_pos % len(p.tokens)} of {len(p.tokens)}) for {method}: the "
            "model's output on this text is NaN or infinite (NaN or infinite weights or embeddings, or an "
            "overflow in a low-precision dtype)"
        )
        if single:
            raise err
        return AttributionFailure(index=p.index, text=p.text, method=method, error=err)

    def _clean(self, prepared: list[PreparedText], cache: dict, keep=frozenset()) -> list[PreparedText]:
        """The clean pass for the texts not yet in `cache`; every text's scored entry from the cache.
        `keep`: texts whose clean pass keeps its prefix cache (pinned by the caller)."""
        missing = [p for p in prepared if (p.text, p.target_id) not in cache]
        if missing:
            done = self._clean_pass(missing, keep)
            cache.update(((p.text, p.target_id), c) for p, c in zip(missing, done, strict=True))
        # cleaned entries keep the text's position in this call's list
        return [dataclasses.replace(cache[(p.text, p.target_id)], index=p.index) for p in prepared]

    def predict(self, text: str) -> tuple[str, float]:
        """The predicted token (or class label) and its probability."""
        p = self._clean_one(text, None, "predict")
        return self._decode_target(p.target_id), p.target_prob

    def faithfulness(self, text: str, attribution, k_values=(1, 3, 5), *, target=None) -> dict:
        """The seed's sufficiency and comprehensiveness at each k for `attribution` on `text`.

        `attribution`: an `Attribution` (its target is used unless `target` is given) or a score vector.
        """
        if isinstance(attribution, Attribution):
            if attribution.text != text:
                raise ValueError(
                    f"the attribution is of another text ({attribution.text[:60]!r}), not {text[:60]!r}: pass "
                    "the text it was computed for, or its scores as an array"
                )
            scores = attribution.scores
            target = attribution.target_id if target is None else target
        else:
            scores = as_float_array(attribution)
        p = self._clean_one(text, target, "faithfulness")
        if scores.ndim != 1 or len(scores) != len(p.tokens):
            raise ValueError(f"attribution has {scores.shape} scores; the text has {len(p.tokens)} tokens")
        ks = check_k_values(k_values, len(p.tokens))
        order = rank_tokens(scores)
        work = []
        for k in ks:
            top = set(order[:k].tolist())
            keep_top = replaced(p.input_ids, [i for i in range(len(p.tokens)) if i not in top], self.replacement_id)
            work.append(perturbation_work(self.context, p, keep_top, True))
            work.append(perturbation_work(self.context, p, replaced(p.input_ids, top, self.replacement_id), True))
        outs = self._run(work, "faithfulness", 1)
        return {
            f"k={k}": {
                "sufficiency": sufficiency(outs[2 * j].prob, p.target_prob),
                "comprehensiveness": comprehensiveness(outs[2 * j + 1].prob, p.target_prob),
            }
            for j, k in enumerate(ks)
        }

    def compare(
        self,
        text: str,
        methods: Sequence[str] | None = None,
        *,
        target=None,
        top_k: int = 3,
        options: dict[str, dict] | None = None,
    ) -> Comparison:
        """Several methods on one text: normalized scores, Spearman matrix, top-k tokens per method."""
        if isinstance(methods, str):  # one method, not its characters
            methods = [methods]
        methods = list(methods) if methods is not None else registry.default_methods()
        if not methods:
            raise ValueError(f"methods is empty: pass at least one of {available_methods()}")
        options = options or {}
        check_method_options(methods, options, "compared")
        attributions = {m: self.attribute(text, m, target=target, **options.get(m, {})) for m in methods}
        first = attributions[methods[0]]
        # as the seed's `argsort(...)[-3:]`, a text shorter than top_k shows all its tokens
        top_k = min(check_k_values((top_k,), self.max_length)[0], len(first.tokens))
        normalized = {m: min_max_normalize(a.scores) for m, a in attributions.items()}
        n = len(methods)
        rho, pval = np.eye(n), np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                rho[i, j], pval[i, j] = spearman(normalized[methods[i]], normalized[methods[j]])
                rho[j, i], pval[j, i] = rho[i, j], pval[i, j]
        tops = {
            m: [(first.tokens[i], float(normalized[m][i])) for i in top_k_indices(normalized[m], top_k)]
            for m in methods
        }
        return Comparison(
            text=text,
            tokens=first.tokens,
            target_token=first.target_token,
            target_prob=first.target_prob,
            attributions=attributions,
            normalized=normalized,
            spearman=rho,
            spearman_p=pval,
            top_k=tops,
        )

    def evaluate(self, texts: str | Sequence[str], methods: str | Sequence[str] | None = None, **kwargs):
        """Attribute every text with every method and score the explanations: faithfulness at k,
        perturbation curves (AOPC, ABPC), sparsity, agreement, and plausibility / consistency when
        rationales / paraphrase pairs are given. All perturbations run as one batched workload.
        See `engine.evaluation.evaluate` for the keyword options and the conventions."""
        from .evaluation import evaluate

        return evaluate(self, texts, methods if methods is not None else registry.default_methods(), **kwargs)

    # ------------------------------------------------------------------------------------- internals

    @staticmethod
    def _as_list(texts) -> list:
        if isinstance(texts, (bytes, dict)) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts is empty: pass at least one text")
        return list(texts)

    def _prepare(self, index: int, text, target) -> PreparedText:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text is empty or whitespace only")
        with self._tokenizer_lock:
            inputs, tokens = encode(self.tokenizer, text)
        n = len(tokens)
        if n == 0:
            raise ValueError("text produced no tokens")
        if n > self.max_length:
            raise ValueError(f"text has {n} tokens; this model accepts at most {self.max_length}")
        too_big = [(i, t) for i, t in zip(inputs["input_ids"][0].tolist(), tokens, strict=True) if i >= self.vocab_rows]
        if too_big:
            (i, t), *_ = too_big
            raise ValueError(
                f"token {t!r} has id {i}, outside the model's embedding table ({self.vocab_rows} rows): the "
                "tokenizer has tokens the model was not resized for (model.resize_token_embeddings(len(tokenizer)))"
            )
        read_pos = self.context.read_pos(n)
        return PreparedText(
            index=index,
            text=text,
            input_ids=tuple(inputs["input_ids"][0].tolist()),
            tokens=tuple(tokens),
            target_id=self._resolve_target(target),
            read_pos=read_pos,
        )

    def _n_outputs(self) -> int:
        if self.kind == CLASSIFIER:
            return int(self.model.config.num_labels)
        return int(self.model.get_output_embeddings().weight.shape[0])

    def _resolve_target(self, target) -> int | None:
        if target is None:
            return None
        what = "class index" if self.kind == CLASSIFIER else "token id"
        if isinstance(target, bool) or not isinstance(target, (int, np.integer, str)):
            raise TypeError(f"target must be None, an int ({what}) or a str, got {type(target).__name__}")
        if isinstance(target, str):
            return self._target_from_string(target)
        n_outputs = self._n_outputs()
        if not 0 <= int(target) < n_outputs:
            raise ValueError(f"target {what} {target} is out of range [0, {n_outputs})")
        return int(target)

    def _target_from_string(self, target: str) -> int:
        if self.kind == CLASSIFIER:
            label2id = {str(k): int(v) for k, v in (self.model.config.label2id or {}).items()}
            if target not in label2id:
                raise ValueError(f"target label {target!r} is not one of {sorted(label2id)}")
            return label2id[target]
        vocab = self.tokenizer.get_vocab()
        if target in vocab:  # a raw vocabulary entry, e.g. 'ĠParis'
            return vocab[target]
        with self._tokenizer_lock:
            ids = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        unk = self.tokenizer.unk_token_id
        if len(ids) != 1 or (unk is not None and ids[0] == unk):
            raise ValueError(
                f"target token {target!r} is not in the vocabulary: it encodes to {len(ids)} tokens "
                f"{self.tokenizer.convert_ids_to_tokens(ids)}; pass one token (string or id)"
            )
        return ids[0]

    def _decode_target(self, target_id: int) -> str:
        if self.kind == CLASSIFIER:
            return str((self.model.config.id2label or {}).get(target_id, target_id))
        return self.tokenizer.decode([target_id])

    def _attribution(self, p: PreparedText, method: str, opts, fields: dict) -> Attribution:
        fields = dict(fields)
        scored = {k: fields.pop(k) for k in ("target_id", "target_prob", "target_logit") if k in fields}
        p = dataclasses.replace(p, **scored)
        fields["scores"] = as_float_array(fields["scores"])
        return Attribution(
            text=p.text,
            tokens=list(p.tokens),
            token_ids=list(p.input_ids),
            method=method,
            target_id=p.target_id,
            target_token=self._decode_target(p.target_id),
            target_prob=p.target_prob,
            target_logit=p.target_logit,
            options=dataclasses.asdict(opts),
            **fields,
        )
