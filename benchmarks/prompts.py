"""The fixed benchmark prompt set: 24 prompts of 8 to 60 SmolLM2 tokens, one per line of `prompts.txt`
(the same file `engine evaluate benchmarks/prompts.txt` reads)."""

from pathlib import Path

PROMPTS = [line for line in (Path(__file__).with_name("prompts.txt")).read_text(encoding="utf-8").splitlines() if line]
