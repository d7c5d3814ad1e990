"""Peak memory is set by the batch budget, not by the number of texts.

    python -m pytest benchmarks/bench_memory.py -s

Each measurement runs in a fresh process: load SmolLM2, warm up with leave-one-out over the whole
prompt set once, then leave-one-out over N texts (the prompt set cycled) with the default budget,
while a thread samples the resident set size every 5 ms. Reported: the peak RSS during the call minus
the RSS just before it, and its two parts: the most any one batch added above the RSS at its start
(the batch's working memory, set by the budget) and the highest RSS between batches (what the call
keeps: prefix caches in flight, results, allocator drift).

Two allocator settings, because RSS measures the allocator as much as the engine:
- "mmap": `MALLOC_MMAP_THRESHOLD_=131072`. glibc serves every tensor over 128 KiB with its own mmap
  and unmaps it when freed, so RSS follows the memory that is live, and a batch's working memory
  can be read off. It costs speed (every large tensor is page-faulted afresh, 200 texts 82 s
  instead of 56 s): do not run corpora like this.
- "glibc": the default. glibc raises its mmap threshold as large blocks are freed, then serves
  tensors from its heap and keeps freed memory; over a long call of many batch shapes the heap
  fragments and RSS drifts up by tens to a couple of hundred MB over the RSS before the call.

Asserted: the process's peak RSS for 200 texts within 10% of that for 20 (the issue's check), and
with "mmap" the largest working memory of one batch within 10% (+16 MB of sampling noise). The
increment over the RSS before the call is printed, not asserted: it is 120-180 MB, and it grows
with the number of batches by allocator drift, not by anything the engine keeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scaled

SCRIPT = r"""
import json, sys, threading, time, os
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(2)
from prompts import PROMPTS
from engine import Explainer
from engine.runtime.runner import ModelRunner

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

n = int(sys.argv[1])
texts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
ex = Explainer.from_pretrained(sys.argv[3], progress=False)
ex.attribute(PROMPTS, "leave_one_out")  # warm-up over the whole set: every batch shape it produces
before, peak, done = rss(), [0], [False]
batch_peak, batch_start, overall = [0], [0], [0]  # the most one batch adds; RSS between batches; peak
execute = ModelRunner.execute
def timed_execute(self, batch, caches):
    start_rss = rss()
    batch_start[0] = max(batch_start[0], start_rss)
    overall[0] = max(overall[0], peak[0])
    peak[0] = start_rss  # the sampler now follows this batch
    out = execute(self, batch, caches)
    batch_peak[0] = max(batch_peak[0], peak[0] - start_rss)
    return out
ModelRunner.execute = timed_execute
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)
t = threading.Thread(target=sample); t.start()
start = time.perf_counter()
ex.attribute(texts, "leave_one_out")
seconds = time.perf_counter() - start
done[0] = True; t.join()
mb = 2**20
top = max(overall[0], peak[0])
print(json.dumps({"texts": n, "peak_mb": top / mb, "peak_delta_mb": (top - before) / mb,
                  "batch_peak_mb": batch_peak[0] / mb, "between_batches_mb": (batch_start[0] - before) / mb,
                  "before_mb": before / mb, "seconds": seconds}))
"""


ALLOCATORS = {"mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "glibc": {}}


def _measure(n: int, allocator: str, model: str) -> dict:
    here = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | ALLOCATORS[allocator]
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(n), str(here), model], capture_output=True, text=True, timeout=1200, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("allocator", list(ALLOCATORS))
@pytest.mark.parametrize("small,large", [scaled((20, 200), (20, 60))])  # 20 texts fill the budget's batches
def test_peak_memory_does_not_grow_with_texts(small, large, allocator, model_path):
    a, b = _measure(small, allocator, model_path), _measure(large, allocator, model_path)
    for r in (a, b):
        print(
            f"\n[{allocator}] {r['texts']} texts: peak {r['peak_mb']:.0f} MB, +{r['peak_delta_mb']:.0f} MB over the "
            f"RSS before the call = one batch +{r['batch_peak_mb']:.0f} MB over between-batch "
            f"+{r['between_batches_mb']:.0f} MB, in {r['seconds']:.1f} s"
        )
    # the check: the process's peak for 200 texts within 10% of that for 20
    assert b["peak_mb"] <= 1.10 * a["peak_mb"]
    if allocator == "mmap":  # RSS follows live memory: a batch's working memory is set by the budget
        assert b["batch_peak_mb"] <= 1.10 * a["batch_peak_mb"] + 16  # 16 MB: allocator and sampling noise
