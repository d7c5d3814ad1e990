"""`DIR/_manifest.json`: the job's fingerprint and its committed parts, written atomically.

A part is committed when its file has been renamed into place and the manifest that lists it has
been renamed into place; a crash between the two leaves a part file the manifest does not list,
which a resumed job writes again (the same chunk gives the same rows). The fingerprint says what the
output is of: the model (name and a hash of its weights), the methods and their options, the input's
hash, the chunking, the engine's version and the schema's; a resume with another one is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

from .schema import SCHEMA_VERSION

MANIFEST = "_manifest.json"


def engine_version() -> str:
    try:
        return metadata.version("attribution-engine")
    except metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def weights_sha256(model) -> str:
    """A hash of every parameter and buffer (name, dtype, shape, bytes), in the state dict's order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model_name: str, model, methods: list[str], options: dict, input_sha256: str, chunk_texts: int) -> dict:
    return {
        "model": model_name,
        "weights_sha256": weights_sha256(model),
        "methods": list(methods),
        "options": {m: options.get(m, {}) for m in methods},
        "input_sha256": input_sha256,
        "chunk_texts": chunk_texts,
        "engine_version": engine_version(),
        "schema_version": SCHEMA_VERSION,
    }


def read(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:  # never half-written (atomic), so someone else's file
        raise ValueError(f"{path} is not a manifest of this engine ({err}); use --overwrite to start over") from err


def write(out: Path, manifest: dict) -> None:
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
