"""LRP for transformers (AttnLRP, CP-LRP) as gradient x input under scoped backward rules.

In the gradient x input form every LRP rule is a change of the backward pass only; the forward values
stay exactly the model's (Achtibat et al., ICML 2024, sec. 3; Ali et al., ICML 2022):

- linear layers, residual additions, embeddings: the plain gradient (the epsilon rule in this form);
- element-wise nonlinearities (SiLU, GELU, tanh): the identity rule, backward `grad * f(x) / x`;
- RMSNorm / LayerNorm: the normalizing factor is a constant (detached), relevance passes unchanged;
- products of two activations, uniform rule: the gradient reaching each factor is divided among the
  factors. Attention: query and key / 4 (two products: scores = q k^T, then probs x v), value / 2;
  the softmax keeps its ordinary gradient. Gated MLP: act(gate) x up, each / 2;
- CP-LRP instead detaches query and key (so the attention probabilities are constants) and the MLP
  gate; the products left are then linear in what is not detached and need no division.

`lrp_rules(model, rule)` installs the rules on one model instance for the duration of a `with` block:
instance-level `forward` overrides for norms, MLPs and activations and forward hooks on the q/k/v
projections, all removed on exit. Nothing in `transformers` is patched, so other models (and other
threads' use of this module) are unaffected. The q/k/v hooks work for any attention implementation
(eager, SDPA, flash): the divisions are constants along the only paths from the output to q, k and v.

An architecture with a module type this file has no rule for raises a `ValueError` naming those types:
silently treating an unknown module as linear would give wrong relevance.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
from torch import nn

from kernels.common import upcast

LRP_RULES = ("attnlrp", "cplrp")

# model_type -> class-name prefix of the families with rules. The Llama family shares Llama's module
# layout (q/k/v/o projections, gated MLP, RMSNorm with `variance_epsilon`).
LLAMA_FAMILY = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
FAMILIES = {**LLAMA_FAMILY, "gpt2": "GPT2", "bert": "Bert"}
# container modules whose own forward only adds, reshapes, or applies linear maps and their children
_CONTAINER_SUFFIXES = (
    "Model",
    "ForCausalLM",
    "LMHeadModel",
    "ForSequenceClassification",
    "DecoderLayer",
    "Block",
    "Encoder",
    "Layer",
    "Embeddings",
    "SelfOutput",
    "Output",
    "Attention",  # its products are handled by the q/k/v rules below
    "RotaryEmbedding",  # the cos/sin tables: constants, no input dependence
)
_LINEAR_LEAVES = (nn.Linear, nn.Embedding, nn.Dropout, nn.ModuleList, nn.Identity)

IDENTITY_EPS = 1e-10  # the identity rule's stabilizer (LXT's value), signed so that f(x)/x never divides by 0


# ------------------------------------------------------------------------------ gradient-only operations


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant (the uniform rule)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _IdentityRule(torch.autograd.Function):
    """y = f(x) forward; backward `grad * f(x) / x` (the identity rule for element-wise nonlinearities)."""

    @staticmethod
    def forward(ctx, fn, x):
        y = fn(x)
        ctx.save_for_backward(y / (x + IDENTITY_EPS * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)))
        return y

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return None, grad * ratio


def scale_gradient(x: torch.Tensor, factor) -> torch.Tensor:
    """`x` unchanged; its gradient multiplied by `factor` (a float or a tensor broadcast over x)."""
    return _ScaleGradient.apply(x, factor)


def identity_rule(fn, x: torch.Tensor) -> torch.Tensor:
    return _IdentityRule.apply(fn, x)


# ----------------------------------------------------------------------------- rules as module overrides


def _rms_norm_forward(self, hidden_states):
    # Llama's RMSNorm with the rsqrt of the variance detached: the same values, relevance passes through
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon).detach()
    return self.weight * hidden_states.to(input_dtype)


def _layer_norm_forward(self, x):
    # nn.LayerNorm with the standard deviation detached (the centering is linear and keeps its gradient)
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + self.eps).detach()
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y


def _gated_mlp_attnlrp(self, x):
    gate = identity_rule(self.act_fn, self.gate_proj(x))
    return self.down_proj(scale_gradient(gate * self.up_proj(x), 0.5))


def _gated_mlp_cplrp(self, x):
    gate = self.act_fn(self.gate_proj(x).detach())
    return self.down_proj(gate * self.up_proj(x))


def _identity_rule_forward(original):
    def forward(self, x):
        return identity_rule(original, x)

    return forward


def _output_hook(transform):
    def hook(module, args, output):
        return transform(output)

    return hook


def _qkv_factors(rule: str) -> tuple[float | None, float]:
    """(query/key factor, value factor); a None query/key factor means detached (CP-LRP)."""
    return (0.25, 0.5) if rule == "attnlrp" else (None, 1.0)


def _split_qkv_hook(embed_dim: int, rule: str):
    """GPT-2's fused c_attn output [q | k | v] along the last dimension."""
    qk_factor, v_factor = _qkv_factors(rule)

    def transform(out):
        qk, v = out[..., : 2 * embed_dim], out[..., 2 * embed_dim :]
        qk = qk.detach() if qk_factor is None else scale_gradient(qk, qk_factor)
        return torch.cat([qk, scale_gradient(v, v_factor) if v_factor != 1.0 else v], dim=-1)

    return _output_hook(transform)


def _projection_hook(factor: float | None):
    if factor is None:
        return _output_hook(torch.Tensor.detach)
    if factor == 1.0:
        return None
    return _output_hook(lambda out: scale_gradient(out, factor))


# ---------------------------------------------------------------------------------------------- planning


def _family(model) -> str | None:
    return FAMILIES.get(getattr(model.config, "model_type", None))


def _is_container(module: nn.Module, prefix: str | None) -> bool:
    name = type(module).__name__
    return prefix is not None and name.startswith(prefix) and name.endswith(_CONTAINER_SUFFIXES)


def _plan(model, rule: str):
    """(forward overrides, forward hooks) for every module of `model`; raises on a module with no rule."""
    prefix = _family(model)
    overrides: list[tuple[nn.Module, object]] = []
    hooks: list[tuple[nn.Module, object]] = []
    covered: set[int] = set()
    qk_factor, v_factor = _qkv_factors(rule)

    for module in model.modules():
        name = type(module).__name__
        if prefix in LLAMA_FAMILY.values() and name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            overrides.append((module, _rms_norm_forward))
        elif type(module) is nn.LayerNorm:
            overrides.append((module, _layer_norm_forward))
        elif prefix in LLAMA_FAMILY.values() and all(
            hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")
        ):
            overrides.append((module, _gated_mlp_attnlrp if rule == "attnlrp" else _gated_mlp_cplrp))
            covered.add(id(module.act_fn))
        elif prefix in LLAMA_FAMILY.values() and all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj")):
            for proj, factor in ((module.q_proj, qk_factor), (module.k_proj, qk_factor), (module.v_proj, v_factor)):
                if (hook := _projection_hook(factor)) is not None:
                    hooks.append((proj, hook))
        elif name == "GPT2Attention" and not getattr(module, "is_cross_attention", False):
            hooks.append((module.c_attn, _split_qkv_hook(module.embed_dim, rule)))
        elif name == "BertSelfAttention":
            for proj, factor in ((module.query, qk_factor), (module.key, qk_factor), (module.value, v_factor)):
                if (hook := _projection_hook(factor)) is not None:
                    hooks.append((proj, hook))
        elif name == "GPT2MLP":
            overrides.append((module.act, _identity_rule_forward(module.act.forward)))
            covered.add(id(module.act))
        elif name == "BertIntermediate":
            act = module.intermediate_act_fn
            overrides.append((act, _identity_rule_forward(act.forward)))
            covered.add(id(act))
        elif name == "BertPooler":
            overrides.append((module.activation, _identity_rule_forward(module.activation.forward)))
            covered.add(id(module.activation))
        else:
            continue
        covered.add(id(module))

    missing = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if id(m) not in covered
            and not isinstance(m, _LINEAR_LEAVES)
            and type(m).__name__ != "Conv1D"  # GPT-2's linear layer
            and not _is_container(m, prefix)
        }
    )
    if missing:
        raise ValueError(
            f"LRP has no rule for module type(s) {missing} of this {getattr(model.config, 'model_type', '?')!r} "
            f"model; supported model types: {sorted(FAMILIES)}"
        )
    return overrides, hooks


def check_supported(model, rule: str = "attnlrp") -> None:
    """Raise a `ValueError` naming the module types without an LRP rule (nothing is installed)."""
    _plan(model, rule)


@contextmanager
def lrp_rules(model, rule: str | None = "attnlrp"):
    """Install the LRP backward rules on `model` for the duration of the block; always removed.
    `rule=None` installs nothing (plain gradient x input: the cost floor LRP is benchmarked against)."""
    if rule is None:
        yield model
        return
    if rule not in LRP_RULES:
        raise ValueError(f"rule must be one of {list(LRP_RULES)}, got {rule!r}")
    overrides, hooks = _plan(model, rule)
    handles = []
    patched = []
    try:
        for module, fn in overrides:
            module.forward = types.MethodType(fn, module)  # instance attribute: shadows the class's forward
            patched.append(module)
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward


# ------------------------------------------------------------------------------------------- computation


def gradient_times_input(embeds: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-token relevance: the sum over the embedding dimension of embedding * gradient (at least float32)."""
    return (upcast(embeds.detach()) * upcast(grad)).sum(-1)
