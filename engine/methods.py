"""Method runners: a list of prepared texts in, one result dict per text out.

Each runner receives texts that the facade already validated and tokenized, with their target
resolved, and returns, per text, the fields of an `Attribution` it computes (scores, and matrix /
regions / completeness_gap where the method has them). The runners here call the reference one
text at a time; batched runners replace them method by method without changing this interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import reference as ref


@dataclass(frozen=True)
class PreparedText:
    index: int  # position in the caller's list
    text: str
    input_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    target_id: int  # token id (causal LM) or class index (classifier)
    target_prob: float
    read_pos: int  # the position whose output (causal LM) or whose attention row (classifier) is read


def run_raw_attention(model, tokenizer, texts, opts):
    return [{"scores": ref.extract_raw_attention(model, tokenizer, t.text, opts.layer, t.read_pos)} for t in texts]


def run_rollout(model, tokenizer, texts, opts):
    out = []
    for t in texts:
        row, matrix = ref.compute_rollout(
            model,
            tokenizer,
            t.text,
            opts.head_fusion,
            opts.discard_ratio,
            opts.causal_quantile,
            read_pos=t.read_pos,
            return_matrix=True,
        )
        out.append({"scores": row, "matrix": matrix})
    return out


def run_grad_attention(model, tokenizer, texts, opts):
    out = []
    for t in texts:
        matrix, _ = ref.gradient_weighted_attention(model, tokenizer, t.text, t.read_pos, t.target_id)
        out.append({"scores": matrix[t.read_pos], "matrix": matrix})
    return out


def run_integrated_gradients(model, tokenizer, texts, opts):
    out = []
    for t in texts:
        scores, _, gap = ref.integrated_gradients(
            model, tokenizer, t.text, opts.n_steps, opts.ig_method, opts.baseline, t.target_id
        )
        out.append({"scores": scores, "completeness_gap": gap})
    return out


def run_leave_one_out(model, tokenizer, texts, opts):
    return [{"scores": ref.leave_one_out_attribution(model, tokenizer, t.text, t.target_id)[0]} for t in texts]


def run_sliding_window(model, tokenizer, texts, opts):
    out = []
    for t in texts:
        regions = ref.sliding_window_occlusion(model, tokenizer, t.text, opts.window_size, t.target_id)
        out.append({"scores": ref.window_scores_per_token(regions, len(t.tokens)), "regions": regions})
    return out


RUNNERS = {
    "raw_attention": run_raw_attention,
    "rollout": run_rollout,
    "grad_attention": run_grad_attention,
    "integrated_gradients": run_integrated_gradients,
    "leave_one_out": run_leave_one_out,
    "sliding_window": run_sliding_window,
}


def as_float_array(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)
