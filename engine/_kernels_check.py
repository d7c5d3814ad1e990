"""This project's kernels live in a top-level package named `kernels`; Hugging Face publishes an
unrelated PyPI distribution with the same import name (recent transformers use it for hub kernels).
Whichever comes first on `sys.path` wins, so with both installed `import kernels` may find theirs.
The engine checks which one Python would import, before anything imports it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_OURS = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
_MARKER = "ATTRIBUTION_ENGINE_KERNELS"


def check_kernels_package() -> None:
    """Raise ImportError unless `import kernels` gives this project's package (the sibling of
    `engine`, which marks itself with `ATTRIBUTION_ENGINE_KERNELS`)."""
    loaded = sys.modules.get("kernels")
    if loaded is not None:
        if getattr(loaded, _MARKER, False):
            return
        origin = getattr(loaded, "__file__", None)
    else:
        spec = importlib.util.find_spec("kernels")
        origin = spec.origin if spec is not None else None
        # the path alone is not proof: a non-editable install puts both distributions' `kernels` files
        # into one site-packages folder, where the one installed last overwrites the other's
        if origin is not None and Path(origin).resolve() == _OURS and _MARKER in _OURS.read_text("utf-8"):
            return
    raise ImportError(
        f"`import kernels` finds {origin or 'no package'}, not this project's {_OURS}: another package named "
        "`kernels` (most likely Hugging Face's `kernels` distribution) comes first on sys.path. Uninstall it "
        "(pip uninstall kernels), or install this project into its own virtual environment "
        "(pip install -e . from the repository), so that its `kernels` package is the one imported."
    )
