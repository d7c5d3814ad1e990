"""Raw attention: one layer's attention, mean over heads, the row of the read position."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import check_int, normalize
from . import register
from ._base import Method
from ._text_batches import fused_attention_blocks, only_output, text_work


@dataclass(frozen=True)
class RawAttentionOptions:
    layer: int = -1  # which layer's attention (negative counts from the last); checked against the model

    def __post_init__(self):
        normalize(self, "layer", check_int("layer", self.layer))


def check_model(ctx, opts: RawAttentionOptions) -> None:
    if not -ctx.num_layers <= opts.layer < ctx.num_layers:
        raise ValueError(
            f"layer must be in [{-ctx.num_layers}, {ctx.num_layers - 1}] for this "
            f"{ctx.num_layers}-layer model, got {opts.layer}"
        )


def run_batch(ctx, inputs) -> list[dict]:
    batch = [p for p, _ in inputs]
    layer = inputs[0][1].layer % ctx.num_layers
    per_text, scored = fused_attention_blocks(ctx, batch, "mean", layers={layer})
    return [
        {"scores": block[p.read_pos].cpu().numpy(), **fields}
        for p, (block,), fields in zip(batch, per_text, scored, strict=True)
    ]


def expand(ctx, p, opts):
    return [text_work(ctx, p, run_batch, opts)]


def reference(model, tokenizer, text, *, target_id, read_pos, options: RawAttentionOptions):
    from ..reference import extract_raw_attention

    return extract_raw_attention(model, tokenizer, text, options.layer, read_pos)


register(
    Method(
        "raw_attention",
        RawAttentionOptions,
        expand,
        only_output,
        reference,
        order=0,
        scores_itself=True,
        check_model=check_model,
    )
)
