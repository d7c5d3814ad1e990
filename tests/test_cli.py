"""`engine explain` as a real process on a real model folder."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import References, assert_matches_reference, make_tokenizer, tiny_llama

from engine import reference as ref

TEXT = "the cat sat on the mat because it was"


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=timeout)


def test_explain_json_equals_reference(model_dir):
    out = _run("explain", TEXT, "--model", str(model_dir), "--methods", "leave_one_out,rollout", "--format", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    model, tok = tiny_llama(), make_tokenizer()
    refs = References(model)
    assert report["prediction"]["token"] == ref.get_prediction(model, tok, TEXT)
    loo = report["methods"]["leave_one_out"]["scores"]
    assert_matches_reference(loo, refs, lambda m: ref.leave_one_out_attribution(m, tok, TEXT)[0], what="leave_one_out")
    assert_matches_reference(report["methods"]["rollout"]["scores"], refs, ref.compute_rollout, tok, TEXT)
    assert set(report["faithfulness"]["rollout"]) == {"k=1", "k=3", "k=5"}
    assert len(report["top_k"]["rollout"]) == 3
    assert report["spearman"]["methods"] == ["leave_one_out", "rollout"]


def test_explain_table_has_every_section(model_dir):
    out = _run("explain", "the cat sat", "--model", str(model_dir), "--methods", "raw_attention", "sliding_window")
    assert out.returncode == 0, out.stderr
    for heading in ("Predicted next token", "raw_attention (min-max", "Spearman", "Top-3", "Faithfulness"):
        assert heading in out.stdout
    assert "k = [5] skipped" in out.stdout  # 3 tokens: k=5 cannot be evaluated


def test_explain_bad_input(model_dir):
    out = _run("explain", "the cat", "--model", str(model_dir), "--methods", "shap")
    assert out.returncode != 0 and "unknown method" in out.stderr
    out = _run("explain", "   ", "--model", str(model_dir), "--methods", "rollout")
    assert out.returncode == 2 and "empty" in out.stderr
