"""Corpus jobs: a corpus streamed through the engine into resumable Parquet parts (`engine run`)."""

from .job import RunSummary, run_corpus
from .schema import SCHEMA, SCHEMA_VERSION
from .sources import open_corpus

__all__ = ["SCHEMA", "SCHEMA_VERSION", "RunSummary", "open_corpus", "run_corpus"]
