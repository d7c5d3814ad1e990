"""Token attributions for Hugging Face transformers.

    from engine import Explainer
    ex = Explainer.from_pretrained("smollm2")
    a = ex.attribute("The Eiffel Tower is located in the city of", method="rollout")

Importing `engine` never imports Triton and never touches CUDA.
"""

from ._kernels_check import check_kernels_package

check_kernels_package()  # before anything imports `kernels`: a clash gets a clear error, not a wrong module

from .explainer import Explainer  # noqa: E402
from .methods import available_methods  # noqa: E402
from .models import DEFAULT_MODEL, load_model  # noqa: E402
from .results import Attribution, AttributionFailure, Comparison, NonFiniteOutputError  # noqa: E402

__all__ = [
    "DEFAULT_MODEL",
    "Attribution",
    "AttributionFailure",
    "Comparison",
    "Explainer",
    "NonFiniteOutputError",
    "available_methods",
    "load_model",
    "run_corpus",
]


def run_corpus(*args, **kwargs):
    """`engine run` from Python: see `engine.corpus.run_corpus` (imported on first use: pyarrow)."""
    from .corpus import run_corpus as run

    return run(*args, **kwargs)
