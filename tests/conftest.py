"""Tiny models and tokenizers built in-process (never downloaded), random texts, and the seed fixture."""

from __future__ import annotations

import contextlib
import copy
import os
import random
import zlib

import numpy as np
import pytest
import torch

# Kernels are checked on the CPU with Triton's interpreter. Triton reads this once, when it is first
# imported, so it is set here, before any test module can import it; a CUDA machine runs them for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "because",
    "it",
    "was",
    "very",
    "tired",
    "a",
    "dog",
    "ran",
    "to",
    "park",
    "city",
    "of",
    "paris",
    "tower",
    "is",
    "located",
    "in",
    "river",
    "blue",
    "red",
    "green",
    "house",
    "big",
    "small",
    "and",
    "or",
    "but",
    "with",
    "from",
    "over",
    "under",
    "bird",
    "tree",
    "sky",
    "sun",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def make_tokenizer(bert_style: bool = False, with_pad: bool = True):
    """A word-level fast tokenizer over WORDS. `bert_style` wraps texts in [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_style:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    kwargs = {"unk_token": "[UNK]"}
    if with_pad:
        kwargs["pad_token"] = "[PAD]"
    if bert_style:
        kwargs.update(cls_token="[CLS]", sep_token="[SEP]")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=64, **kwargs)
    return tok


VOCAB_SIZE = len(SPECIALS) + len(WORDS)


def tiny_llama(seed: int = 0, classifier: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,  # SmolLM2: 30
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=3,
        attn_implementation="eager",
    )
    cls = LlamaForSequenceClassification if classifier else LlamaForCausalLM
    model = cls(config).eval()
    # nn.Embedding(padding_idx=0) starts the pad row at zero; SmolLM2's pad token has a real embedding,
    # and a zero replacement baseline sits on RMSNorm's scale-invariance kink, so give it a real row.
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[0] = emb[1:].mean(0) + emb.std() * torch.randn(emb.shape[1])
    return model


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_implementation="eager"
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
        attn_implementation="eager",
        id2label={0: "neg", 1: "neu", 2: "pos"},
        label2id={"neg": 0, "neu": 1, "pos": 2},
    )
    return BertForSequenceClassification(config).eval()


# (model factory, tokenizer factory): the families every method is checked on
FAMILIES = {
    "llama": (tiny_llama, lambda: make_tokenizer()),
    "gpt2": (tiny_gpt2, lambda: make_tokenizer(with_pad=False)),  # GPT-2 has no pad token: the seed uses 0
    "bert": (tiny_bert, lambda: make_tokenizer(bert_style=True)),
}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    model_fn, tok_fn = FAMILIES[request.param]
    return request.param, model_fn(), tok_fn()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Llama and its tokenizer saved to a folder: a real model path for the CLI processes."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def llama():
    return tiny_llama(), make_tokenizer()


def random_texts(n: int, min_words: int = 2, max_words: int = 12, seed: int | None = None) -> list[str]:
    """Random word sequences of mixed lengths: from `seed`, else from the test's own seeded generator
    (`_seed_everything`: fixed per test, different between tests)."""
    rng = random.Random(seed) if seed is not None else random
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


@pytest.fixture(autouse=True)
def _seed_everything(request):
    """Every generator seeded from a fixed integer per test: the CRC of the test's id (stable across runs,
    machines and PYTHONHASHSEED, unlike `hash()`), so each test draws its own inputs, the same every run."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, what=""):
    """allclose with a report of how many entries differ and the first few (Liger's verbose allclose)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = ~np.isclose(actual, expected, rtol=rtol, atol=atol)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        rows = [f"  at {tuple(i)}: {actual[tuple(i)]!r} vs {expected[tuple(i)]!r}" for i in idx]
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} entries differ (rtol={rtol}, atol={atol}):\n" + "\n".join(rows)
        )


# ------------------------------------------------------------------------------ float32 tolerances
#
# The engine runs in float32 and sums in other orders than the reference (packed rows, cached prefixes,
# batched steps), so the two differ by float32 rounding, whose size depends on the CPU's kernels
# (AVX-512, AVX2 or plain). No fixed tolerance is right on every machine. Instead, as flash-attention's
# tests do, each check measures the noise: the reference is run in float64 (`exact`, the function's
# value) and in float32 (`fp32`, what float32 rounding does to the reference itself on the same
# inputs), and the engine must be within NOISE_FACTOR times the reference's own float32 error, plus a
# floor of FLOOR_ULPS float32 ulps of the values' scale for values that round (nearly) exactly.
# NOISE_FACTOR: the engine's and the reference's errors are independent samples of the same kind of
# rounding; the maximum over a test's entries of one is below 4x the other's (measured over the suite
# under three CPU capabilities, `README`); FLOOR_ULPS: a handful of ulps per layer of the tiny models.

EPS32 = float(np.finfo(np.float32).eps)
NOISE_FACTOR = 4.0
FLOOR_ULPS = 32.0


def float64_copy(model):
    """A float64 copy of `model` (the original is untouched): the reference run on it is the function's
    value up to float64 rounding (transformers keeps a float32 softmax in eager attention and a float32
    RMSNorm: single roundings, far below the float32 runs' accumulated error)."""
    return copy.deepcopy(model).to(torch.float64)


@contextlib.contextmanager
def float64_default():
    """torch's default dtype float64 inside the block (code that makes its own tensors, like the seed's
    `torch.eye`, then runs in float64 too)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _flat(values) -> np.ndarray:
    if isinstance(values, (list, tuple)):
        parts = [_flat(v) for v in values]
        return np.concatenate(parts) if parts else np.zeros(0)
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.ravel(np.asarray(values, dtype=np.float64))


def fp32_bound(exact, fp32, factor: float = NOISE_FACTOR) -> float:
    """The largest difference from `exact` that float32 rounding explains: `factor` times the float32
    reference's own error, plus FLOOR_ULPS ulps of the largest |exact|."""
    e, r = _flat(exact), _flat(fp32)
    assert e.shape == r.shape, f"reference runs differ in shape: {e.shape} vs {r.shape}"
    finite = np.isfinite(e) & np.isfinite(r)
    ref_err = float(np.abs(r - e)[finite].max(initial=0.0))
    scale = float(np.abs(e[finite]).max(initial=0.0))
    return factor * ref_err + FLOOR_ULPS * EPS32 * scale


def assert_within_fp32_noise(actual, exact, fp32, what: str = "", factor: float = NOISE_FACTOR):
    """`actual` (float32 engine) against `exact` (float64 reference), within `fp32_bound`.

    Each argument may be an array, a number, or a (nested) list of them (all the texts of a test: the
    noise is measured over the whole test, not per text, so a text that happens to round exactly does not
    make the bound 0). NaN must appear at the same places."""
    a, e = _flat(actual), _flat(exact)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert (np.isnan(a) == np.isnan(e)).all(), f"{what}: NaN at different places"
    bound = fp32_bound(exact, fp32, factor)
    err = np.abs(a - e)
    err[np.isnan(err)] = 0.0
    if os.environ.get("ENGINE_NOISE_LOG"):  # calibration: the engine's error against the reference's own
        ref_err = float(np.nan_to_num(np.abs(_flat(fp32) - e)).max(initial=0.0))
        scale = float(np.nan_to_num(np.abs(e)).max(initial=0.0))
        with open(os.environ["ENGINE_NOISE_LOG"], "a") as log:
            log.write(f"{what}\t{err.max(initial=0.0):.6g}\t{ref_err:.6g}\t{scale:.6g}\n")
    if err.max(initial=0.0) > bound:
        bad = np.flatnonzero(err > bound)[:5]
        rows = [f"  at {int(i)}: {a[i]!r} vs {e[i]!r} (float32 reference {_flat(fp32)[i]!r})" for i in bad]
        ref_err = (bound - FLOOR_ULPS * EPS32 * float(np.abs(e).max(initial=0))) / factor
        raise AssertionError(
            f"{what}: {(err > bound).sum()} of {err.size} entries differ by more than {bound:.3g} "
            f"({factor:g} x the float32 reference's own error {ref_err:.3g} + {FLOOR_ULPS:g} ulps of the scale); "
            f"largest {err.max():.3g}:\n" + "\n".join(rows)
        )


class References:
    """A reference function run on a model and on its float64 copy: `refs(fn, *args)` -> (exact, fp32)."""

    def __init__(self, model):
        self.model, self.model64 = model, float64_copy(model)

    def __call__(self, fn, *args, **kwargs):
        return fn(self.model64, *args, **kwargs), fn(self.model, *args, **kwargs)


def assert_matches_reference(actual, refs: References, fn, *args, what: str = "", **kwargs):
    """`actual` against reference `fn(model, *args, **kwargs)` (a value, array or nested list of them),
    within the float32 noise `fn` itself shows on these inputs."""
    exact, fp32 = refs(fn, *args, **kwargs)
    assert_within_fp32_noise(actual, exact, fp32, what=what)


def faithfulness_values(result: dict) -> list[float]:
    """A faithfulness dict ({"k=1": {"sufficiency": .., "comprehensiveness": ..}, ...}) as a flat list."""
    return [result[k][m] for k in sorted(result) for m in ("sufficiency", "comprehensiveness")]


# ------------------------------------------------------------------------------ methods vs references


# (max_batch_size, max_batch_tokens, row_capacity): budgets that do not divide the work
BUDGETS = [(1, 2048, 256), (3, 17, 5), (7, 64, 8), (None, 100_000, 256)]

# non-default options the facade-vs-reference tests run each method with (others run with defaults)
METHOD_OPTIONS = {
    "raw_attention": {"layer": 0},
    "rollout": {"head_fusion": "max", "discard_ratio": 0.5},
    "integrated_gradients": {"n_steps": 6},
    "sliding_window": {"window_size": 2},
    "lrp": {"rule": "cplrp"},
    "shapley_sampling": {"n_samples": 2},
    "kernel_shap": {"n_samples": 24},
}
# words per text for the methods whose cost grows faster than the text (2^n coalitions, n permutations
# of n + 1 coalitions each; `tests/methods/test_shapley.py` covers them further); others: 2 to 11
METHOD_TEXT_WORDS = {"shapley": (2, 4), "shapley_sampling": (2, 7), "kernel_shap": (2, 7)}


def words_for(method: str, lo: int, hi: int) -> tuple[int, int]:
    """A test's (min, max) words per text, capped for the methods of `METHOD_TEXT_WORDS`."""
    cap = METHOD_TEXT_WORDS.get(method, (lo, hi))[1]
    return min(lo, cap), min(hi, cap)


def reference_scores(model, method, tok, text, read_pos, target, **opts):
    """What a registered method must return for one text, straight from its reference (on `model`,
    float32 or its float64 copy), explaining `target` (`engine.methods` registry)."""
    from engine import methods

    spec = methods.get(method)
    return spec.reference(
        model, tok, text, target_id=target, read_pos=read_pos, options=methods.make_options(method, **opts)
    )


def discard_is_well_conditioned(model64, tok, text, head_fusion, ratio, margin=1e-5) -> bool:
    """Whether every layer's discard threshold is at least `margin` (relative) away from the fused
    entries it separates. The discard is a step function of the maps: where an entry sits within float32
    rounding of the quantile, any float32 run (the reference's own included) may keep or drop it, and
    the rollout jumps; such texts say nothing about the engine. `margin`: ~100x the entries' float32
    rounding."""
    from engine import reference as ref

    attentions, _ = ref._attentions(model64, tok, text)
    for a in attentions:
        fused = ref.fuse_heads(a[0], head_fusion)
        threshold = ref.discard_threshold(fused, ratio)
        gaps = (fused - threshold).abs()
        gaps = gaps[gaps > 0]  # an entry equal to the threshold is kept by every run (it *is* the quantile)
        if gaps.numel() and gaps.min() < margin * fused.abs().max():
            return False
    return True
