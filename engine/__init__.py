"""Token attributions for Hugging Face transformers.

    from engine import Explainer
    ex = Explainer.from_pretrained("smollm2")
    a = ex.attribute("The Eiffel Tower is located in the city of", method="rollout")

Importing `engine` never imports Triton and never touches CUDA.
"""

from .explainer import Explainer
from .models import DEFAULT_MODEL, load_model
from .options import available_methods
from .results import Attribution, AttributionFailure, Comparison

__all__ = [
    "DEFAULT_MODEL",
    "Attribution",
    "AttributionFailure",
    "Comparison",
    "Explainer",
    "available_methods",
    "load_model",
]
