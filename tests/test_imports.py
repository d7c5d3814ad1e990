"""`import engine` and `import kernels` work without Triton and never touch CUDA."""

import subprocess
import sys

SCRIPT = r"""
import importlib.abc, sys

class BlockTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked for this test")

sys.meta_path.insert(0, BlockTriton())
import engine, kernels, torch
from engine import Explainer, available_methods
assert "triton" not in sys.modules, "importing the packages imported triton"
assert not torch.cuda.is_initialized(), "importing the packages initialized CUDA"
print("ok", len(available_methods()))
"""


def test_import_without_triton_and_cuda():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from engine import available_methods

    assert out.stdout.strip() == f"ok {len(available_methods())}"  # every registered method, found without triton
