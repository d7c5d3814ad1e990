"""The Ray backend of `engine run`: the local job's chunks, attributed by actors on Ray Data, committed
by the driver.

    chunk numbers -> Ray Data -> map_batches(ChunkAttributor, concurrency=workers)  one Explainer per
                                                                                     actor (num_gpus=1
                                                                                     where CUDA is)
                  -> iter_batches in the driver -> a chunk's rows complete -> part-k.parquet + manifest

Each actor reads the records of the chunks it is given from the input itself (the same reader as the
local job, so ids and targets are the same; the input must be readable at the same path on every
node), attributes them with `attribute_chunk`, and returns their rows. The driver keeps a chunk's rows
until all its (id, method) rows arrived, drops any that arrive twice (Ray Data's execution is
at-least-once: a retried task returns its rows again), then writes and commits the chunk's part as
the local job does. Parts, schema, manifest and fingerprint are the local job's: a job started on one
backend resumes on the other.

Started here (no `ray_address`, Ray not yet running), Ray runs on this machine with its node address
127.0.0.1, no dashboard and no usage reporting (`start_local_ray`); `loopback_violations` lists any
socket of its processes that is not on loopback.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import time
from pathlib import Path

from . import manifest as manifests
from .job import PART, RunSummary, attribute_chunk, commit_part, finish, prepare_out
from .schema import SCHEMA
from .sources import Record, open_corpus


class ChunkAttributor:
    """A Ray Data actor: one Explainer, fed chunk numbers, returning the rows of those chunks."""

    def __init__(self, input_path: str, model: str, methods, options, chunk_texts: int, explainer_options: dict):
        import ray
        import torch

        from ..explainer import Explainer

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.ex = Explainer.from_pretrained(model, progress=False, **explainer_options)
        self.corpus = open_corpus(input_path)
        self.methods, self.options, self.chunk_texts = list(methods), dict(options), chunk_texts
        self._records, self._next = None, 0  # an open reader and the position it is at

    def _chunk(self, k: int) -> list[Record]:
        start = k * self.chunk_texts
        if self._records is None or start < self._next:  # chunks come in increasing order: rarely reopened
            self._records, self._next = iter(self.corpus.records()), 0
        chunk = list(itertools.islice(self._records, start - self._next, start - self._next + self.chunk_texts))
        self._next = start + len(chunk)
        return chunk

    def __call__(self, batch: dict) -> dict:
        rows, chunk_of, tokens = [], [], []
        for k in batch["chunk"]:
            got, n_tokens = attribute_chunk(self.ex, self._chunk(int(k)), self.methods, self.options)
            rows.extend(got)
            chunk_of.extend([int(k)] * len(got))
            tokens.extend([n_tokens] + [0] * (len(got) - 1))
        columns = {name: [r[name] for r in rows] for name in SCHEMA.names}
        return {**columns, "_chunk": chunk_of, "_tokens": tokens}


def start_local_ray(num_cpus: int | None = None) -> None:
    """Ray on this machine, loopback only: node address 127.0.0.1 (and Ray's own lookup of this node's
    address answering 127.0.0.1, which it otherwise resolves to the machine's outward address), no
    dashboard, no usage statistics."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read at import: set before ray is imported
    import ray
    from ray._private import ray_constants, services

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the variable was set
    resolved = services.get_node_ip_address()
    if resolved != "127.0.0.1":
        raise RuntimeError(f"Ray resolves this node's address to {resolved}, not 127.0.0.1: not starting it")
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        log_to_driver=False,
        configure_logging=False,
    )


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def loopback_violations() -> list[str]:
    """Each socket of this process and its descendants (Ray's GCS, raylet, agents and workers, when
    this process started Ray) whose local or remote address is not a loopback one; a socket listening
    on every interface (0.0.0.0, ::) counts as not loopback."""
    import psutil

    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.Error:
            continue
        for c in connections:
            ends = [c.laddr] + ([c.raddr] if c.raddr else [])
            if not all(_is_loopback(end.ip) for end in ends):
                found.append(f"{name} ({proc.pid}): {c.laddr.ip}:{c.laddr.port} -> {c.raddr or '-'} {c.status}")
    return found


def run_ray(corpus, scan, out: Path, methods, options, model: str, chunk_texts: int, explainer_options: dict,
            overwrite: bool, progress: bool, ray_address: str | None, workers: int) -> RunSummary:  # fmt: skip
    try:
        import ray
    except ImportError as err:
        raise ImportError(f'--backend ray needs the ray extra: pip install -e ".[ray]" ({err})') from err
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    from tqdm.auto import tqdm

    from ..models import load_model

    model_name = os.path.basename(os.path.normpath(model))
    weights, _ = load_model(model)  # the fingerprint's weights hash; the actors load their own copies
    fp = manifests.fingerprint(model_name, weights, methods, options, scan.sha256, chunk_texts)
    del weights
    committed = prepare_out(out, fp, overwrite)
    manifest = manifests.read(out)
    n_chunks = -(-scan.rows // chunk_texts)
    todo = [k for k in range(n_chunks) if PART.format(k) not in committed]

    started_here = False
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
        else:
            start_local_ray(num_cpus=os.cpu_count())
        started_here = True
    start = time.perf_counter()
    bar = tqdm(total=scan.rows, unit="text", desc="attributing (ray)", disable=not progress, dynamic_ncols=True)
    bar.update(scan.rows - sum(min(chunk_texts, scan.rows - k * chunk_texts) for k in todo))
    computed = tokens = 0
    try:
        if todo:
            import torch

            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)
            ds = ray.data.from_items([{"chunk": k} for k in todo], override_num_blocks=len(todo))
            ds = ds.map_batches(
                ChunkAttributor,
                fn_constructor_kwargs={
                    "input_path": str(corpus.path),
                    "model": model,
                    "methods": methods,
                    "options": options,
                    "chunk_texts": chunk_texts,
                    "explainer_options": explainer_options,
                },  # fmt: skip
                batch_size=1,
                concurrency=workers,
                num_cpus=cpus,
                num_gpus=1 if torch.cuda.is_available() else 0,
            )
            arrived: dict[int, dict] = {}
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for r in batch.to_pylist():
                    k = r.pop("_chunk")
                    n_tokens = r.pop("_tokens")
                    rows = arrived.setdefault(k, {})
                    if (r["id"], r["method"]) in rows:
                        continue  # a retried task's rows: at-least-once execution, committed once
                    rows[r["id"], r["method"]] = r
                    tokens += n_tokens
                    n_texts = min(chunk_texts, scan.rows - k * chunk_texts)
                    if len(rows) == n_texts * len(methods):
                        commit_part(out, manifest, k, list(arrived.pop(k).values()))
                        computed += n_texts
                        bar.update(n_texts)
            if arrived:
                raise RuntimeError(f"Ray returned incomplete chunks {sorted(arrived)}; run the job again to resume")
    finally:
        bar.close()
        if started_here:
            ray.shutdown()
    return finish(out, manifest, scan.rows, computed, time.perf_counter() - start, tokens)
