"""Peak memory is set by the batch budget, not by the number of texts.

    python -m pytest benchmarks/bench_memory.py -s

Each measurement runs in a fresh process: load SmolLM2, warm up with leave-one-out over the whole
prompt set once, then leave-one-out over N texts (the prompt set cycled) with the default budget,
while a thread samples the resident set size every 5 ms. Reported: the peak RSS during the call minus
the RSS just before it. The warm-up matters: glibc keeps freed memory, so the first call that meets
the largest batch shape sets a high-water mark that later calls reuse (checked: three identical
100-text calls in one process peak at 1287, 1260 and 1260 MB); without it a 200-text run meets more
batch shapes than a 20-text one and shows that one-time rise (+271 MB against +186 MB).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys, threading, time, os
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(2)
from prompts import PROMPTS
from engine import Explainer

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

n = int(sys.argv[1])
texts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
ex = Explainer.from_pretrained("smollm2", progress=False)
ex.attribute(PROMPTS, "leave_one_out")  # warm-up over the whole set: every batch shape it produces
before, peak, done = rss(), [0], [False]
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
print(json.dumps({"texts": n, "peak_delta_mb": (peak[0] - before) / mb, "peak_mb": peak[0] / mb,
                  "before_mb": before / mb, "seconds": seconds}))
"""


def _measure(n: int) -> dict:
    here = Path(__file__).parent
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(n), str(here)], capture_output=True, text=True, timeout=1200
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.xfail(
    strict=False,
    reason="not met yet: +40 / +205 MB, later +66 / +94 and +74 / +150 MB (20 / 200 texts, after warm-up). "
    "Prefix caches are freed "
    "(at most one alive after any batch); growth fell from 27% to 16% with MALLOC_MMAP_THRESHOLD_=131072, "
    "which points at glibc heap fragmentation over a long call",
)
@pytest.mark.parametrize("small,large", [(20, 200)])
def test_peak_memory_does_not_grow_with_texts(small, large):
    a, b = _measure(small), _measure(large)
    print(
        f"\n{small} texts: +{a['peak_delta_mb']:.0f} MB in {a['seconds']:.1f} s; "
        f"{large} texts: +{b['peak_delta_mb']:.0f} MB in {b['seconds']:.1f} s"
    )
    assert b["peak_delta_mb"] <= 1.10 * a["peak_delta_mb"] + 16  # 16 MB: allocator and sampling noise
