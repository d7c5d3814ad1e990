"""What a method's batch function and reduce step may know about the model: a small frozen context
(instead of the whole Explainer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..models import CLASSIFIER


@dataclass(frozen=True)
class ModelContext:
    model: Any
    tokenizer: Any
    kind: str  # models.CAUSAL_LM or models.CLASSIFIER
    num_layers: int
    replacement_id: int  # the token an absent token is replaced by (the seed's pad id or 0)
    reads_first_token: bool  # a classifier that reads position 0 (BERT's [CLS]); else the last position
    prefix_reuse: bool  # causal-LM perturbations run over clean prefix caches (packed rows)
    row_capacity: int  # tokens per packed row
    cascade: bool  # packed suffixes and texts run on cascade attention (`runtime.cascade`), not dense rows
    compile: bool  # decoder layers' MLPs and norms run compiled (`runtime.compiled`)
    attention_maps: str  # "eager" or "recompute" (`runtime.attention_capture`)

    @property
    def packs_texts(self) -> bool:
        """Whole texts are packed end to end (causal LMs with packed rows); else equal lengths stack."""
        return self.kind != CLASSIFIER and self.prefix_reuse

    def read_pos(self, n_tokens: int) -> int:
        """The position whose output (causal LM) or attention row (classifier) a method reads."""
        return 0 if self.kind == CLASSIFIER and self.reads_first_token else n_tokens - 1
