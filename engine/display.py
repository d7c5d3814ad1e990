"""Tokens as a reader sees them, for tables and reports (JSON and the API keep the raw tokens).

Byte-level BPE vocabularies (GPT-2, SmolLM2, Llama 3) store a leading space as `Ġ` and a newline as
`Ċ`; SentencePiece stores a word start as `▁`. A reader expects the text, with the space visible (as
inseq's and Captum's visualizations show it): " of" is shown as "␣of", a newline as "\\n".
"""

from __future__ import annotations

SPACE_MARK = "␣"
_WORD_START = "▁"  # SentencePiece
_BYTE_LEVEL = {"Ġ": " ", "Ċ": "\n", "ĉ": "\t"}  # the common bytes of GPT-2's byte-to-unicode table


def display_token(token: str, tokenizer=None) -> str:
    """`token` as text: decoded by `tokenizer` when given (any byte-level or WordPiece vocabulary),
    else by the common marks; a leading space shown as SPACE_MARK, newlines and tabs escaped. Of a token
    that is a piece of a multi-byte character (it decodes to U+FFFD) only the marks are decoded."""
    if token.startswith(_WORD_START):
        text = " " + token[len(_WORD_START) :]
    elif tokenizer is not None:
        text = tokenizer.convert_tokens_to_string([token])
        if "\ufffd" in text:  # a piece of a multi-byte character: only its marks are decoded
            text = "".join(_BYTE_LEVEL.get(c, c) for c in token)
    else:
        text = "".join(_BYTE_LEVEL.get(c, c) for c in token)
    if not text:
        return token
    if text.startswith(" "):
        text = SPACE_MARK + text[1:]
    return text.replace("\n", "\\n").replace("\t", "\\t")


def display_tokens(tokens, tokenizer=None) -> list[str]:
    return [display_token(t, tokenizer) for t in tokens]
