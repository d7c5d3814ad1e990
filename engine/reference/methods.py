"""Reference implementations: the oracle every engine path and test is compared against.

Plain, one text at a time, in the model's precision (float32, or float64 for a float64 copy of a model,
which is how the tests measure float32 rounding), with the semantics of the specification
(`shared/seed/explaining-transformers.txt`). Where the seed calls a helper it never defines, the
helper is defined here; where the seed is ambiguous or breaks, the choice is written at the function.
Nothing here is fast on purpose: the batched engine must equal these functions, not replace them.

Conventions shared by every function:
- `text` is tokenized with the tokenizer's defaults (special tokens included, as the seed does).
- The "scored output" is the logit vector at the last position for a causal LM (`logits[0, -1]`)
  and the class-logit vector for a sequence classifier (`logits[0]`).
- `target_id=None` means the argmax of the scored output on the unperturbed text (the seed's
  predicted token or class); an int overrides it.
- The replacement token is the seed's `tokenizer.pad_token_id or 0`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# HEAD_FUSIONS, discard_threshold, IG_BASELINES, IG_METHODS, window_scores_per_token: re-exported for
# the tests (`from engine import reference as ref`), the oracle's vocabulary in one place
from kernels.common import (  # noqa: F401
    HEAD_FUSIONS,
    discard_low_attention,
    discard_threshold,
    fuse_heads,
    upcast,
    with_residual,
)

from ..encoding import encode
from ..methods.integrated_gradients import (  # noqa: F401
    IG_BASELINES,
    IG_METHODS,
    baseline_embeddings,
    contributions,
    ig_steps,
)
from ..methods.sliding_window import window_scores_per_token  # noqa: F401
from ..metrics import comprehensiveness, min_max_normalize, rank_tokens, spearman, sufficiency, top_k_indices
from ..models import eager_attention, replacement_id

# the primitives (head fusion, discard, residual, IG steps and baseline, window scores, faithfulness
# ratios) are stated once, in `kernels.common`, `engine.metrics` and the method files, and composed here


# --------------------------------------------------------------------------------------------- helpers


def scored_logits_batch(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) rows the methods score: last position of a causal LM, the classes of a classifier."""
    return logits[:, -1] if logits.dim() == 3 else logits


def scored_logits(logits: torch.Tensor) -> torch.Tensor:
    """The scored output vector of a batch of one."""
    return scored_logits_batch(logits)[0]


def _model_inputs(model, inputs: dict) -> dict:
    return {k: v.to(model.device) for k, v in inputs.items()}


def _predicted(logits_vec: torch.Tensor, target_id: int | None) -> int:
    return int(logits_vec.argmax()) if target_id is None else int(target_id)


def _forward_ids(model, ids: torch.Tensor) -> torch.Tensor:
    """The seed's perturbed forward: ids only, no attention mask (one unpadded text)."""
    with torch.no_grad():
        return upcast(scored_logits(model(ids.to(model.device)).logits))


def get_prediction(model, tokenizer, text: str) -> str:
    """The decoded argmax of the scored output (the predicted next token, or the class label)."""
    inputs, _ = encode(tokenizer, text)
    with torch.no_grad():
        logits = scored_logits(model(**_model_inputs(model, inputs)).logits)
    idx = int(logits.argmax())
    if logits.shape[-1] == getattr(model.config, "vocab_size", None):
        return tokenizer.decode([idx])
    return model.config.id2label.get(idx, str(idx))


# ------------------------------------------------------------------------------------ attention rollout


def attention_rollout(
    attentions,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    causal_quantile: bool = False,
) -> torch.Tensor:
    """The seed's attention rollout over a sequence of (1, heads, S, S) tensors -> (S, S).

    Per layer: fuse heads; optionally discard (`discard_low_attention`); `0.5*A + 0.5*I`;
    `rollout = A' @ rollout`, starting from the identity.
    """
    seq_len = attentions[0].shape[-1]
    dtype, device = attentions[0].dtype, attentions[0].device
    eye = torch.eye(seq_len, dtype=dtype, device=device)
    rollout = eye.clone()
    for layer_attn in attentions:
        fused = fuse_heads(layer_attn.squeeze(0), head_fusion)
        fused = discard_low_attention(fused, discard_ratio, causal_quantile)
        rollout = with_residual(fused, eye) @ rollout
    return rollout


def _attentions(model, tokenizer, text: str):
    inputs, tokens = encode(tokenizer, text)
    with eager_attention(model), torch.no_grad():
        outputs = model(**_model_inputs(model, inputs), output_attentions=True)
    return [upcast(a) for a in outputs.attentions], tokens


def extract_raw_attention(model, tokenizer, text: str, layer: int = -1, read_pos: int = -1) -> np.ndarray:
    """One layer's attention, mean over heads, row of `read_pos` (default: the last position)."""
    attentions, _ = _attentions(model, tokenizer, text)
    return attentions[layer][0].mean(dim=0)[read_pos].cpu().numpy()


def compute_rollout(
    model,
    tokenizer,
    text: str,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    causal_quantile: bool = False,
    read_pos: int = -1,
    return_matrix: bool = False,
):
    """Row `read_pos` of `attention_rollout` (with `return_matrix`, also the full (S, S) matrix)."""
    attentions, _ = _attentions(model, tokenizer, text)
    matrix = attention_rollout(attentions, head_fusion, discard_ratio, causal_quantile).cpu().numpy()
    return (matrix[read_pos], matrix) if return_matrix else matrix[read_pos]


# --------------------------------------------------------------------------- gradient-weighted attention


def gradient_weighted_attention(model, tokenizer, text: str, target_pos: int = -1, target_id: int | None = None):
    """The seed's Attention x Gradient -> ((S, S) matrix, tokens).

    Gradient of the target logit (at `target_pos` for a causal LM) with respect to each layer's
    attention probabilities, times the attention, mean over heads, mean over layers. The per-token
    vector is the row of `target_pos`. The forward takes `inputs_embeds` that require grad, so the
    attention probabilities are in the graph even when the weights are frozen.
    """
    inputs, tokens = encode(tokenizer, text)
    inputs = _model_inputs(model, inputs)
    ids = inputs.pop("input_ids")
    with eager_attention(model), torch.enable_grad():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        outputs = model(inputs_embeds=embeds, **inputs, output_attentions=True)
        logits = outputs.logits[0, target_pos] if outputs.logits.dim() == 3 else outputs.logits[0]
        target_logit = logits[_predicted(logits, target_id)]
        grads = torch.autograd.grad(target_logit, outputs.attentions)
    weighted = [upcast((a * g).squeeze(0).mean(dim=0).detach()) for a, g in zip(outputs.attentions, grads, strict=True)]
    return torch.stack(weighted).mean(dim=0).cpu().numpy(), tokens


# ----------------------------------------------------------------------------------- perturbation


def leave_one_out_attribution(model, tokenizer, text: str, target_id: int | None = None):
    """The seed's leave-one-out -> (scores, tokens).

    Token i replaced by the replacement token; score = baseline probability of the target minus the
    perturbed probability, at the scored position. Every position is perturbed, the last one included.
    """
    inputs, tokens = encode(tokenizer, text)
    with torch.no_grad():
        baseline_probs = torch.softmax(upcast(scored_logits(model(**_model_inputs(model, inputs)).logits)), -1)
    predicted_id = _predicted(baseline_probs, target_id)
    baseline_prob = baseline_probs[predicted_id].item()
    fill = replacement_id(tokenizer)
    scores = []
    for i in range(len(tokens)):
        perturbed = inputs["input_ids"].clone()
        perturbed[0, i] = fill
        prob = torch.softmax(_forward_ids(model, perturbed), -1)[predicted_id].item()
        scores.append(baseline_prob - prob)
    return np.array(scores), tokens


def sliding_window_occlusion(model, tokenizer, text: str, window_size: int = 3, target_id: int | None = None):
    """The seed's sliding-window occlusion -> regions sorted by impact, descending.

    Each region: start, end, tokens, impact = target logit (baseline) - target logit (window replaced).
    The sort is stable, so regions of equal impact stay in order of position.
    """
    inputs, tokens = encode(tokenizer, text)
    seq_len = len(tokens)
    with torch.no_grad():
        baseline_logits = upcast(scored_logits(model(**_model_inputs(model, inputs)).logits))
    predicted_id = _predicted(baseline_logits, target_id)
    baseline_score = baseline_logits[predicted_id].item()
    fill = replacement_id(tokenizer)
    regions = []
    for start in range(seq_len - window_size + 1):
        perturbed = inputs["input_ids"].clone()
        perturbed[0, start : start + window_size] = fill
        score = _forward_ids(model, perturbed)[predicted_id].item()
        regions.append(
            {
                "start": start,
                "end": start + window_size,
                "tokens": tokens[start : start + window_size],
                "impact": baseline_score - score,
            }
        )
    regions.sort(key=lambda r: r["impact"], reverse=True)
    return regions


def integrated_gradients(
    model,
    tokenizer,
    text: str,
    n_steps: int = 50,
    method: str = "gausslegendre",
    baseline: str = "replacement",
    target_id: int | None = None,
):
    """Integrated gradients on the input embeddings -> (scores, tokens, completeness_gap).

    Target: the target logit of the scored output. Per-token score: sum over the embedding dimension
    of (x - baseline) * sum_k w_k * grad f(baseline + alpha_k (x - baseline)). One step per forward.
    completeness_gap = sum(scores) - (f(x) - f(baseline)): how far the step rule is from the integral.
    """
    inputs, tokens = encode(tokenizer, text)
    ids = inputs["input_ids"].to(model.device)
    alphas, weights = ig_steps(n_steps, method)
    with torch.no_grad():
        x = model.get_input_embeddings()(ids)
        base = baseline_embeddings(model, ids, baseline, replacement_id(tokenizer))
        f_x = upcast(scored_logits(model(inputs_embeds=x).logits))
        predicted_id = _predicted(f_x, target_id)
        f_base = upcast(scored_logits(model(inputs_embeds=base).logits))[predicted_id].item()
    total = torch.zeros_like(upcast(x))
    for alpha, weight in zip(alphas, weights, strict=True):
        point = (base + alpha * (x - base)).detach().requires_grad_(True)
        with torch.enable_grad():
            out = scored_logits(model(inputs_embeds=point).logits)[predicted_id]
            (grad,) = torch.autograd.grad(out, point)
        total += weight * upcast(grad)
    scores = contributions(total, x, base)[0].cpu().numpy()
    gap = float(scores.sum() - (f_x[predicted_id].item() - f_base))
    return scores.astype(np.float64), tokens, gap


# ------------------------------------------------------------------------------- evaluation, comparison


def evaluate_faithfulness(model, tokenizer, text: str, attributions, k_values=(1, 3, 5), target_id: int | None = None):
    """The seed's sufficiency and comprehensiveness at each k.

    sufficiency = p(target | only the top-k tokens kept, the rest replaced) / p(target);
    comprehensiveness = 1 - p(target | top-k replaced) / p(target). Ranking: `rank_tokens`
    (descending score, ties broken by position, which the seed's argsort leaves undefined).
    """
    inputs, tokens = encode(tokenizer, text)
    with torch.no_grad():
        baseline_logits = upcast(scored_logits(model(**_model_inputs(model, inputs)).logits))
    predicted_id = _predicted(baseline_logits, target_id)
    baseline_prob = torch.softmax(baseline_logits, -1)[predicted_id].item()
    order = rank_tokens(np.asarray(attributions))
    fill = replacement_id(tokenizer)
    results = {}
    for k in k_values:
        top_k = list(order[:k])
        keep = torch.ones(len(tokens), dtype=torch.bool)
        keep[top_k] = False
        sufficient = inputs["input_ids"].clone()
        sufficient[0, keep] = fill
        suf_prob = torch.softmax(_forward_ids(model, sufficient), -1)[predicted_id].item()
        comp = inputs["input_ids"].clone()
        comp[0, top_k] = fill
        comp_prob = torch.softmax(_forward_ids(model, comp), -1)[predicted_id].item()
        results[f"k={k}"] = {
            "sufficiency": sufficiency(suf_prob, baseline_prob),
            "comprehensiveness": comprehensiveness(comp_prob, baseline_prob),
        }
    return results


def compare_attribution_methods(
    model,
    tokenizer,
    text: str,
    methods: dict[str, Callable],
    top_k: int = 3,
    verbose: bool = True,
) -> dict[str, np.ndarray]:
    """The seed's comparison: min-max normalized scores per method, Spearman per pair, top-3 per method.

    Returns the normalized scores; with `verbose` prints the seed's report.
    """
    _, tokens = encode(tokenizer, text)
    results = {name: min_max_normalize(np.asarray(fn(model, tokenizer, text))) for name, fn in methods.items()}
    if verbose:
        names = list(results)
        print(f"Attribution comparison for: '{text}'")
        print(f"Predicted next token: {get_prediction(model, tokenizer, text)}")
        print()
        print("Spearman rank correlations:")
        for i, name_a in enumerate(names):
            for name_b in names[i + 1 :]:
                rho, p = spearman(results[name_a], results[name_b])
                print(f"  {name_a} vs {name_b}: rho={rho:.3f} (p={p:.3f})")
        print(f"\nTop-{top_k} most important tokens per method:")
        for name, attrs in results.items():
            top = ", ".join(f"'{tokens[i]}' ({attrs[i]:.2f})" for i in top_k_indices(attrs, top_k))
            print(f"  {name:20s}: {top}")
    return results
