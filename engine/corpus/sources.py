"""A corpus read as a stream of records (id, text, target), never whole.

    .txt                 one text a line (a final newline ends the last line, it starts no text)
    .jsonl               one JSON object a line: "text", optional "id" and "target"
    .parquet / a folder  column "text", optional "id" and "target" (a folder: every .parquet in it)
    a saved HF dataset   a folder written by `datasets.Dataset.save_to_disk` (needs `datasets`)

Ids are strings: the given `id`, else the record's 0-based position in the input. `scan` reads the
input once before any work: it checks that it can be read, that ids are unique, and hashes the
records (the job's fingerprint includes it, so a changed input is not resumed into old output).
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Record:
    id: str
    text: object  # a str for any readable record; whatever the input held otherwise (its row fails)
    target: int | str | None = None


@dataclass(frozen=True)
class Scan:
    rows: int
    sha256: str


def open_corpus(path) -> Corpus:
    """The corpus at `path`, its format chosen by the suffix (or, for a folder, by what it holds)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such input: {path}")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return HFDatasetCorpus(path)
        if any(path.glob("*.parquet")):
            return ParquetCorpus(path)
        raise ValueError(f"{path} is a folder with no .parquet file and no saved dataset in it")
    readers = {".txt": TextCorpus, ".jsonl": JsonlCorpus, ".parquet": ParquetCorpus}
    if path.suffix not in readers:
        raise ValueError(f"{path}: unsupported input {path.suffix!r}; use .txt, .jsonl, .parquet or a folder of them")
    return readers[path.suffix](path)


class Corpus(abc.ABC):
    """One input format: `records` streams its records; `scan` is shared."""

    def __init__(self, path: Path):
        self.path = path

    @abc.abstractmethod
    def records(self) -> Iterator[Record]:
        """The records in input order, read as a stream."""

    def scan(self) -> Scan:
        """One pass over the input: readable, ids unique, the records hashed. Memory: the ids only."""
        seen: set[str] = set()
        digest = hashlib.sha256()
        rows = 0
        for record in self.records():
            if record.id in seen:
                raise ValueError(f"{self.path}: duplicate id {record.id!r}; ids must be unique")
            seen.add(record.id)
            digest.update(json.dumps([record.id, record.text, record.target], default=repr).encode())
            rows += 1
        if rows == 0:
            raise ValueError(f"{self.path}: the input holds no text")
        return Scan(rows, digest.hexdigest())


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:  # utf-8-sig: a byte-order mark is not part of the first text
        with open(path, encoding="utf-8-sig", newline="") as f:
            for number, line in enumerate(f):
                yield number, line.rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err})") from err


class TextCorpus(Corpus):
    def records(self) -> Iterator[Record]:
        for number, line in _decoded_lines(self.path):
            yield Record(str(number), line)


class JsonlCorpus(Corpus):
    def records(self) -> Iterator[Record]:
        position = 0
        for number, line in _decoded_lines(self.path):
            if not line.strip():
                continue  # blank lines separate nothing in JSON Lines
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}, line {number + 1}: not JSON ({err})") from err
            if not isinstance(obj, dict) or "text" not in obj:
                raise ValueError(f'{self.path}, line {number + 1}: expected an object with "text", got {line[:80]!r}')
            yield _record(obj.get("id"), position, obj["text"], obj.get("target"), f"{self.path}, line {number + 1}")
            position += 1


class ParquetCorpus(Corpus):
    def records(self) -> Iterator[Record]:
        import pyarrow.dataset as ds

        dataset = ds.dataset(self.path, format="parquet")
        names = dataset.schema.names
        if "text" not in names:
            raise ValueError(f"{self.path}: no column 'text' (columns: {names})")
        columns = [c for c in ("text", "id", "target") if c in names]
        position = 0
        for batch in dataset.to_batches(columns=columns, batch_size=PARQUET_BATCH_ROWS):
            data = batch.to_pydict()
            for i, text in enumerate(data["text"]):
                given = data["id"][i] if "id" in data else None
                target = data["target"][i] if "target" in data else None
                yield _record(given, position, text, target, f"{self.path}, row {position}")
                position += 1


class HFDatasetCorpus(Corpus):
    def records(self) -> Iterator[Record]:
        try:
            import datasets
        except ImportError as err:
            raise ImportError(
                f"{self.path} is a saved Hugging Face dataset: reading it needs `pip install datasets`"
            ) from err
        dataset = datasets.load_from_disk(str(self.path))
        if isinstance(dataset, datasets.DatasetDict):
            raise ValueError(f"{self.path} holds several splits {list(dataset)}: pass the folder of one")
        if "text" not in dataset.column_names:
            raise ValueError(f"{self.path}: no column 'text' (columns: {dataset.column_names})")
        for position, row in enumerate(dataset):
            yield _record(row.get("id"), position, row["text"], row.get("target"), f"{self.path}, row {position}")


def _record(given, position: int, text, target, where: str) -> Record:
    if given is not None and (isinstance(given, bool) or not isinstance(given, (str, int))):
        raise ValueError(f"{where}: id must be a string or an integer, got {given!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (str, int))):
        raise ValueError(f"{where}: target must be a token id, a token string or null, got {target!r}")
    return Record(str(given) if given is not None else str(position), text, target)
