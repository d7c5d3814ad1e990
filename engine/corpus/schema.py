"""The Arrow schema of a corpus job's output (one row per (id, method)), versioned.

Version 1:
    id             string        the record's id (the input's, else its 0-based position)
    method         string
    options        string        the method's options as used, JSON
    tokens         list<string>  the raw tokenizer tokens
    token_ids      list<int32>
    scores         list<float32> one per token
    target_id      int64         the token id (causal LM) or class explained
    target_token   string
    target_prob    float64       on the unperturbed text
    target_logit   float64
    completeness_gap float64     integrated_gradients only
    std_error      list<float32> shapley_sampling only
    n_evaluations  int64         the Shapley methods only
    regions        string        sliding_window only: its regions, JSON
    error          string        null on success; "Type: message" for a text that failed (the other
                                 columns but id, method and options are then null)
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from ..jsonable import strict_json

SCHEMA_VERSION = 1

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("method", pa.string()),
        ("options", pa.string()),
        ("tokens", pa.list_(pa.string())),
        ("token_ids", pa.list_(pa.int32())),
        ("scores", pa.list_(pa.float32())),
        ("target_id", pa.int64()),
        ("target_token", pa.string()),
        ("target_prob", pa.float64()),
        ("target_logit", pa.float64()),
        ("completeness_gap", pa.float64()),
        ("std_error", pa.list_(pa.float32())),
        ("n_evaluations", pa.int64()),
        ("regions", pa.string()),
        ("error", pa.string()),
    ],
    metadata={"engine.schema_version": str(SCHEMA_VERSION)},
)


def _json(value) -> str:
    return json.dumps(strict_json(value), sort_keys=True, allow_nan=False)


def row(record_id: str, method: str, options: dict, result) -> dict:
    """The output row of one (id, method): an `Attribution` or an `AttributionFailure`."""
    out = dict.fromkeys(SCHEMA.names)
    out.update(id=record_id, method=method)
    if not result:
        out["options"] = _json(options)
        out["error"] = f"{type(result.error).__name__}: {result.error}"
        return out
    out.update(
        options=_json(result.options),
        tokens=list(result.tokens),
        token_ids=[int(i) for i in result.token_ids],
        scores=np.asarray(result.scores, dtype=np.float32),
        target_id=int(result.target_id),
        target_token=result.target_token,
        target_prob=float(result.target_prob),
        target_logit=float(result.target_logit),
        completeness_gap=result.completeness_gap,
        std_error=None if result.std_error is None else np.asarray(result.std_error, dtype=np.float32),
        n_evaluations=result.n_evaluations,
        regions=None if result.regions is None else _json(result.regions),
    )
    return out


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)
