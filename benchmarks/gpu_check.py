"""One command for a GPU machine: the kernels on the device (not the interpreter), the engine's methods
on SmolLM2 on CUDA against the CPU, and the kernels timed against their torch paths with the memory
bandwidth they reach. Writes `OUT/gpu_check.json` and `OUT/gpu_check.md`.

    bash benchmarks/gpu_check.sh [OUT]        (default OUT: out/gpu_check)

Where no CUDA device is visible it says so, writes both files with `"cuda": false`, and exits 0
(`tests/test_gpu_check.py` runs it so). Each step is bounded to keep the whole under 8 minutes.
The CUDA path has not been run in this project yet (no GPU was lent to the session that wrote it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "raw_attention": {},
    "rollout": {},
    "grad_attention": {},
    "lrp": {},
    "integrated_gradients": {"n_steps": 16},
    "leave_one_out": {},
    "sliding_window": {},
    "shapley_sampling": {"n_samples": 4},
}


def kernel_tests() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, on the device
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "kernels"), "-q", "-p",
                           "no:cacheprovider"], env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": done.returncode, "summary": summary, "seconds": time.perf_counter() - start}


def methods_cuda_vs_cpu(prompts: list[str]) -> dict:
    import numpy as np

    from engine import Explainer

    cpu = Explainer.from_pretrained("smollm2", progress=False)
    gpu = Explainer.from_pretrained("smollm2", device="cuda", progress=False)
    out = {}
    for method, opts in METHODS.items():
        a, b = cpu.attribute(prompts, method, **opts), gpu.attribute(prompts, method, **opts)
        worst = max(
            float(np.abs(x.scores - y.scores).max() / max(np.abs(x.scores).max(), 1e-12))
            for x, y in zip(a, b, strict=True)
        )
        out[method] = {
            "max_relative_difference": worst,
            "same_targets": all(x.target_id == y.target_id for x, y in zip(a, b, strict=True)),
        }
    return out


def _time_cuda(fn, repeats: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def kernel_timings() -> dict:
    import torch

    from kernels.attention_probs import attention_probs_torch, attention_probs_triton
    from kernels.rollout import rollout_torch, rollout_triton

    out = {}
    batch, layers, heads, size = 32, 30, 9, 256
    gen = torch.Generator(device="cuda").manual_seed(0)
    causal = torch.ones(size, size, dtype=torch.bool, device="cuda").tril()
    attn = [torch.softmax(torch.randn(batch, heads, size, size, device="cuda", generator=gen)
                          .masked_fill(~causal, float("-inf")), -1) for _ in range(layers)]  # fmt: skip
    read = sum(a.numel() * a.element_size() for a in attn)
    for name, fn in {
        "rollout torch": lambda: rollout_torch(attn),
        "rollout triton": lambda: rollout_triton(attn),
    }.items():
        seconds = _time_cuda(fn)
        out[name] = {"seconds": seconds, "read_GB_per_s": read / seconds / 1e9}
    q = torch.randn(batch, heads, size, 64, device="cuda", generator=gen)
    k = torch.randn(batch, 3, size, 64, device="cuda", generator=gen)
    read = (q.numel() + k.numel()) * 4
    for name, fn in {
        "attention_probs torch": lambda: attention_probs_torch(q, k),
        "attention_probs triton": lambda: attention_probs_triton(q, k),
    }.items():
        seconds = _time_cuda(fn)
        out[name] = {"seconds": seconds, "read_GB_per_s": read / seconds / 1e9}
    out.update(cascade_timings())
    return out


def cascade_timings(budget: int = 32768) -> dict:
    """Cascade attention on one layer of a leave-one-out batch of the GPU's default budget (SmolLM2's
    heads), the Triton kernels against the torch path; bandwidth = queries, own and prefix K/V read once."""
    import torch
    from bench_cascade_attention import loo_batch

    from engine.runtime.cascade import cascade_intervals
    from engine.runtime.layout import CascadeLayout
    from kernels.cascade_attention import cascade_attention

    suffixes, lengths = loo_batch(budget)
    plan = CascadeLayout.of(suffixes)
    intervals = cascade_intervals(suffixes, plan, {"full_attention": None}, "cuda")[0]["full_attention"]
    n, p = plan.query_tokens, sum(plan.prefix_lengths.values())
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(9, n, 64, device="cuda", generator=gen)
    k, v = (torch.randn(3, n, 64, device="cuda", generator=gen) for _ in range(2))
    pk, pv = (torch.randn(3, p, 64, device="cuda", generator=gen) for _ in range(2))
    read = (q.numel() + 2 * k.numel() + 2 * pk.numel()) * 4
    out = {}
    with torch.no_grad():
        for backend in ("torch", "triton"):
            seconds = _time_cuda(lambda b=backend: cascade_attention(q, k, v, intervals, pk, pv, backend=b))
            out[f"cascade_attention {backend}"] = {"seconds": seconds, "read_GB_per_s": read / seconds / 1e9}
    return out


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device'] or 'no CUDA device'}", ""]
    if not report["cuda"]:
        return "\n".join(lines + ["No CUDA device was visible: nothing was checked.", ""])
    k = report["kernel_tests"]
    lines += [f"Kernel tests on the device: {k['summary']} (exit {k['returncode']}, {k['seconds']:.0f} s)", ""]
    lines += ["| method | max relative difference CUDA vs CPU | same targets |", "| --- | --- | --- |"]
    lines += [
        f"| {m} | {r['max_relative_difference']:.2e} | {r['same_targets']} |" for m, r in report["methods"].items()
    ]
    lines += ["", "| kernel | time | read bandwidth |", "| --- | --- | --- |"]
    lines += [
        f"| {n} | {r['seconds'] * 1e3:.2f} ms | {r['read_GB_per_s']:.0f} GB/s |" for n, r in report["kernels"].items()
    ]
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else ROOT / "out" / "gpu_check"
    out.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available()
    report = {"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else None}
    if cuda:
        sys.path.insert(0, str(Path(__file__).parent))
        from prompts import PROMPTS

        report["kernel_tests"] = kernel_tests()
        report["methods"] = methods_cuda_vs_cpu(PROMPTS[:6])
        report["kernels"] = kernel_timings()
    else:
        print("gpu_check: no CUDA device is visible here; nothing to check", file=sys.stderr)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", file=sys.stderr)
    failed = cuda and report["kernel_tests"]["returncode"] != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
