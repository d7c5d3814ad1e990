"""The LRP oracle: explicit, layer-by-layer relevance propagation, one text at a time, in float64.

Written directly from the rules (Achtibat et al. 2024, Ali et al. 2022) rather than from gradients:
the forward pass is spelled out operation by operation from the model's weights, and relevance tensors
are pushed back through each operation with its rule:

- linear / affine maps y = f(x):            R_x = x * J_f^T (R_y / y)      (epsilon rule, eps -> 0)
- addition z = a + b (residuals, embeddings): R_a = a / z * R_z             (and the same for b)
- element-wise nonlinearity y = f(x):        R_x = R_y                       (identity rule)
- normalization with constant 1/std:        an affine map (the rule above)
- product of two activations z = a * b:      each term's relevance split evenly over its two factors
  (attention: scores = q k^T and output = probs v; the gated MLP's act(gate) * up)
- softmax p = softmax(s):                    R_s = s * (R_p - p * sum(R_p))  (AttnLRP, Prop. 3.1)
- CP-LRP: the attention probabilities and the MLP gate are constants, so their products are linear.

`J_f^T` is applied with a vector-Jacobian product of the (linear) map, which is exactly `W^T`. This is
slow (Python loops over layers and heads, float64) and is meant for tiny models in tests: the engine's
one-backward path (`engine.methods.lrp`) must equal it.
"""

from __future__ import annotations

import copy

import torch

from ..methods._lrp_rules import LRP_RULES


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b with 0 where b == 0 (float64: no stabilizer needed elsewhere)."""
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def linear_rule(f, x: torch.Tensor, r_y: torch.Tensor) -> torch.Tensor:
    """Relevance at the input of the affine map f (bias included in y = f(x))."""
    y, vjp = torch.func.vjp(f, x)
    (back,) = vjp(_div(r_y, y))
    return x * back


def add_rule(parts: list[torch.Tensor], r_sum: torch.Tensor) -> list[torch.Tensor]:
    total = sum(parts)
    return [p * _div(r_sum, total) for p in parts]


def softmax_rule(scores: torch.Tensor, probs: torch.Tensor, r_probs: torch.Tensor, allowed) -> torch.Tensor:
    scores = torch.where(allowed, scores, torch.zeros_like(scores))
    r = scores * (r_probs - probs * r_probs.sum(-1, keepdim=True))
    return torch.where(allowed, r, torch.zeros_like(r))


def bilinear_rule(a, b, out, r_out, equation_terms: str, share_a: float, share_b: float):
    """Relevance of both factors of out = einsum(equation, a, b): each term a_.. b_.. gets
    term / out * R_out, split `share_a` to a and `share_b` to b (1/2 each for the uniform rule)."""
    lhs, rhs = equation_terms.split("->")
    sa, sb = lhs.split(",")
    ratio = _div(r_out, out)
    r_a = share_a * a * torch.einsum(f"{sb},{rhs}->{sa}", b, ratio) if share_a else None
    r_b = share_b * b * torch.einsum(f"{sa},{rhs}->{sb}", a, ratio) if share_b else None
    return r_a, r_b


def _softmax_attention(q, k, v, scaling, allowed):
    """Per-head scores (H, n, n), probabilities and output (H, n, d) of softmax(q k^T * scaling) v."""
    scores = torch.einsum("hid,hjd->hij", q, k) * scaling
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return scores, probs, torch.einsum("hij,hjd->hid", probs, v)


def attention_rule(q, k, v, scaling, allowed, r_out, rule):
    """Relevance of per-head q (H, n, d), k (H, n, d), v (H, n, d) given R at probs @ v (H, n, d)."""
    scores, probs, out = _softmax_attention(q, k, v, scaling, allowed)
    if rule == "cplrp":  # probs are constants: out is linear in v
        _, r_v = bilinear_rule(probs, v, out, r_out, "hij,hjd->hid", 0.0, 1.0)
        return torch.zeros_like(q), torch.zeros_like(k), r_v
    r_probs, r_v = bilinear_rule(probs, v, out, r_out, "hij,hjd->hid", 0.5, 0.5)
    r_scores = softmax_rule(scores, probs, r_probs, allowed)
    r_q, r_k = bilinear_rule(q * scaling, k, scores, r_scores, "hid,hjd->hij", 0.5, 0.5)
    return r_q, r_k, r_v


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    n, width = x.shape
    return x.view(n, n_heads, width // n_heads).transpose(0, 1)


def _merge(x: torch.Tensor) -> torch.Tensor:
    h, n, d = x.shape
    return x.transpose(0, 1).reshape(n, h * d)


def _rms_affine(norm, x):
    """Llama RMSNorm as an affine map with its scale frozen at x."""
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return lambda z: norm.weight * (z * scale)


def _layer_norm_affine(norm, x):
    """LayerNorm as an affine map with its standard deviation frozen at x."""
    std = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return lambda z: (z - z.mean(-1, keepdim=True)) / std * norm.weight + norm.bias


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _lm_head_relevance(final_map, x, head_row):
    """Relevance at the final norm's input seeded from the target logit at the last position: the
    logit h[-1] . w splits over the hidden units as h[-1] * w, then passes the (affine) final norm."""
    h = final_map(x)
    r_h = torch.zeros_like(h)
    r_h[-1] = h[-1] * head_row
    return linear_rule(final_map, x, r_h), (h[-1] * head_row).sum()


# ----------------------------------------------------------------------------------------- the families


def _llama(model, ids, target, rule):
    cfg = model.config
    base = model.model
    n = ids.shape[0]
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    group = heads // kv_heads
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    # sliding-window layers (Mistral: all; Qwen2, Gemma: those `layer_types` names) see the last
    # `sliding_window` positions only, the query's own included, as transformers' masks
    window = getattr(cfg, "sliding_window", None)
    every = "sliding_attention" if window else "full_attention"
    kinds = getattr(cfg, "layer_types", None) or [every] * len(base.layers)
    if window:
        i = torch.arange(n)
        windowed = causal & (i[:, None] - i[None, :] < window)
    x = base.embed_tokens(ids)
    cos, sin = base.rotary_emb(x[None], torch.arange(n)[None])
    cos, sin = cos[0].to(x.dtype), sin[0].to(x.dtype)

    def rotary(z):  # (H, n, d), linear in z
        return z * cos + _rotate_half(z) * sin

    tape = []  # per layer: what the backward pass needs
    for layer, kind in zip(base.layers, kinds, strict=True):
        mask = windowed if kind == "sliding_attention" else causal
        att = layer.self_attn
        a_in_map = _rms_affine(layer.input_layernorm, x)
        a_in = a_in_map(x)
        q_lin = _heads(att.q_proj(a_in), heads)
        k_lin = _heads(att.k_proj(a_in), kv_heads)
        v_lin = _heads(att.v_proj(a_in), kv_heads)
        q, k = rotary(q_lin), rotary(k_lin)
        k_rep, v_rep = k.repeat_interleave(group, 0), v_lin.repeat_interleave(group, 0)
        o = _merge(_softmax_attention(q, k_rep, v_rep, att.scaling, mask)[2])
        attn = att.o_proj(o)
        x1 = x + attn
        mlp = layer.mlp
        m_in_map = _rms_affine(layer.post_attention_layernorm, x1)
        m_in = m_in_map(x1)
        gate, up = mlp.gate_proj(m_in), mlp.up_proj(m_in)
        act = mlp.act_fn(gate)
        prod = act * up
        down = mlp.down_proj(prod)
        x2 = x1 + down
        tape.append(locals().copy())
        x = x2

    r, logit = _lm_head_relevance(_rms_affine(base.norm, x), x, model.lm_head.weight[target])

    for t in reversed(tape):
        r_x1, r_down = add_rule([t["x1"], t["down"]], r)
        r_prod = linear_rule(t["mlp"].down_proj, t["prod"], r_down)
        if rule == "attnlrp":
            r_act, r_up = r_prod / 2, r_prod / 2
            r_gate = r_act  # identity rule
            r_m_in = linear_rule(t["mlp"].gate_proj, t["m_in"], r_gate) + linear_rule(t["mlp"].up_proj, t["m_in"], r_up)
        else:  # the gate is a constant: prod is linear in up
            r_m_in = linear_rule(t["mlp"].up_proj, t["m_in"], r_prod)
        r_x1 = r_x1 + linear_rule(t["m_in_map"], t["x1"], r_m_in)

        r_x, r_attn = add_rule([t["x"], t["attn"]], r_x1)
        att = t["att"]
        r_o = _heads(linear_rule(att.o_proj, t["o"], r_attn), heads)
        r_q, r_k_rep, r_v_rep = attention_rule(t["q"], t["k_rep"], t["v_rep"], att.scaling, t["mask"], r_o, rule)
        r_k = r_k_rep.view(kv_heads, group, n, -1).sum(1)
        r_v = r_v_rep.view(kv_heads, group, n, -1).sum(1)
        r_a_in = linear_rule(att.v_proj, t["a_in"], _merge(r_v))
        if rule == "attnlrp":
            r_q_lin = linear_rule(rotary, t["q_lin"], r_q)
            r_k_lin = linear_rule(rotary, t["k_lin"], r_k)
            r_a_in = r_a_in + linear_rule(att.q_proj, t["a_in"], _merge(r_q_lin))
            r_a_in = r_a_in + linear_rule(att.k_proj, t["a_in"], _merge(r_k_lin))
        r = r_x + linear_rule(t["a_in_map"], t["x"], r_a_in)
    return r.sum(-1), logit


def _gpt2(model, ids, target, rule):
    cfg = model.config
    if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn:
        raise ValueError("the GPT-2 oracle covers the default attention scaling only")
    base = model.transformer
    n = ids.shape[0]
    heads = cfg.n_head
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    tok, pos = base.wte(ids), base.wpe(torch.arange(n))
    x = tok + pos
    tape = []
    for block in base.h:
        att = block.attn
        ln1_map = _layer_norm_affine(block.ln_1, x)
        a_in = ln1_map(x)
        qkv = att.c_attn(a_in)
        e = att.embed_dim
        q, k, v = (_heads(qkv[:, i * e : (i + 1) * e], heads) for i in range(3))
        scaling = att.head_dim**-0.5
        o = _merge(_softmax_attention(q, k, v, scaling, causal)[2])
        attn = att.c_proj(o)
        x1 = x + attn
        ln2_map = _layer_norm_affine(block.ln_2, x1)
        m_in = ln2_map(x1)
        pre = block.mlp.c_fc(m_in)
        act = block.mlp.act(pre)
        down = block.mlp.c_proj(act)
        x2 = x1 + down
        tape.append(locals().copy())
        x = x2
    r, logit = _lm_head_relevance(_layer_norm_affine(base.ln_f, x), x, model.lm_head.weight[target])
    for t in reversed(tape):
        r_x1, r_down = add_rule([t["x1"], t["down"]], r)
        r_act = linear_rule(t["block"].mlp.c_proj, t["act"], r_down)
        r_m_in = linear_rule(t["block"].mlp.c_fc, t["m_in"], r_act)  # identity rule through the GELU
        r_x1 = r_x1 + linear_rule(t["ln2_map"], t["x1"], r_m_in)
        r_x, r_attn = add_rule([t["x"], t["attn"]], r_x1)
        att = t["att"]
        r_o = _heads(linear_rule(att.c_proj, t["o"], r_attn), heads)
        r_q, r_k, r_v = attention_rule(t["q"], t["k"], t["v"], t["scaling"], causal, r_o, rule)
        r_qkv = torch.cat([_merge(r_q), _merge(r_k), _merge(r_v)], dim=-1)
        r_a_in = linear_rule(att.c_attn, t["a_in"], r_qkv)
        r = r_x + linear_rule(t["ln1_map"], t["x"], r_a_in)
    r_tok, _ = add_rule([tok, pos], r)
    return r_tok.sum(-1), logit


def _bert(model, ids, target, rule):
    cfg = model.config
    bert = model.bert
    n = ids.shape[0]
    heads = cfg.num_attention_heads
    everyone = torch.ones(n, n, dtype=torch.bool)
    emb = bert.embeddings
    word = emb.word_embeddings(ids)
    rest = emb.position_embeddings(torch.arange(n)) + emb.token_type_embeddings(torch.zeros_like(ids))
    summed = word + rest
    emb_map = _layer_norm_affine(emb.LayerNorm, summed)
    x = emb_map(summed)
    tape = []
    for layer in bert.encoder.layer:
        sa = layer.attention.self
        q, k, v = (_heads(proj(x), heads) for proj in (sa.query, sa.key, sa.value))
        scaling = sa.attention_head_size**-0.5
        o = _merge(_softmax_attention(q, k, v, scaling, everyone)[2])
        dense = layer.attention.output.dense(o)
        s1 = dense + x
        ln1_map = _layer_norm_affine(layer.attention.output.LayerNorm, s1)
        x1 = ln1_map(s1)
        pre = layer.intermediate.dense(x1)
        act = layer.intermediate.intermediate_act_fn(pre)
        out = layer.output.dense(act)
        s2 = out + x1
        ln2_map = _layer_norm_affine(layer.output.LayerNorm, s2)
        x2 = ln2_map(s2)
        tape.append(locals().copy())
        x = x2
    pooled_pre = bert.pooler.dense(x[0])
    pooled = bert.pooler.activation(pooled_pre)
    logits = model.classifier(pooled)
    r_logits = torch.zeros_like(logits)
    r_logits[target] = logits[target]
    r_pooled = linear_rule(model.classifier, pooled, r_logits)
    r_first = linear_rule(bert.pooler.dense, x[0], r_pooled)  # identity rule through the tanh
    r = torch.zeros_like(x)
    r[0] = r_first
    for t in reversed(tape):
        r_s2 = linear_rule(t["ln2_map"], t["s2"], r)
        r_out, r_x1 = add_rule([t["out"], t["x1"]], r_s2)
        r_act = linear_rule(t["layer"].output.dense, t["act"], r_out)
        r_x1 = r_x1 + linear_rule(t["layer"].intermediate.dense, t["x1"], r_act)
        r_s1 = linear_rule(t["ln1_map"], t["s1"], r_x1)
        r_dense, r_x = add_rule([t["dense"], t["x"]], r_s1)
        r_o = _heads(linear_rule(t["layer"].attention.output.dense, t["o"], r_dense), heads)
        r_q, r_k, r_v = attention_rule(t["q"], t["k"], t["v"], t["scaling"], everyone, r_o, rule)
        sa = t["sa"]
        r_x = r_x + linear_rule(sa.value, t["x"], _merge(r_v))
        if rule == "attnlrp":
            r_x = r_x + linear_rule(sa.query, t["x"], _merge(r_q)) + linear_rule(sa.key, t["x"], _merge(r_k))
        r = r_x
    r_summed = linear_rule(emb_map, summed, r)
    r_word, _ = add_rule([word, rest], r_summed)
    return r_word.sum(-1), logits[target]


# Mistral and Qwen2 share Llama's layout (Qwen2 adds q/k/v biases, which the linear rule absorbs)
_ORACLES = {"llama": _llama, "mistral": _llama, "qwen2": _llama, "gpt2": _gpt2, "bert": _bert}


def lrp_reference(model, input_ids, target: int, rule: str = "attnlrp", dtype=torch.float64) -> tuple:
    """Per-token relevance (n,) and the target logit of one text, by explicit propagation in float64
    (`dtype=torch.float32` runs the same propagation in float32: the tests' measure of float32 noise).

    `model`: a tiny Llama causal LM, GPT-2 LM or BERT sequence classifier (eager attention, eval mode);
    `input_ids`: (n,) or (1, n); `target`: token id or class index. The last position is read for the
    causal LMs, the first ([CLS], through the pooler) for BERT.
    """
    if rule not in LRP_RULES:
        raise ValueError(f"rule must be one of {list(LRP_RULES)}, got {rule!r}")
    model_type = model.config.model_type
    if model_type not in _ORACLES:
        raise ValueError(f"the explicit LRP oracle covers {sorted(_ORACLES)}, not {model_type!r}")
    ids = torch.as_tensor(input_ids).reshape(-1).cpu()
    model64 = copy.deepcopy(model).cpu().to(dtype).eval()
    with torch.no_grad():
        relevance, logit = _ORACLES[model_type](model64, ids, int(target), rule)
    return relevance.numpy(), float(logit)
