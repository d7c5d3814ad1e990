"""`engine explain "TEXT"`: the seed's method comparison (sections 2-7) in the terminal or as JSON."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .models import DEFAULT_MODEL
from .options import available_methods

BAR_WIDTH = 30


def _bar(value: float) -> str:
    filled = int(round(max(0.0, min(1.0, value)) * BAR_WIDTH))
    return "█" * filled + "·" * (BAR_WIDTH - filled)


def _parse_methods(values: list[str]) -> list[str]:
    methods = [m for v in values for m in v.split(",") if m]
    valid = available_methods()
    unknown = [m for m in methods if m not in valid]
    if unknown:
        raise SystemExit(f"engine: unknown method(s) {unknown}; available: {valid}")
    return methods


def explain(args) -> int:
    from .explainer import Explainer

    methods = _parse_methods(args.methods) if args.methods else available_methods()
    ex = Explainer.from_pretrained(args.model)
    comparison = ex.compare(args.text, methods, top_k=3)
    n_tokens = len(comparison.tokens)
    ks = [k for k in args.k if k <= n_tokens]
    faith = {m: ex.faithfulness(args.text, a, ks) for m, a in comparison.attributions.items()} if ks else {}

    if args.format == "json":
        report = {
            "text": args.text,
            "model": args.model,
            "prediction": {"token": comparison.target_token, "probability": comparison.target_prob},
            "tokens": comparison.tokens,
            "methods": {
                m: {
                    "scores": a.scores.tolist(),
                    "normalized": comparison.normalized[m].tolist(),
                    **({"completeness_gap": a.completeness_gap} if a.completeness_gap is not None else {}),
                }
                for m, a in comparison.attributions.items()
            },
            "spearman": {"methods": methods, "rho": _nan_to_none(comparison.spearman)},
            "top_k": {m: [{"token": t, "score": s} for t, s in top] for m, top in comparison.top_k.items()},
            "faithfulness": faith,
        }
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0

    print(f"Text: {args.text!r}")
    print(f"Model: {args.model}")
    print(f"Predicted next token: {comparison.target_token!r} (p={comparison.target_prob:.3f})")
    width = max(len(t) for t in comparison.tokens)
    for m, a in comparison.attributions.items():
        extra = f", completeness gap {a.completeness_gap:+.3f}" if a.completeness_gap is not None else ""
        print(f"\n{m} (min-max normalized{extra}):")
        for tok, raw, norm in zip(comparison.tokens, a.scores, comparison.normalized[m], strict=True):
            print(f"  {tok:>{width}s} {_bar(norm)} {norm:.2f}  ({raw:+.4g})")
    print("\nSpearman rank correlations:")
    col = max(len(m) for m in methods)
    print(" " * (col + 2) + " ".join(f"{m[:10]:>10s}" for m in methods))
    for i, m in enumerate(methods):
        print(f"  {m:<{col}s}" + " ".join(f"{v:10.3f}" for v in comparison.spearman[i]))
    print(f"\nTop-{len(next(iter(comparison.top_k.values())))} most important tokens per method:")
    for m, top in comparison.top_k.items():
        print(f"  {m:<{col}s}: " + ", ".join(f"'{t}' ({s:.2f})" for t, s in top))
    if faith:
        print("\nFaithfulness (sufficiency / comprehensiveness; replacement token as in the seed):")
        print(" " * (col + 2) + "".join(f"{'k=' + str(k):>18s}" for k in ks))
        for m, res in faith.items():
            cells = "".join(
                f"{res[f'k={k}']['sufficiency']:8.3f} /{res[f'k={k}']['comprehensiveness']:7.3f} " for k in ks
            )
            print(f"  {m:<{col}s}{cells}")
    skipped = [k for k in args.k if k > n_tokens]
    if skipped:
        print(f"\n(k = {skipped} skipped: the text has only {n_tokens} tokens)")
    return 0


def _nan_to_none(matrix: np.ndarray) -> list:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description="Token attributions for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("explain", help="compare attribution methods on one text (the seed's section 6)")
    p.add_argument("text")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, hub id or folder (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help=f"methods, space or comma separated (default: all of {available_methods()})",
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5], help="faithfulness k values (default: 1 3 5)")
    p.set_defaults(func=explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"engine: error: {err}", file=sys.stderr)
        return 2
