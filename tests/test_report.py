"""`engine compare` / `engine evaluate` as real processes on a real model folder; the HTML report opened
in a real headless browser (Debian's chromium); the figures as real PNG files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from conftest import make_tokenizer, tiny_llama

from engine import Explainer, report
from engine.cli import read_corpus

TEXTS = ["the cat sat on the mat because it was", "a dog ran far away", "the big bird sat on the tree"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def evaluation():
    ex = Explainer(tiny_llama(), make_tokenizer())
    return ex, ex.evaluate(TEXTS, ["rollout", "leave_one_out", "lrp"], curve_steps=4)


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=timeout)


def test_evaluate_file_json_equals_the_api(model_dir, tmp_path, evaluation):
    _, ev = evaluation
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n\n")
    args = ["--model", str(model_dir), "--methods", "rollout", "leave_one_out", "lrp", "--curve-steps", "4"]
    out = _run("evaluate", str(corpus), *args, "--format", "json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    # the same engine on the same inputs in another process: equal up to run-to-run nondeterminism of
    # the CPU kernels (none expected; 1e-5 relative is far above it and far below any real difference)
    for m in ev.methods:
        for key, value in ev.per_method[m].items():
            got = data["per_method"][m][key]
            assert (got is None and np.isnan(value)) or got == pytest.approx(value, rel=1e-5, abs=1e-6), (m, key)
    table = _run("evaluate", str(corpus), *args)
    assert table.returncode == 0, table.stderr
    assert "comp@1" in table.stdout and "Agreement (Spearman" in table.stdout
    assert all(m in table.stdout for m in ev.methods)


def test_compare_one_text(model_dir):
    out = _run("compare", TEXTS[0], "--model", str(model_dir), "--methods", "leave_one_out", "lrp", "--k", "1", "0.5")
    assert out.returncode == 0, out.stderr
    assert "comp@0.5" in out.stdout and "Predicted:" in out.stdout


def test_bad_corpus_files_are_clear_errors(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"txt": 3}\n')
    out = _run("evaluate", str(bad), "--model", str(model_dir))
    assert out.returncode == 2 and "bad.jsonl:2" in out.stderr
    out = _run("evaluate", str(tmp_path / "missing.txt"), "--model", str(model_dir))
    assert out.returncode == 2 and "no such file" in out.stderr


def test_read_corpus_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [
        {"text": "the cat sat", "rationale": [0, 1, 0]},
        {"text": "a dog"},
        {"paraphrase": ["the cat sat", "the dog sat"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    texts, rationales, pairs = read_corpus(str(path))
    assert texts == ["the cat sat", "a dog"] and rationales == [[0, 1, 0], None]
    assert pairs == [("the cat sat", "the dog sat")]


def test_markdown_and_text_tables(evaluation):
    _, ev = evaluation
    md = report.markdown_table(ev)
    assert md.count("\n") == 1 + len(ev.methods) and "| lrp |" in md
    assert f"{ev.per_method['lrp']['abpc']:.3f}" in md


def test_plots_are_png_files(evaluation, tmp_path):
    ex, ev = evaluation
    paths = report.write_plots(ev, tmp_path / "figs", ex=ex)
    assert sorted(p.name for p in paths) == ["agreement.png", "deletion_curves.png", "rollout_matrix.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is installed by .ci/run (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(evaluation, tmp_path):
    ex, ev = evaluation
    path = report.write_html(ev, tmp_path / "report.html", model_name="tiny-llama", ex=ex)
    source = path.read_text()
    assert "http://" not in source and "https://" not in source  # self-contained: nothing fetched
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run([*common, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr
    parsed = _Collector()
    parsed.feed(dom.stdout)
    text = " ".join(parsed.text)
    assert "Per-method summary" in text and all(m in text for m in ev.methods)
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == 3 and all(a["src"].startswith("data:image/png;base64,") for a in images)
    spans = [attrs for tag, attrs in parsed.tags if tag == "span" and attrs.get("class") == "tok"]
    assert len(spans) == sum(len(a.tokens) for a in ev.attributions["rollout"]) * len(ev.methods)
    # and it paints: a screenshot that is not blank
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,1600", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.exists(), run.stderr
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert (pixels.mean(-1) < 0.9).mean() > 0.02  # text, colored cells and figures cover the page
    assert np.unique(pixels.reshape(-1, 3), axis=0).shape[0] > 50  # many colors: heat maps and plots
