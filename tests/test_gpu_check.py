"""`bash benchmarks/gpu_check.sh` starts anywhere: with no CUDA device visible it says so, writes its
JSON and markdown, and exits 0."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_without_a_device_exits_cleanly(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device, even on a GPU machine
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report == {"cuda": False, "device": None}
    assert "no CUDA device" in (tmp_path / "gpu_check.md").read_text()
