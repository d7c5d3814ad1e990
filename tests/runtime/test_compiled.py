"""`compile=True` across CPU capabilities: inductor's on-disk cache must not hand one ISA's code to another.

Inductor (torch 2.13) keys its FX graph cache without the vector ISA the C++ was generated for; a
graph compiled with AVX-512 vectors and then loaded under `ATEN_CPU_CAPABILITY=avx2` returned NaN and
wrong values until the engine put the width in the compile options (`engine/runtime/compiled.py`).
Each run is its own process (the capability is read at start-up), sharing one cache folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import assert_within_fp32_noise

# One tiny Llama forward three ways, in a process of its own: float64 eager, float32 eager, float32
# with the engine's compiled MLPs and norms. Prints the last position's logits of each, as JSON.
_FORWARD = """
import copy, json, torch
import engine
from engine.runtime.compiled import compiled_forwards
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
torch.set_num_threads(2)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
model = LlamaForCausalLM(config).eval()
exact_model = copy.deepcopy(model).double()
out = {}
with torch.no_grad():
    for n in (10, 37):
        ids = torch.randint(0, 64, (1, n))
        fp32 = model(ids).logits[0, -1]
        with compiled_forwards(model):
            compiled = model(ids).logits[0, -1]
        exact = exact_model(ids).logits[0, -1]
        out[n] = {k: v.tolist() for k, v in (("fp32", fp32), ("compiled", compiled), ("exact", exact))}
print(json.dumps(out))
"""


def _forward(cache_dir, capability: str | None) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    done = subprocess.run([sys.executable, "-c", _FORWARD], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_compiled_graph_cached_under_one_cpu_capability_is_right_under_another(tmp_path):
    """The machine's own ISA, AVX2, the own ISA again, then plain kernels, one cache folder: every run
    equals the float64 forward within the float32 eager forward's own noise. On a CPU whose widest ISA is
    AVX2 the first three pick the same width (no clash to catch there); on AVX-512 they differ."""
    for capability in (None, "avx2", None, "default"):
        for n, run in _forward(tmp_path, capability).items():
            what = f"compiled, ATEN_CPU_CAPABILITY={capability}, {n} tokens"
            assert_within_fp32_noise(run["compiled"], run["exact"], run["fp32"], what=what)
