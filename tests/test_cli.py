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


def test_command_line_errors_exit_2_before_the_model_loads():
    # a model path that does not exist: had the model loaded first, this would be the error
    missing = "/nonexistent/model"
    for args, match in (
        (("explain", "the cat", "--methods", "nosuch"), "unknown method"),
        (("compare", "the cat", "--methods", "rollout,shap"), "unknown method"),
        (("explain", "the cat", "--k", "abc"), "--k values must be ints"),
        (("explain", "the cat", "--k", "0"), "--k values must be ints >= 1"),
        (("compare", "the cat", "--k", "1.5"), "fractions in (0, 1)"),
        (("compare", ""), "empty"),
    ):
        out = _run(*args, "--model", missing)
        assert out.returncode == 2 and match in out.stderr and "usage:" in out.stderr, (args, out.stderr)


def test_a_missing_model_is_one_line_exit_2():
    out = _run("explain", "the cat", "--model", "/nonexistent/path", "--methods", "rollout")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_corpus_files_utf8_bom_binary_and_folders(model_dir, tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffthe cat sat\n".encode())
    out = _run("evaluate", str(bom), "--model", str(model_dir), "--methods", "leave_one_out", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert [r["text"] for r in json.loads(out.stdout)["per_text"]] == ["the cat sat"]  # no [UNK] from the BOM
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    out = _run("evaluate", str(binary), "--model", str(model_dir))
    assert out.returncode == 2 and "weights.bin is not UTF-8" in out.stderr and "Traceback" not in out.stderr
    out = _run("evaluate", str(tmp_path), "--model", str(model_dir))
    assert out.returncode == 2 and "is a directory" in out.stderr


def test_evaluate_where_every_text_fails_is_a_clear_error(model_dir, tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("cat\n")
    out = _run("evaluate", str(corpus), "--model", str(model_dir), "--methods", "sliding_window")
    assert out.returncode == 2 and "no text could be evaluated" in out.stderr and "window_size" in out.stderr
    assert "Traceback" not in out.stderr


def test_explain_on_a_classifier_says_class(tmp_path):
    tiny_llama(classifier=True).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    out = _run("explain", "the cat sat", "--model", str(tmp_path), "--methods", "leave_one_out", "--k", "1")
    assert out.returncode == 0, out.stderr
    assert "Predicted class:" in out.stdout and "next token" not in out.stdout
