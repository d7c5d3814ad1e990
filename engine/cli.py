"""The command line.

- `engine explain "TEXT"`: the seed's method comparison (sections 2-7) in the terminal or as JSON.
- `engine compare "TEXT"` / `engine evaluate FILE`: `Explainer.evaluate` on one text or a corpus (a text
  file, one prompt per line, or JSONL with "text" and optional "rationale" per line, or "paraphrase":
  [a, b] lines): the per-method summary and the agreement matrix as tables, `--html` for a
  self-contained report, `--plots DIR` for the figures, `--format json` for the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys

from .display import display_token, display_tokens
from .jsonable import comparison_json, evaluation_json
from .methods import available_methods, default_methods
from .models import CLASSIFIER, DEFAULT_MODEL

COMPILE_HELP = "run the decoder layers' MLPs and norms through torch.compile (pays off on long jobs)"

BAR_WIDTH = 30


def _bar(value: float) -> str:
    filled = int(round(max(0.0, min(1.0, value)) * BAR_WIDTH))
    return "█" * filled + "·" * (BAR_WIDTH - filled)


class UsageError(ValueError):
    """A bad command line (unknown method, bad --k): reported with the usage, before any model loads."""


def _parse_methods(values: list[str] | None) -> list[str]:
    if not values:
        return default_methods()
    methods = [m for v in values for m in v.split(",") if m]
    valid = available_methods()
    unknown = [m for m in methods if m not in valid]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; available: {valid}")
    if not methods:
        raise UsageError(f"--methods names no method; available: {valid}")
    return methods


def explain(args) -> int:
    from .explainer import Explainer
    from .report import compare_with_faithfulness

    methods = args.methods
    ex = Explainer.from_pretrained(args.model)
    comparison, faith = compare_with_faithfulness(ex, args.text, methods, args.k)
    shown = display_tokens(comparison.tokens, ex.tokenizer)
    n_tokens = len(comparison.tokens)
    ks = [k for k in args.k if k <= n_tokens]

    if args.format == "json":
        report = {"text": args.text, "model": args.model, **comparison_json(comparison, faith)}
        json.dump(report, sys.stdout, indent=2, allow_nan=False)
        print()
        return 0

    print(f"Text: {args.text!r}")
    print(f"Model: {args.model}")
    predicted = "Predicted class" if ex.kind == CLASSIFIER else "Predicted next token"
    print(f"{predicted}: {comparison.target_token!r} (p={comparison.target_prob:.3f})")
    width = max(len(t) for t in shown)
    for m, a in comparison.attributions.items():
        extra = f", completeness gap {a.completeness_gap:+.3f}" if a.completeness_gap is not None else ""
        print(f"\n{m} (min-max normalized{extra}):")
        for tok, raw, norm in zip(shown, a.scores, comparison.normalized[m], strict=True):
            print(f"  {tok:>{width}s} {_bar(norm)} {norm:.2f}  ({raw:+.4g})")
    print("\nSpearman rank correlations:")
    col = max(len(m) for m in methods)
    print(" " * (col + 2) + " ".join(f"{m[:10]:>10s}" for m in methods))
    for i, m in enumerate(methods):
        print(f"  {m:<{col}s}" + " ".join(f"{v:10.3f}" for v in comparison.spearman[i]))
    print(f"\nTop-{len(next(iter(comparison.top_k.values())))} most important tokens per method:")
    for m, top in comparison.top_k.items():
        print(f"  {m:<{col}s}: " + ", ".join(f"'{display_token(t, ex.tokenizer)}' ({s:.2f})" for t, s in top))
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


def read_corpus(path: str) -> tuple[list[str], list | None, list[tuple[str, str]]]:
    """(texts, rationales or None, paraphrase pairs) from a .txt (one text per line) or .jsonl file."""
    from pathlib import Path

    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"{path} is a directory: pass a .txt (one text per line) or .jsonl file")
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:  # utf-8-sig: a byte-order mark (as Windows editors write) is not part of the first text
        content = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    lines = [line for line in content.splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        return lines, None, []
    texts, rationales, pairs = [], [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        if isinstance(row, dict) and "paraphrase" in row:
            pair = row["paraphrase"]
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise ValueError(f"{path}:{number}: 'paraphrase' must be a list of two strings")
            pairs.append((pair[0], pair[1]))
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            texts.append(row["text"])
            rationales.append(row.get("rationale"))
        else:
            raise ValueError(f"{path}:{number}: each line must be an object with 'text' (str) or 'paraphrase'")
    return texts, (rationales if any(r is not None for r in rationales) else None), pairs


def _parse_k(values: list[str], fractions: bool = True) -> list:
    """--k: ints >= 1, or also fractions in (0, 1) (compare / evaluate; explain takes ints only and
    skips, and says so, a k longer than the text)."""
    allowed = "ints >= 1 or fractions in (0, 1)" if fractions else "ints >= 1"
    ks = []
    for v in values:
        try:
            k = int(v)
        except ValueError:
            try:
                k = float(v) if fractions else None
            except ValueError:
                k = None
        if k is None or (isinstance(k, int) and k < 1) or (isinstance(k, float) and not 0 < k < 1):
            raise UsageError(f"--k values must be {allowed}, got {v!r}")
        ks.append(k)
    return ks


def run_evaluation(args, texts, rationales=None, pairs=()) -> int:
    from . import report
    from .explainer import Explainer

    methods = args.methods
    ex = Explainer.from_pretrained(args.model)
    ev = ex.evaluate(
        texts,
        methods,
        k_values=args.k,
        curve_steps=args.curve_steps,
        deletion=args.deletion,
        protect_target=not args.perturb_target,
        rationales=rationales,
        paraphrases=list(pairs) or None,
    )
    if args.html:
        path = report.write_html(
            ev, args.html, title=f"Attribution evaluation: {args.model}", model_name=args.model, ex=ex
        )
        print(f"wrote {path}", file=sys.stderr)
    if args.plots:
        for path in report.write_plots(ev, args.plots, ex=ex):
            print(f"wrote {path}", file=sys.stderr)
    if not ev.per_text:  # nothing to report: every text failed
        for f in ev.failures:
            print(f"engine: text {f.index}, {f.method}: {f.error}", file=sys.stderr)
        raise ValueError(f"no text could be evaluated ({len(ev.failures)} failure(s) above)")
    if args.format == "json":
        out = {"model": args.model, **evaluation_json(ev, methods)}
        json.dump(out, sys.stdout, indent=2, allow_nan=False)
        print()
        return 0
    n = len({r["text_index"] for r in ev.per_text})
    print(f"Model: {args.model} · {n} text(s) evaluated · {len(ev.failures)} failed")
    if len(texts) == 1:
        a = next(entries[0] for entries in ev.attributions.values() if entries[0])
        print(f"Text: {a.text!r}\nPredicted: {a.target_token!r} (p={a.target_prob:.3f})")
    print("\nPer-method summary (mean over texts; comp/suff: the seed's faithfulness at k):")
    print(report.summary_table(ev))
    if len(methods) > 1:
        print("\nAgreement (Spearman, mean over texts):")
        print(report.agreement_table(ev))
    for f in ev.failures:
        print(f"\ntext {f.index} not evaluated by {f.method}: {f.error}")
    return 0


def compare(args) -> int:
    return run_evaluation(args, [args.text])


def evaluate_file(args) -> int:
    texts, rationales, pairs = read_corpus(args.file)
    if not texts:
        raise ValueError(f"{args.file} holds no texts")
    return run_evaluation(args, texts, rationales, pairs)


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
        help=f"methods, space or comma separated, of {available_methods()} (default: {default_methods()})",
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--k", nargs="+", default=["1", "3", "5"], help="faithfulness k values (default: 1 3 5)")
    p.set_defaults(func=explain)

    for name, helptext in (
        ("compare", "evaluate and compare methods on one text"),
        ("evaluate", "evaluate and compare methods on a corpus (.txt: one text per line; .jsonl)"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "compare":
            p.add_argument("text")
            p.set_defaults(func=compare)
        else:
            p.add_argument("file")
            p.set_defaults(func=evaluate_file)
        p.add_argument(
            "--model", default=DEFAULT_MODEL, help=f"model name, hub id or folder (default: {DEFAULT_MODEL})"
        )
        p.add_argument(
            "--methods", nargs="+", metavar="METHOD", help=f"of {available_methods()} (default: {default_methods()})"
        )
        p.add_argument(
            "--k", nargs="+", default=["1", "3", "5"], help="faithfulness k: ints or fractions (default 1 3 5)"
        )
        p.add_argument("--curve-steps", type=int, default=10, help="points per deletion curve - 1 (default 10)")
        p.add_argument("--deletion", choices=("replacement", "zero_embedding"), default="replacement")
        p.add_argument("--perturb-target", action="store_true", help="let the curves delete the read position too")
        p.add_argument("--format", choices=("table", "json"), default="table")
        p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
        p.add_argument("--plots", metavar="DIR", help="write the figures (PNG) into DIR")
    p = sub.add_parser("run", help="attribute a corpus into resumable Parquet parts")
    p.add_argument("input", help=".txt (a text a line), .jsonl, .parquet, a folder of them, or a saved HF dataset")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: part-NNNNN.parquet and _manifest.json")
    p.add_argument(
        "--methods", nargs="+", metavar="METHOD", help=f"of {available_methods()} (default: {default_methods()})"
    )
    p.add_argument(
        "--options", default="{}", metavar="JSON", help='per-method options: \'{"sliding_window": {"window_size": 2}}\''
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, hub id or folder (default: {DEFAULT_MODEL})")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster (default: start one on this machine)")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, one Explainer each (ray backend)")
    p.add_argument("--chunk-texts", type=int, default=64, help="texts per part (default 64)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="token budget per batch")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--overwrite", action="store_true", help="start over in a folder holding another job's output")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.set_defaults(func=run_job)

    p = sub.add_parser("serve", help="serve explanations over HTTP (needs the [serve] extra)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, hub id or folder (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-batch-tokens", type=int, default=None, help="token budget per batch")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--max-queued-tokens", type=int, default=200_000, help="admitted work in flight, in tokens")
    p.add_argument("--timeout-s", type=float, default=60.0, help="default deadline per request")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests waiting on the engine loop at once")
    p.add_argument("--api-key-env", metavar="VAR", help="require 'Authorization: Bearer $VAR'")
    p.add_argument("--grace-s", type=float, default=30.0, help="on SIGTERM, seconds to finish in-flight requests")
    p.set_defaults(func=serve)
    return parser


def run_job(args) -> int:
    from .corpus import run_corpus

    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as err:
        raise ValueError(f"--options is not JSON ({err})") from err
    if not isinstance(options, dict):
        raise ValueError('--options must be a JSON object of per-method options, e.g. {"rollout": {}}')
    summary = run_corpus(
        args.input,
        args.out,
        args.methods,
        options=options,
        model=args.model,
        chunk_texts=args.chunk_texts,
        max_batch_tokens=args.max_batch_tokens,
        overwrite=args.overwrite,
        progress=not args.quiet,
        backend=args.backend,
        ray_address=args.ray_address,
        workers=args.workers,
        compile=args.compile,
    )
    if not args.quiet:
        print(summary, file=sys.stderr)
    return 0


def serve(args) -> int:
    import contextlib
    import os
    import signal

    try:
        import uvicorn

        from .serve import create_app
    except ImportError as err:
        raise ImportError(f'engine serve needs the serve extra: pip install -e ".[serve]" ({err})') from err
    from .explainer import Explainer

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    from .corpus.job import explainer_options

    ex = Explainer.from_pretrained(args.model, progress=False, **explainer_options(args.max_batch_tokens, args.compile))
    name = os.path.basename(os.path.normpath(args.model))
    app = create_app(
        ex,
        name,
        max_queued_tokens=args.max_queued_tokens,
        timeout_s=args.timeout_s,
        api_key=api_key,
        max_concurrent=args.max_concurrent,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.grace_s
    )
    server = uvicorn.Server(config)

    @contextlib.contextmanager
    def graceful_signals():
        # SIGTERM / SIGINT: stop accepting, finish in-flight requests, exit 0 (uvicorn's own handler
        # re-raises the signal after the shutdown, so the process would end killed by it)
        previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    server.capture_signals = graceful_signals
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # the command line is checked whole before any model loads
        if args.command != "serve":
            args.methods = _parse_methods(args.methods)
        if args.command in ("explain", "compare", "evaluate"):
            args.k = _parse_k(args.k, fractions=args.command != "explain")
        if getattr(args, "text", None) is not None and not args.text.strip():
            raise UsageError("the text is empty or whitespace only")
    except UsageError as err:
        parser.error(str(err))  # usage and message on stderr, exit status 2
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, ImportError) as err:
        # bad input, a model path that is not a model, a missing optional dependency: one line, status 2
        print(f"engine: error: {_first_line(err)}", file=sys.stderr)
        return 2


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
