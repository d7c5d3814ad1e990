"""How a text becomes tokens: the tokenizer's defaults, special tokens included (as the seed does).
Shared by the facade and the reference, so both attribute the same token sequence."""

from __future__ import annotations


def encode(tokenizer, text: str) -> tuple[dict, list[str]]:
    inputs = tokenizer(text, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    return dict(inputs), tokens
