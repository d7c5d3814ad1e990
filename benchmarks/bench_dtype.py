"""bfloat16 against float32 on SmolLM2: speed and error of each perturbation method, in one run.

    python -m pytest benchmarks/bench_dtype.py -s

Conditions: CPU, 2 threads, the 24 prompts, one timed call per dtype after a warm-up; IG with 8 steps.
Error: per prompt, max |bf16 - fp32| / max |fp32| of the scores; the median over prompts. Also the
share of prompts whose predicted target is the same, and the median Spearman rho between the two.
"""

import time

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from engine import Explainer, load_model


@pytest.fixture(scope="module")
def explainers(prompts, model_path):
    torch.set_num_threads(2)
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model, tok = load_model(model_path, dtype=dtype)
        ex = Explainer(model, tok, progress=False)
        ex.attribute(prompts[:3], "leave_one_out")
        out[name] = ex
    return out


@pytest.mark.parametrize(
    "method,opts", [("leave_one_out", {}), ("sliding_window", {}), ("integrated_gradients", {"n_steps": 8})]
)
def test_bfloat16_speed_and_error(explainers, prompts, method, opts):
    times, results = {}, {}
    for name, ex in explainers.items():
        start = time.perf_counter()
        results[name] = ex.attribute(prompts, method, **opts)
        times[name] = time.perf_counter() - start
    pairs = list(zip(results["float32"], results["bfloat16"], strict=True))
    rel = np.median([np.abs(a.scores - b.scores).max() / np.abs(a.scores).max() for a, b in pairs])
    same = np.mean([a.target_id == b.target_id for a, b in pairs])
    rho = np.median([spearmanr(a.scores, b.scores)[0] for a, b in pairs])
    print(
        f"\n{method}: fp32 {times['float32']:.2f} s, bf16 {times['bfloat16']:.2f} s "
        f"({times['float32'] / times['bfloat16']:.2f}x); median max-rel-error {rel:.3f}; "
        f"same target {same:.2f}; median Spearman {rho:.3f}"
    )
