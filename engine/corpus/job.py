"""`engine run`: a corpus attributed to Parquet parts, streaming, resumable, on one machine.

The input is read as a stream and cut into chunks of `chunk_texts` records in input order; chunk k
becomes `part-k.parquet` (its rows: every record of the chunk with every method, in that order),
written under a temporary name and renamed into place, then listed in the manifest. A resumed job
skips the chunks the manifest lists and recomputes any other, so after any crash the finished output
holds every (id, method) exactly once and equals an uninterrupted run. Two chunks are in flight at
once, so the engine loop is never idle while a part is written.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from . import manifest as manifests
from .schema import SCHEMA_VERSION, row, table
from .sources import Record, open_corpus

PART = "part-{:05d}.parquet"
IN_FLIGHT_CHUNKS = 2


@dataclass
class RunSummary:
    out: str
    texts: int  # records in the input
    rows: int  # (id, method) rows in the output
    failures: int  # rows with an error
    computed_texts: int  # records attributed by this run (the rest were committed by an earlier one)
    seconds: float
    tokens: int  # tokens of the texts this run attributed (once per text, not per method)

    @property
    def texts_per_s(self) -> float:
        return self.computed_texts / self.seconds if self.seconds else float("nan")

    def __str__(self) -> str:
        return (
            f"{self.texts} texts, {self.rows} rows ({self.failures} failed) in {self.out}; this run: "
            f"{self.computed_texts} texts in {self.seconds:.1f} s ({self.texts_per_s:.2f} texts/s, "
            f"{self.tokens / self.seconds if self.seconds else float('nan'):.0f} tokens/s)"
        )


def check_job(methods, options, chunk_texts) -> tuple[list[str], dict]:
    """The methods and options checked whole (names, option names and values) before any work."""
    from ..methods import available_methods, make_options
    from ..options import check_method_options

    if isinstance(methods, str):
        methods = [m for m in methods.split(",") if m]
    methods = list(methods)
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {available_methods()}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods repeat: {methods}")
    options = dict(options or {})
    if not all(isinstance(o, dict) for o in options.values()):
        raise TypeError('options must map each method to its options, e.g. {"sliding_window": {"window_size": 2}}')
    check_method_options(methods, options, "run")
    for m in methods:
        make_options(m, **options.get(m, {}))
    if isinstance(chunk_texts, bool) or not isinstance(chunk_texts, int) or chunk_texts < 1:
        raise ValueError(f"chunk_texts must be an int >= 1, got {chunk_texts!r}")
    return methods, options


def prepare_out(out: Path, fingerprint: dict, overwrite: bool) -> set[str]:
    """The output folder made ready: -> the names of its committed parts (none for a new job).
    Refuses a folder of another job (another fingerprint) or of something else, unless `overwrite`."""
    out.mkdir(parents=True, exist_ok=True)
    old = manifests.read(out)
    if overwrite:
        for path in out.iterdir():
            if path.name.startswith(("part-", ".part-")) or path.name in (
                manifests.MANIFEST,
                f".{manifests.MANIFEST}.tmp",
            ):
                path.unlink() if path.is_file() else shutil.rmtree(path)
        old = None
    elif old is None and any(p.name.startswith("part-") for p in out.iterdir()):
        raise ValueError(
            f"{out} holds part files but no {manifests.MANIFEST}: not this job's; use --overwrite to start over"
        )
    elif old is not None and old.get("fingerprint") != fingerprint:
        changed = "; ".join(manifests.differences(old.get("fingerprint") or {}, fingerprint))
        raise ValueError(f"{out} holds the output of another job ({changed}); use --overwrite to start over")
    committed = set(old["parts"]) if old else set()
    for path in out.iterdir():  # a crash's leftovers: temporary files, parts written but not committed
        if path.name.startswith(".part-") or (path.name.startswith("part-") and path.name not in committed):
            path.unlink()
    if old is None:
        manifests.write(
            out, {"fingerprint": fingerprint, "schema_version": SCHEMA_VERSION, "parts": {}, "complete": False}
        )
    return committed


def attribute_chunk(ex, records: list[Record], methods: list[str], options: dict) -> tuple[list[dict], int]:
    """Every record with every method -> (rows in record order, method order within; tokens attributed).
    Records with equal targets share one call per method; a record that fails has its error row."""
    by_target: dict = defaultdict(list)
    for i, r in enumerate(records):
        by_target[r.target].append(i)
    results: dict[tuple[int, str], object] = {}
    for method in methods:
        for target, indices in by_target.items():
            got = ex.attribute([records[i].text for i in indices], method, target=target, **options.get(method, {}))
            for i, result in zip(indices, got, strict=True):
                results[i, method] = result
    rows, tokens = [], 0
    for i, r in enumerate(records):
        done = next((results[i, m] for m in methods if results[i, m]), None)
        tokens += len(done.tokens) if done is not None else 0
        rows.extend(row(r.id, m, options.get(m, {}), results[i, m]) for m in methods)
    return rows, tokens


def write_part(out: Path, name: str, rows: list[dict]) -> None:
    tmp = out / f".{name}.tmp"
    pq.write_table(table(rows), tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / name)
    manifests.fsync_dir(out)


def commit_part(out: Path, manifest: dict, k: int, rows: list[dict]) -> None:
    """Chunk k's part renamed into place, then the manifest that lists it."""
    name = PART.format(k)
    write_part(out, name, rows)
    manifest["parts"][name] = {"rows": len(rows), "failures": sum(r["error"] is not None for r in rows)}
    manifests.write(out, manifest)


def finish(out: Path, manifest: dict, total: int, computed: int, seconds: float, tokens: int) -> RunSummary:
    """The manifest marked complete, with the output's counts; -> the run's summary."""
    parts = manifest["parts"].values()
    summary = RunSummary(
        out=str(out),
        texts=total,
        rows=sum(p["rows"] for p in parts),
        failures=sum(p["failures"] for p in parts),
        computed_texts=computed,
        seconds=seconds,
        tokens=tokens,
    )
    manifest["complete"] = True
    manifest["summary"] = {"texts": summary.texts, "rows": summary.rows, "failures": summary.failures}
    manifests.write(out, manifest)
    return summary


def run_local(
    ex,
    corpus,
    out: Path,
    methods,
    options,
    chunk_texts: int,
    committed: set[str],
    manifest: dict,
    total: int,
    progress: bool,
) -> RunSummary:
    from tqdm.auto import tqdm

    if progress:  # before the first batch: what a resumed job found (the benchmark times this line)
        state = f"resuming: {len(committed)} part(s) committed" if committed else "starting"
        print(f"engine run: {state}, {total} texts, chunks of {chunk_texts}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    bar = tqdm(total=total, unit="text", desc="attributing", disable=not progress, dynamic_ncols=True)
    computed = tokens = 0

    def chunks():
        records = iter(corpus.records())
        for k in itertools.count():
            chunk = list(itertools.islice(records, chunk_texts))
            if not chunk:
                return
            yield k, chunk

    pending = []  # (k, chunk, future), oldest first
    with ThreadPoolExecutor(max_workers=IN_FLIGHT_CHUNKS, thread_name_prefix="corpus") as pool:

        def commit_oldest():
            nonlocal computed, tokens
            k, chunk, future = pending.pop(0)
            rows, n_tokens = future.result()
            commit_part(out, manifest, k, rows)
            computed += len(chunk)
            tokens += n_tokens
            bar.update(len(chunk))
            elapsed = time.perf_counter() - start
            bar.set_postfix(tokens_per_s=f"{tokens / elapsed:.0f}", refresh=False)

        for k, chunk in chunks():
            if PART.format(k) in committed:
                bar.update(len(chunk))
                continue
            pending.append((k, chunk, pool.submit(attribute_chunk, ex, chunk, methods, options)))
            if len(pending) >= IN_FLIGHT_CHUNKS:
                commit_oldest()
        while pending:
            commit_oldest()
    bar.close()
    return finish(out, manifest, total, computed, time.perf_counter() - start, tokens)


def explainer_options(max_batch_tokens: int | None = None, compile: bool = False) -> dict:
    """The `Explainer` options a job (or a server) sets: the budget where given, `compile` where on."""
    return {
        **({} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}),
        **({"compile": True} if compile else {}),
    }


def run_corpus(
    input,
    out,
    methods,
    *,
    options: dict | None = None,
    model: str | None = None,
    explainer=None,
    model_name: str | None = None,
    chunk_texts: int = 64,
    max_batch_tokens: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    backend: str = "local",
    ray_address: str | None = None,
    workers: int = 1,
    compile: bool = False,
) -> RunSummary:
    """Attribute every record of `input` with every method into Parquet parts under `out` (see the
    module's doc); resumes an interrupted job of the same fingerprint. `explainer`: an Explainer to
    use (then `model_name` names it in the fingerprint), else one is loaded from `model` with
    `max_batch_tokens` and `compile` (`Explainer`'s; neither changes the results beyond float32
    rounding, so neither is in the fingerprint). `backend="ray"` runs the same map on Ray Data
    (`engine.corpus.ray_job`)."""
    from ..models import DEFAULT_MODEL

    methods, options = check_job(methods, options, chunk_texts)
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if backend == "local" and (workers != 1 or ray_address is not None):
        raise ValueError(
            "workers and ray_address apply to backend='ray' (--backend ray); the local job runs one engine loop"
        )
    corpus = open_corpus(input)
    scan = corpus.scan()  # unreadable input, duplicate ids: before any model loads
    out = Path(out)
    if backend == "ray":
        from .ray_job import run_ray

        return run_ray(corpus, scan, out, methods, options, model or DEFAULT_MODEL, chunk_texts,
                       explainer_options(max_batch_tokens, compile), overwrite, progress, ray_address,
                       workers)  # fmt: skip
    if explainer is None:
        from ..explainer import Explainer

        model = model or DEFAULT_MODEL
        explainer = Explainer.from_pretrained(model, progress=False, **explainer_options(max_batch_tokens, compile))
        model_name = model_name or os.path.basename(os.path.normpath(model))
    model_name = model_name or getattr(explainer.model.config, "_name_or_path", "") or type(explainer.model).__name__
    fp = manifests.fingerprint(model_name, explainer.model, methods, options, scan.sha256, chunk_texts)
    committed = prepare_out(out, fp, overwrite)
    manifest = manifests.read(out)
    previous_progress, explainer.progress = explainer.progress, False  # the job's own bar, not one per call
    try:
        summary = run_local(
            explainer, corpus, out, methods, options, chunk_texts, committed, manifest, scan.rows, progress
        )
    finally:
        explainer.progress = previous_progress
    manifest["complete"] = True
    manifest["summary"] = {"texts": summary.texts, "rows": summary.rows, "failures": summary.failures}
    manifests.write(out, manifest)
    return summary
