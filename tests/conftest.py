"""Tiny models and tokenizers built in-process (never downloaded), random texts, and the seed fixture."""

from __future__ import annotations

import os
import random

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
    """Fresh random word sequences of mixed lengths."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
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
