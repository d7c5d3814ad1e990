"""Reports of an `Evaluation`: terminal tables, a self-contained HTML page, matplotlib figures.

The HTML report needs nothing from the network: styles are inline, figures (when made) are embedded as
base64 PNG data, and token heat maps are plain colored spans.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

from .display import display_tokens
from .metrics import min_max_normalize

# the columns of the per-method summary, in the order shown; `higher` says which direction is better
SUMMARY_COLUMNS = [
    ("comprehensiveness@{k}", "comp@{k}", True),
    ("sufficiency@{k}", "suff@{k}", True),
    ("aopc_morf", "AOPC MoRF", True),
    ("aopc_lerf", "AOPC LeRF", False),
    ("abpc", "ABPC", True),
    ("abpc_logit", "ABPC logit", True),
    ("gini", "Gini", True),
    ("entropy", "entropy", False),
    ("auprc", "AUPRC", True),
    ("token_f1", "token F1", True),
    ("consistency", "consistency", True),
]


def compare_with_faithfulness(ex, text: str, methods, k_values, *, target=None, top_k: int = 3, options=None):
    """What `engine explain` and the server's `:compare` report: `ex.compare` of the methods and the
    seed's faithfulness of each at every k in `k_values` the text is long enough for (longer ones
    skipped, as the seed's top-k of a short text). -> (Comparison, {method: {"k=K": {...}}})."""
    comparison = ex.compare(text, methods, target=target, top_k=top_k, options=options)
    ks = [k for k in k_values if k <= len(comparison.tokens)]
    faith = {m: ex.faithfulness(text, a, ks) for m, a in comparison.attributions.items()} if ks else {}
    return comparison, faith


def summary_columns(ev) -> list[tuple[str, str, bool]]:
    """(key, header, higher_is_better) of the summary columns this evaluation has."""
    present = set().union(*(v.keys() for v in ev.per_method.values())) if ev.per_method else set()
    columns = []
    for key, header, higher in SUMMARY_COLUMNS:
        if "{k}" in key:
            columns += [(key.format(k=k), header.format(k=k), higher) for k in ev.k_labels]
        elif key in present:
            columns.append((key, header, higher))
    return [c for c in columns if c[0] in present]


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}"


def summary_table(ev) -> str:
    """The per-method summary as a fixed-width text table (means over the texts)."""
    columns = summary_columns(ev)
    width = max(len(m) for m in ev.methods)
    head = f"{'method':<{width}s} " + " ".join(f"{h:>11s}" for _, h, _ in columns)
    lines = [head, "-" * len(head)]
    for m in ev.methods:
        values = ev.per_method[m]
        lines.append(f"{m:<{width}s} " + " ".join(f"{_fmt(values.get(key)):>11s}" for key, _, _ in columns))
    return "\n".join(lines)


def markdown_table(ev) -> str:
    """The per-method summary as a Markdown table (for the README)."""
    columns = summary_columns(ev)
    arrows = {True: "↑", False: "↓"}
    lines = [
        "| method | " + " | ".join(f"{h} {arrows[hi]}" for _, h, hi in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for m in ev.methods:
        values = ev.per_method[m]
        lines.append(f"| {m} | " + " | ".join(_fmt(values.get(key)) for key, _, _ in columns) + " |")
    return "\n".join(lines)


def agreement_table(ev, name: str = "spearman") -> str:
    matrix = ev.agreement[name]
    width = max(len(m) for m in ev.methods)
    lines = [" " * (width + 1) + " ".join(f"{m[:11]:>11s}" for m in ev.methods)]
    for i, m in enumerate(ev.methods):
        lines.append(f"{m:<{width}s} " + " ".join(f"{_fmt(v):>11s}" for v in matrix[i]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- figures


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # an optional extra
        raise ImportError("figures need matplotlib: pip install 'attribution-engine[report]'") from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def curves_figure(ev):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for m in ev.methods:
        if m not in ev.curves:
            continue
        (line,) = axes[0].plot(ev.fractions, ev.curves[m]["morf_prob"].mean(0), label=m)
        axes[1].plot(ev.fractions, ev.curves[m]["lerf_prob"].mean(0), label=m, color=line.get_color())
    titles = ("most relevant deleted first (MoRF)", "least relevant deleted first (LeRF)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fraction of tokens deleted")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("p(target), mean over texts")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def agreement_figure(ev, name: str = "spearman"):
    plt = _pyplot()
    matrix = ev.agreement[name]
    n = len(ev.methods)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.0 * n + 1.5))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu")  # blue = agree, as in the HTML table
    ax.set_xticks(range(n), ev.methods, rotation=45, ha="right")
    ax.set_yticks(range(n), ev.methods)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, _fmt(matrix[i, j]), ha="center", va="center", fontsize=8)
    ax.set_title(f"method agreement ({name}, mean over texts)", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def rollout_figure(tokens: list[str], matrix: np.ndarray, title: str = "attention rollout"):
    plt = _pyplot()
    n = len(tokens)
    fig, ax = plt.subplots(figsize=(0.35 * n + 2.5, 0.35 * n + 2))
    image = ax.imshow(matrix, cmap="viridis")
    labels = list(tokens)  # callers pass display tokens
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("attended token")
    ax.set_ylabel("query token")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def _rollout_of_first_text(ev, ex=None):
    """The full rollout matrix of the first text: from the evaluation's own rollout attributions when it
    has them, else computed with `ex` (None when neither is available)."""
    first = _first_text(ev)
    if first is None:
        return None
    a = ev.attributions.get("rollout", [None])[0]
    tokenizer = ex.tokenizer if ex is not None else None
    if a and a.matrix is not None:
        return display_tokens(a.tokens, tokenizer), a.matrix
    if ex is not None:
        a = ex.attribute(first.text, "rollout")
        return display_tokens(a.tokens, tokenizer), a.matrix
    return None


def _first_text(ev, t: int = 0):
    """The evaluated text t's attribution by the first method that succeeded on it (None: no texts)."""
    entries = [ev.attributions[m][t] for m in ev.methods if len(ev.attributions.get(m, ())) > t]
    return next((a for a in entries if a), None)


def figures(ev, ex=None) -> dict:
    """name -> matplotlib figure: deletion curves, agreement matrix, a text's rollout matrix."""
    out = {}
    if ev.curves:
        out["deletion_curves"] = curves_figure(ev)
    if len(ev.methods) > 1:
        out["agreement"] = agreement_figure(ev)
    rollout = _rollout_of_first_text(ev, ex)
    if rollout is not None:
        out["rollout_matrix"] = rollout_figure(*rollout, title=f"attention rollout: {_first_text(ev).text[:60]}")
    return out


def write_plots(ev, directory, ex=None) -> list[Path]:
    """Save the figures as PNG files into `directory`; returns their paths."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures(ev, ex).items():
        path = directory / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------- HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; font-variant-numeric: tabular-nums; }
th:first-child, td:first-child { text-align: left; }
.tokens td { text-align: left; border: none; padding: 2px 4px; }
.tok { display: inline-block; padding: 1px 3px; margin: 1px; border-radius: 3px; font-family: monospace; }
.note { color: #666; font-size: 0.9em; }
section.text { border-top: 1px solid #ddd; padding-top: 0.5em; }
"""


def _color(value: float) -> str:
    """White to red for normalized scores in [0, 1]."""
    v = float(np.clip(value, 0.0, 1.0))
    return f"rgb(255,{int(255 - 175 * v)},{int(255 - 175 * v)})"


def _agreement_color(value: float) -> str:
    if math.isnan(value):
        return "#eee"
    v = float(np.clip(value, -1.0, 1.0))
    if v >= 0:
        return f"rgb({int(255 - 155 * v)},{int(255 - 95 * v)},255)"
    return f"rgb(255,{int(255 + 155 * v)},{int(255 + 155 * v)})"


def _figure_data_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def html_report(ev, title: str = "Attribution evaluation", model_name: str = "", ex=None, with_figures=True) -> str:
    e = html.escape
    tokenizer = ex.tokenizer if ex is not None else None
    n_texts = len(next(iter(ev.attributions.values()))) if ev.attributions else 0
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p class='note'>model: {e(model_name)} · {n_texts} texts · methods: {e(', '.join(ev.methods))}</p>",
        "<h2>Per-method summary (mean over texts)</h2>",
    ]
    columns = summary_columns(ev)
    parts.append("<table id='summary'><tr><th>method</th>")
    parts += [f"<th>{e(h)} {'↑' if hi else '↓'}</th>" for _, h, hi in columns]
    parts.append("</tr>")
    for m in ev.methods:
        cells = "".join(f"<td>{_fmt(ev.per_method[m].get(key))}</td>" for key, _, _ in columns)
        parts.append(f"<tr><td>{e(m)}</td>{cells}</tr>")
    parts.append("</table>")
    parts.append(
        "<p class='note'>comp / suff: the seed's comprehensiveness and sufficiency at k. AOPC: p(target) "
        "minus the area under the deletion curve; ABPC = area(LeRF) − area(MoRF). Rankings break ties "
        "by position.</p>"
    )

    if len(ev.methods) > 1:
        parts.append("<h2>Method agreement (Spearman, mean over texts)</h2><table id='agreement'><tr><th></th>")
        parts += [f"<th>{e(m)}</th>" for m in ev.methods]
        parts.append("</tr>")
        for i, m in enumerate(ev.methods):
            cells = "".join(
                f"<td style='background:{_agreement_color(v)}'>{_fmt(v)}</td>" for v in ev.agreement["spearman"][i]
            )
            parts.append(f"<tr><td>{e(m)}</td>{cells}</tr>")
        parts.append("</table>")

    if with_figures:
        for name, fig in figures(ev, ex).items():
            parts.append(f"<h2>{e(name.replace('_', ' '))}</h2><img alt='{e(name)}' src='{_figure_data_uri(fig)}'>")
            _pyplot().close(fig)

    parts.append("<h2>Texts</h2>")
    records = {(r["text_index"], r["method"]): r for r in ev.per_text}
    for t in range(n_texts):
        first = _first_text(ev, t)
        index = next(r["text_index"] for r in ev.per_text if r["text"] == first.text)
        parts.append(
            f"<section class='text'><h3>{e(first.text)}</h3><p>prediction: <b>{e(repr(first.target_token))}</b>"
            f" (p = {first.target_prob:.3f})</p><table class='tokens'>"
        )
        for m in ev.methods:
            a = ev.attributions[m][t]
            if not a:
                parts.append(f"<tr><td><b>{e(m)}</b></td><td class='note'>failed: {e(str(a.error))}</td></tr>")
                continue
            norm = min_max_normalize(a.scores)
            spans = "".join(
                f"<span class='tok' style='background:{_color(v)}' title='{s:+.4g}'>{e(tok)}</span>"
                for tok, v, s in zip(display_tokens(a.tokens, tokenizer), norm, a.scores, strict=True)
            )
            r = records[(index, m)]
            faith = " · ".join(
                f"comp@{k} {_fmt(r.get(f'comprehensiveness@{k}'))} suff@{k} {_fmt(r.get(f'sufficiency@{k}'))}"
                for k in ev.k_labels
            )
            parts.append(f"<tr><td><b>{e(m)}</b></td><td>{spans}</td><td class='note'>{faith}</td></tr>")
        parts.append("</table></section>")
    if ev.failures:
        parts.append("<h2>Not evaluated</h2><ul>")
        parts += [f"<li>text {f.index}, {e(f.method)}: {e(str(f.error))}</li>" for f in ev.failures]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(ev, path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_report(ev, **kwargs), encoding="utf-8")
    return path
