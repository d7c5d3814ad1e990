"""The specification's own code, verbatim but for formatting, used only to check `engine.reference`.

These are not implementations the project uses: they are the spec text, kept here so that a test can
show the oracle has the seed's semantics on inputs where the seed is well defined (no all-zero rows
after discarding, no ties in rankings). Source: shared/seed/explaining-transformers.txt.
"""

import numpy as np
import torch


def seed_attention_rollout(attentions, head_fusion="mean", discard_ratio=0.0):
    num_layers = len(attentions)
    seq_len = attentions[0].shape[-1]
    rollout = torch.eye(seq_len)
    for layer_idx in range(num_layers):
        attn = attentions[layer_idx].squeeze(0)
        if head_fusion == "mean":
            attn_fused = attn.mean(dim=0)
        elif head_fusion == "max":
            attn_fused = attn.max(dim=0).values
        elif head_fusion == "min":
            attn_fused = attn.min(dim=0).values
        if discard_ratio > 0:
            flat = attn_fused.flatten()
            threshold = flat.quantile(discard_ratio)
            attn_fused = attn_fused * (attn_fused >= threshold)
            attn_fused = attn_fused / attn_fused.sum(dim=-1, keepdim=True)
        attn_with_residual = 0.5 * attn_fused + 0.5 * torch.eye(seq_len)
        rollout = attn_with_residual @ rollout
    return rollout


def seed_gradient_weighted_attention(model, tokenizer, text, target_pos=-1):
    model.eval()
    inputs = tokenizer(text, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    outputs = model(**inputs, output_attentions=True)
    attentions = outputs.attentions
    logits = outputs.logits[0, target_pos]
    predicted_token_id = logits.argmax()
    target_logit = logits[predicted_token_id]
    grad_weighted = []
    for layer_attn in attentions:
        if layer_attn.requires_grad:
            grad = torch.autograd.grad(target_logit, layer_attn, retain_graph=True)[0]
            weighted = (layer_attn * grad).squeeze(0)
            weighted = weighted.mean(dim=0).detach()
            grad_weighted.append(weighted)
    all_layers = torch.stack(grad_weighted)
    combined = all_layers.mean(dim=0)
    return combined, tokens


def seed_leave_one_out_attribution(model, tokenizer, text):
    inputs = tokenizer(text, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    with torch.no_grad():
        baseline_logits = model(**inputs).logits[0, -1]
    baseline_probs = torch.softmax(baseline_logits, dim=-1)
    predicted_id = baseline_probs.argmax()
    baseline_prob = baseline_probs[predicted_id].item()
    attributions = []
    for i in range(len(tokens)):
        perturbed_ids = inputs["input_ids"].clone()
        perturbed_ids[0, i] = tokenizer.pad_token_id or 0
        with torch.no_grad():
            perturbed_logits = model(perturbed_ids).logits[0, -1]
        perturbed_prob = torch.softmax(perturbed_logits, dim=-1)[predicted_id].item()
        attribution = baseline_prob - perturbed_prob
        attributions.append(attribution)
    return np.array(attributions), tokens


def seed_sliding_window_occlusion(model, tokenizer, text, window_size=3):
    inputs = tokenizer(text, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    seq_len = len(tokens)
    with torch.no_grad():
        baseline_logits = model(**inputs).logits[0, -1]
    predicted_id = baseline_logits.argmax()
    baseline_score = baseline_logits[predicted_id].item()
    region_scores = []
    for start in range(seq_len - window_size + 1):
        perturbed_ids = inputs["input_ids"].clone()
        for j in range(start, start + window_size):
            perturbed_ids[0, j] = tokenizer.pad_token_id or 0
        with torch.no_grad():
            perturbed_logits = model(perturbed_ids).logits[0, -1]
        score = perturbed_logits[predicted_id].item()
        impact = baseline_score - score
        region_scores.append(
            {
                "start": start,
                "end": start + window_size,
                "tokens": tokens[start : start + window_size],
                "impact": impact,
            }
        )
    region_scores.sort(key=lambda x: x["impact"], reverse=True)
    return region_scores


def seed_evaluate_faithfulness(model, tokenizer, text, attributions, k_values=(1, 3, 5)):
    inputs = tokenizer(text, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    with torch.no_grad():
        baseline_logits = model(**inputs).logits[0, -1]
    predicted_id = baseline_logits.argmax()
    baseline_prob = torch.softmax(baseline_logits, dim=-1)[predicted_id].item()
    sorted_indices = np.argsort(attributions)[::-1]
    results = {}
    for k in k_values:
        top_k = sorted_indices[:k]
        sufficient_ids = inputs["input_ids"].clone()
        mask = torch.ones(len(tokens), dtype=torch.bool)
        mask[list(top_k)] = False
        sufficient_ids[0, mask] = tokenizer.pad_token_id or 0
        with torch.no_grad():
            suf_logits = model(sufficient_ids).logits[0, -1]
        suf_prob = torch.softmax(suf_logits, dim=-1)[predicted_id].item()
        sufficiency = suf_prob / baseline_prob
        comp_ids = inputs["input_ids"].clone()
        for idx in top_k:
            comp_ids[0, idx] = tokenizer.pad_token_id or 0
        with torch.no_grad():
            comp_logits = model(comp_ids).logits[0, -1]
        comp_prob = torch.softmax(comp_logits, dim=-1)[predicted_id].item()
        comprehensiveness = 1 - (comp_prob / baseline_prob)
        results[f"k={k}"] = {"sufficiency": sufficiency, "comprehensiveness": comprehensiveness}
    return results
