"""Unusual use and bad input that once gave wrong numbers or raw errors (issue 11's table), one test each."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import (
    METHOD_OPTIONS,
    References,
    assert_within_fp32_noise,
    make_tokenizer,
    random_texts,
    reference_scores,
    tiny_gpt2,
    tiny_llama,
    words_for,
)

from engine import AttributionFailure, Explainer, available_methods

OPTIONS = {**METHOD_OPTIONS, "rollout": {"head_fusion": "max", "discard_ratio": 0.0}}


# Threads sharing an Explainer: `tests/runtime/test_loop.py` (concurrent calls share batches now, so
# their float32 results may differ from a lone call's in the last bits: the check runs in float64).


def test_train_mode_is_attributed_in_eval_mode_and_restored(llama):
    model, tok = llama
    model.config.attention_dropout = 0.5  # dropout that train mode would apply
    model.train()
    model.model.layers[0].eval()  # a mixed mode, restored as it was
    modes = [m.training for m in model.modules()]
    ex = Explainer(model, tok)
    assert [m.training for m in model.modules()] == modes  # the constructor changes nothing
    text = "the cat sat on the mat"
    first, second = ex.attribute(text, "leave_one_out"), ex.attribute(text, "leave_one_out")
    assert [m.training for m in model.modules()] == modes
    assert np.array_equal(first.scores, second.scores)  # no dropout: the same on every call
    model.eval()
    assert np.array_equal(Explainer(model, tok).attribute(text, "leave_one_out").scores, first.scores)


def test_faithfulness_of_another_texts_attribution_is_refused(llama):
    model, tok = llama
    ex = Explainer(model, tok)
    a = ex.attribute("the cat sat on", "leave_one_out")
    with pytest.raises(ValueError, match="attribution is of another text"):
        ex.faithfulness("a dog ran to", a)  # same number of tokens
    assert set(ex.faithfulness("a dog ran to", a.scores, k_values=(1,))) == {"k=1"}  # scores: the caller's call


def test_token_ids_outside_the_embedding_table_fail_their_text_only(llama):
    model, tok = llama
    tok.add_tokens(["zebra"])  # the tokenizer grows, the model is not resized
    ex = Explainer(model, tok)
    results = ex.attribute(["the cat sat", "the zebra sat", "a dog ran"], "leave_one_out")
    assert results[0] and results[2] and not results[1]
    assert isinstance(results[1].error, ValueError) and "outside the model's embedding table" in str(results[1].error)
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        ex.attribute("the zebra sat", "rollout")


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method", available_methods())
def test_float16_models_equal_the_reference_within_float16_noise(make_model, method):
    model, tok = make_model().half(), make_tokenizer()
    refs = References(model)  # float64 copy (exact) and the float16 model (the reference's own fp16 noise)
    texts = random_texts(4, *words_for(method, 3, 9))
    opts = OPTIONS.get(method, {})
    got, exact, fp16 = [], [], []
    for text, a in zip(texts, Explainer(model, tok).attribute(texts, method, **opts), strict=True):
        assert a, a.error
        e, r = refs(reference_scores, method, tok=tok, text=text, read_pos=-1, target=a.target_id, **opts)
        got.append(a.scores), exact.append(e), fp16.append(r)
    assert_within_fp32_noise(got, exact, fp16, what=f"float16 {method}")


def test_from_pretrained_dtypes_and_devices(model_dir):
    ex = Explainer.from_pretrained(str(model_dir), dtype="float16")
    assert next(ex.model.parameters()).dtype == torch.float16 and ex.attribute("the cat sat", "rollout")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Explainer.from_pretrained(str(model_dir), dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            Explainer.from_pretrained(str(model_dir), device="cuda")
    with pytest.raises(ValueError, match="device must be"):
        Explainer.from_pretrained(str(model_dir), device="gpu0")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Explainer.from_pretrained("/nonexistent/model")


def test_argument_types_users_pass(llama):
    model, tok = llama
    ex = Explainer(model, tok)
    text = "the cat sat on the mat"
    a = ex.attribute(text, "leave_one_out")
    with pytest.raises(TypeError, match="k_values must be an int or a sequence"):
        ex.faithfulness(text, a, None)
    with pytest.raises(ValueError, match="k_values is empty"):
        ex.faithfulness(text, a, ())
    assert list(ex.compare(text, "rollout").attributions) == ["rollout"]  # a str is one method
    with pytest.raises(ValueError, match="methods is empty"):
        ex.compare(text, [])
    # numpy integers are integers, for every option as for `target` and `k`
    w = ex.attribute(text, "sliding_window", window_size=np.int64(2))
    assert w.options["window_size"] == 2 and type(w.options["window_size"]) is int
    assert ex.attribute(text, "integrated_gradients", n_steps=np.int32(3)).options["n_steps"] == 3
    assert ex.attribute(text, "raw_attention", layer=np.int64(-1)).options["layer"] == -1
    assert ex.attribute(text, "rollout", discard_ratio=np.float32(0.25)).options["discard_ratio"] == 0.25
    with pytest.raises(TypeError, match="window_size must be an int"):
        ex.attribute(text, "sliding_window", window_size=2.0)


def test_engine_calls_raise_no_transformers_future_warnings(llama):
    """The cache goes in under the keyword the installed transformers expects (`cache` from 5.24 on),
    so nothing deprecated is used: transformers' FutureWarnings raised from engine calls are errors."""
    model, tok = llama
    ex = Explainer(model, tok, max_batch_tokens=64)
    texts = random_texts(5, 2, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for method in available_methods():
            assert all(ex.attribute(texts, method, **OPTIONS.get(method, {})))
        ex.evaluate(texts[:2], ["leave_one_out", "rollout"], k_values=(1,), curve_steps=2)


def test_a_foreign_kernels_package_first_on_the_path_is_a_clear_import_error(tmp_path):
    """Hugging Face's `kernels` distribution has this project's import name: found first, it would be
    imported in place of ours. A real process with such a package first on sys.path."""
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("def get_kernel(name):\n    raise RuntimeError('the hub kernels package')\n")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import engine"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "ImportError" in out.stderr and "pip uninstall kernels" in out.stderr
    ok = subprocess.run([sys.executable, "-c", "import engine, kernels; print(kernels.ATTRIBUTION_ENGINE_KERNELS)"])
    assert ok.returncode == 0


def test_one_failure_type_for_every_bad_text(llama):
    """Every per-text problem becomes an AttributionFailure in place; the list keeps its order."""
    model, tok = llama
    ex = Explainer(model, tok)
    results = ex.attribute(["the cat", "", 3, "a dog ran"], "leave_one_out")
    assert [bool(r) for r in results] == [True, False, False, True]
    assert all(isinstance(r, AttributionFailure) for r in results[1:3])
