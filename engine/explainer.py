"""The facade: `Explainer(model, tokenizer).attribute(texts, method=..., **options)`.

The public calls normalize and validate their inputs, resolve each text's target, delegate to the
method runners (`engine.methods`), and return typed results (`engine.results`). A bad option fails
the whole call at once; a bad text in a list becomes an `AttributionFailure` in its place and the
other texts are still attributed.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Iterable, Sequence

import numpy as np

from . import methods
from . import reference as ref
from .batching import BatchRunner
from .forward import packs_rows
from .methods import RUNNERS, PreparedText, as_float_array
from .metrics import min_max_normalize, spearman, top_k_indices
from .models import (
    CAUSAL_LM,
    CLASSIFIER,
    DEFAULT_MODEL,
    classifier_reads_first_token,
    exclusive_eval,
    load_model,
    max_length,
    model_kind,
    replacement_id,
)
from .options import available_methods, check_int, check_method_options, make_options
from .results import Attribution, AttributionFailure, Comparison, NonFiniteOutputError

# Token budgets per batch (query tokens + cached prefix tokens). On the 2-core CPU, forwards reach most
# of the matmul peak from a few hundred tokens; on a GPU the budget is limited by memory instead.
DEFAULT_CPU_BATCH_TOKENS = 2048
DEFAULT_GPU_BATCH_TOKENS = 32768


def _scored_finite(p: PreparedText) -> bool:
    """Whether a text's clean pass gave a finite probability and logit for its target."""
    return bool(np.isfinite([p.target_prob, p.target_logit]).all())


def _exclusive(call):
    """A public call runs holding the model's lock, in eval mode, and restores the model's mode after
    (`models.exclusive_eval`): calls from several threads are serialized, never interleaved."""

    @functools.wraps(call)
    def locked(self, *args, **kwargs):
        with exclusive_eval(self.model):
            return call(self, *args, **kwargs)

    return locked


class Explainer:
    """Token attributions for one Hugging Face causal LM or sequence classifier.

    Thread-safe: calls on one model (from any number of Explainers and threads) run one at a time."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        prefix_reuse: bool = True,
        row_capacity: int = 256,
        progress: bool | None = None,
        attention_maps: str | None = None,
    ):
        """`max_batch_tokens`: padded tokens per batch, the cached prefix they attend to included
        (default 2048 on the CPU, 32768 on CUDA); `max_batch_size`: items per batch (default: no limit);
        `prefix_reuse`: run causal-LM perturbations from their first changed token over the clean
        prefix cache (classifiers always recompute in full); `row_capacity`: tokens per packed row of
        suffixes; `progress`: a tqdm bar (default: on for 16 texts or more); `attention_maps`: how
        `raw_attention` and `rollout` get attention maps, "eager" (eager attention, heads fused by hooks
        as each layer returns them) or "recompute" (the model keeps SDPA; `kernels.attention_probs`
        recomputes the fused maps from queries and keys), default "recompute" on CUDA, "eager" else."""
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
        if max_batch_size is not None:
            max_batch_size = check_int("max_batch_size", max_batch_size, minimum=1)
        from .attention_capture import MAPS

        if attention_maps is None:
            attention_maps = "recompute" if model.device.type == "cuda" else "eager"
        if attention_maps not in MAPS:
            raise ValueError(f"attention_maps must be one of {list(MAPS)} or None, got {attention_maps!r}")
        self.attention_maps = attention_maps
        self.runner = BatchRunner(
            model, self.kind, self.replacement_id, max_batch_tokens, max_batch_size, row_capacity, progress
        )

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

    @_exclusive
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
        opts = make_options(method, **options)
        self._check_model_level(method, opts)
        single = isinstance(texts, str)
        batch = [texts] if single else self._as_list(texts)
        prepared, failures = [], {}
        for i, text in enumerate(batch):
            try:
                p = self._prepare(i, text, target)
                self._check_text_level(method, opts, p)
                prepared.append(p)
            except (ValueError, TypeError) as err:
                if single:
                    raise
                failures[i] = AttributionFailure(index=i, text=text, method=method, error=err)
        if prepared and method not in methods.SCORES_ITSELF:
            prepared = self._clean(prepared, {} if clean_cache is None else clean_cache)
            for p in prepared:
                if not _scored_finite(p):
                    failures[p.index] = self._non_finite(p, method, "logits at the read position", single)
            prepared = [p for p in prepared if p.index not in failures]
        computed = RUNNERS[method](self, prepared, opts) if prepared else []
        results = dict(failures)
        for p, fields in zip(prepared, computed, strict=True):
            if methods.finite_fields(fields):
                results[p.index] = self._attribution(p, method, opts, fields)
            else:
                clean = np.isfinite([fields.get("target_prob", 0.0), fields.get("target_logit", 0.0)]).all()
                what = "scores" if clean else "logits at the read position"
                results[p.index] = self._non_finite(p, method, what, single)
        ordered = [results[i] for i in range(len(batch))]
        return ordered[0] if single else ordered

    def _clean_one(self, text: str, target, what: str) -> PreparedText:
        """One text's clean pass; a non-finite output raises `NonFiniteOutputError`."""
        (p,) = methods.clean_pass(self, [self._prepare(0, text, target)])
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

    def _clean(self, prepared: list[PreparedText], cache: dict) -> list[PreparedText]:
        """The clean pass for the texts not yet in `cache`; every text's scored entry from the cache."""
        missing = [p for p in prepared if (p.text, p.target_id) not in cache]
        if missing:
            cleaned = methods.clean_pass(self, missing)
            cache.update(((p.text, p.target_id), c) for p, c in zip(missing, cleaned, strict=True))
        # cleaned entries keep the text's position in this call's list
        return [dataclasses.replace(cache[(p.text, p.target_id)], index=p.index) for p in prepared]

    @_exclusive
    def predict(self, text: str) -> tuple[str, float]:
        """The predicted token (or class label) and its probability."""
        p = self._clean_one(text, None, "predict")
        return self._decode_target(p.target_id), p.target_prob

    @_exclusive
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
        ks = self._check_k_values(k_values, len(p.tokens))
        return methods.faithfulness(self, p, scores, ks)

    @_exclusive
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
        methods = list(methods) if methods is not None else available_methods()
        if not methods:
            raise ValueError(f"methods is empty: pass at least one of {available_methods()}")
        options = options or {}
        check_method_options(methods, options, "compared")
        attributions = {m: self.attribute(text, m, target=target, **options.get(m, {})) for m in methods}
        first = attributions[methods[0]]
        # as the seed's `argsort(...)[-3:]`, a text shorter than top_k shows all its tokens
        top_k = min(self._check_k_values((top_k,), self.max_length)[0], len(first.tokens))
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

    @_exclusive
    def evaluate(self, texts: str | Sequence[str], methods: str | Sequence[str] | None = None, **kwargs):
        """Attribute every text with every method and score the explanations: faithfulness at k,
        perturbation curves (AOPC, ABPC), sparsity, agreement, and plausibility / consistency when
        rationales / paraphrase pairs are given. All perturbations run as one batched workload.
        See `engine.evaluation.evaluate` for the keyword options and the conventions."""
        from .evaluation import evaluate

        return evaluate(self, texts, methods if methods is not None else available_methods(), **kwargs)

    # ------------------------------------------------------------------------------------- internals

    @staticmethod
    def _as_list(texts) -> list:
        if isinstance(texts, (bytes, dict)) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts is empty: pass at least one text")
        return list(texts)

    def _check_model_level(self, method: str, opts) -> None:
        if method == "lrp":
            from .lrp import check_supported

            check_supported(self.model, opts.rule)
        if method == "raw_attention" and not -self.num_layers <= opts.layer < self.num_layers:
            raise ValueError(
                f"layer must be in [{-self.num_layers}, {self.num_layers - 1}] for this "
                f"{self.num_layers}-layer model, got {opts.layer}"
            )

    @staticmethod
    def _check_text_level(method: str, opts, p: PreparedText) -> None:
        if method == "sliding_window" and opts.window_size > len(p.tokens):
            raise ValueError(f"window_size {opts.window_size} is larger than the text ({len(p.tokens)} tokens)")

    @staticmethod
    def _check_k_values(k_values, n_tokens: int) -> tuple[int, ...]:
        if isinstance(k_values, numbers.Integral):
            k_values = (k_values,)
        if isinstance(k_values, (str, bytes)) or not isinstance(k_values, Iterable):
            raise TypeError(f"k_values must be an int or a sequence of ints, got {k_values!r}")
        ks = tuple(k_values)
        if not ks:
            raise ValueError("k_values is empty: pass at least one k")
        for k in ks:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral):
                raise TypeError(f"k must be an int, got {k!r}")
            if not 1 <= k <= n_tokens:
                raise ValueError(f"k must be between 1 and the number of tokens ({n_tokens}), got {k}")
        return tuple(int(k) for k in ks)

    def _prepare(self, index: int, text, target) -> PreparedText:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text is empty or whitespace only")
        inputs, tokens = ref.encode(self.tokenizer, text)
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
        read_pos = 0 if self.kind == CLASSIFIER and classifier_reads_first_token(self.model) else n - 1
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
            method=method,
            target_id=p.target_id,
            target_token=self._decode_target(p.target_id),
            target_prob=p.target_prob,
            target_logit=p.target_logit,
            options=dataclasses.asdict(opts),
            **fields,
        )
