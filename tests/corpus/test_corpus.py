"""Corpus jobs, real: files on disk in every input format, Parquet read back with pyarrow, `engine run`
subprocesses killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import assert_within_fp32_noise, float64_copy, make_tokenizer, random_texts, tiny_llama

pa = pytest.importorskip("pyarrow")
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from engine import Explainer, run_corpus  # noqa: E402
from engine.corpus import SCHEMA, SCHEMA_VERSION  # noqa: E402
from engine.corpus.manifest import MANIFEST  # noqa: E402

# every registered method, with options that keep the tiny model's run short
METHODS = {
    "raw_attention": {},
    "rollout": {"head_fusion": "max"},
    "grad_attention": {},
    "lrp": {},
    "integrated_gradients": {"n_steps": 5},
    "leave_one_out": {},
    "sliding_window": {"window_size": 2},
    "shapley": {},
    "shapley_sampling": {"n_samples": 3},
    "kernel_shap": {"n_samples": 16},
}


def read_output(out) -> list[dict]:
    """Every row of the job's output, sorted by (id, method)."""
    rows = ds.dataset(out, format="parquet").to_table().to_pylist()
    return sorted(rows, key=lambda r: (r["id"], r["method"]))


@pytest.fixture(scope="module")
def explainers():
    model, tok = tiny_llama(), make_tokenizer()
    return Explainer(model, tok, progress=False), Explainer(float64_copy(model), tok, progress=False)


def _check_against_facade(rows, texts_by_id, methods, options, ex32, ex64):
    """Rows equal `ex.attribute` of each text: tokens, ids and targets exactly, scores within the
    float32 noise of the float64 run (the job packs texts into other batches than one text alone)."""
    by_key = {(r["id"], r["method"]): r for r in rows}
    assert len(by_key) == len(rows) == len(texts_by_id) * len(methods)  # every (id, method) once
    for m in methods:
        ids = list(texts_by_id)
        texts = [texts_by_id[i] for i in ids]
        exact = ex64.attribute(texts, m, **options.get(m, {}))
        fp32 = ex32.attribute(texts, m, **options.get(m, {}))
        got = [by_key[i, m] for i in ids]
        for r, a in zip(got, exact, strict=True):
            if not a:
                assert r["error"] == f"{type(a.error).__name__}: {a.error}" and r["scores"] is None
                continue
            assert r["error"] is None and r["tokens"] == a.tokens and r["token_ids"] == a.token_ids
            assert r["target_id"] == a.target_id and r["target_token"] == a.target_token
            assert json.loads(r["options"]) == json.loads(json.dumps(a.options))
        ok = [(r, a, b) for r, a, b in zip(got, exact, fp32, strict=True) if a]
        assert_within_fp32_noise(
            [np.array(r["scores"], dtype=np.float64) for r, _, _ in ok],
            [a.scores for _, a, _ in ok],
            [b.scores.astype(np.float32) for _, _, b in ok],  # the float32 run, rounded as stored
            what=m,
        )


def test_every_method_equals_the_facade_and_the_schema_is_v1(tmp_path, explainers):
    ex32, ex64 = explainers
    texts = random_texts(7, 3, 7)
    path = tmp_path / "in.txt"
    path.write_text("\n".join(texts) + "\n")
    summary = run_corpus(path, tmp_path / "out", list(METHODS), options=METHODS, explainer=ex32,
                         model_name="tiny", chunk_texts=3, progress=False)  # fmt: skip
    assert (summary.texts, summary.rows, summary.failures) == (7, 70, 0)
    parts = sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # 3 + 3 + 1 texts
    schema = pq.read_schema(tmp_path / "out" / parts[0])
    assert schema.equals(SCHEMA) and schema.metadata[b"engine.schema_version"] == str(SCHEMA_VERSION).encode()
    rows = read_output(tmp_path / "out")
    _check_against_facade(rows, {str(i): t for i, t in enumerate(texts)}, list(METHODS), METHODS, ex32, ex64)
    window = next(r for r in rows if r["method"] == "sliding_window")
    assert json.loads(window["regions"])[0]["tokens"]
    ig = next(r for r in rows if r["method"] == "integrated_gradients")
    assert ig["completeness_gap"] is not None and window["completeness_gap"] is None
    shap = next(r for r in rows if r["method"] == "shapley_sampling")
    assert len(shap["std_error"]) == len(shap["scores"]) and shap["n_evaluations"] > 0
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["complete"] and sorted(manifest["parts"]) == parts
    assert manifest["fingerprint"]["schema_version"] == SCHEMA_VERSION and manifest["fingerprint"]["model"] == "tiny"


def _write_inputs(tmp_path, records):
    """The same records as .jsonl, one .parquet, and a folder of two .parquet files."""
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = pa.Table.from_pylist(records)
    single = tmp_path / "in.parquet"
    pq.write_table(table, single)
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(table.slice(0, 3), folder / "a.parquet")
    pq.write_table(table.slice(3), folder / "b.parquet")
    return {"jsonl": jsonl, "parquet": single, "folder": folder}


def test_input_formats_ids_targets_and_a_bad_text_in_the_middle(tmp_path, explainers):
    ex32, ex64 = explainers
    texts = random_texts(5, 3, 7)
    target = ex32.tokenizer.convert_ids_to_tokens(5)
    records = [{"id": f"doc-{i}", "text": t, "target": target if i % 2 else None} for i, t in enumerate(texts)]
    records.insert(2, {"id": "bad", "text": "   ", "target": None})  # a text that fails, mid-corpus
    methods = ["leave_one_out", "rollout"]
    outputs = {}
    for kind, path in _write_inputs(tmp_path, records).items():
        out = tmp_path / f"out-{kind}"
        summary = run_corpus(path, out, methods, explainer=ex32, model_name="tiny", chunk_texts=2, progress=False)
        assert (summary.texts, summary.rows, summary.failures) == (6, 12, 2), kind
        outputs[kind] = read_output(out)
    # the same rows from every format: exactly, but for the floats, which two chunks in flight may
    # compute in other batch layouts: those within the float32 noise of the float64 run
    floats = ("scores", "target_prob", "target_logit")
    strip = [[{k: v for k, v in r.items() if k not in floats} for r in rows] for rows in outputs.values()]
    assert strip[0] == strip[1] == strip[2]
    for kind, rows in outputs.items():
        for m in methods:
            got, exact, fp32 = [], [], []
            for i, t in enumerate(texts):
                tgt = target if i % 2 else None
                got.append(np.array(next(r for r in rows if r["id"] == f"doc-{i}" and r["method"] == m)["scores"]))
                exact.append(ex64.attribute(t, m, target=tgt).scores)
                fp32.append(ex32.attribute(t, m, target=tgt).scores.astype(np.float32))
            assert_within_fp32_noise(got, exact, fp32, what=f"{kind} {m}")
    rows = {(r["id"], r["method"]): r for r in outputs["jsonl"]}
    assert rows["bad", "rollout"]["error"] == "ValueError: text is empty or whitespace only"
    assert rows["bad", "rollout"]["tokens"] is None
    for i, t in enumerate(texts):
        want = ex32.attribute(t, "leave_one_out", target=target if i % 2 else None)
        got = rows[f"doc-{i}", "leave_one_out"]
        assert got["target_id"] == want.target_id and got["tokens"] == want.tokens
    assert rows["doc-1", "rollout"]["target_id"] == 5  # the given target, not the prediction

    txt = tmp_path / "in.txt"
    txt.write_text("\n".join(r["text"] for r in records) + "\n")
    run_corpus(txt, tmp_path / "out-txt", ["rollout"], explainer=ex32, model_name="tiny", progress=False)
    got = read_output(tmp_path / "out-txt")
    assert [r["id"] for r in got] == [str(i) for i in range(6)] and got[2]["error"].startswith("ValueError")


def test_saved_hf_dataset(tmp_path, explainers):
    datasets = pytest.importorskip("datasets")
    ex32, _ = explainers
    texts = random_texts(4, 3, 7)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    run_corpus(tmp_path / "ds", tmp_path / "out", ["rollout"], explainer=ex32, model_name="tiny", progress=False)
    rows = read_output(tmp_path / "out")
    assert [r["tokens"] for r in rows] == [ex32.attribute(t, "rollout").tokens for t in texts]


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"id": 1, "text": "a b"}\n{"id": 1, "text": "c d"}\n', "duplicate id '1'"),
        ('{"text": "a b"}\nnot json\n', "line 2: not JSON"),
        ('{"txt": "a b"}\n', 'expected an object with "text"'),
        ('{"text": "a b", "target": 1.5}\n', "target must be"),
        ("", "holds no text"),
    ],
)
def test_bad_input_is_refused_before_any_work(tmp_path, explainers, content, message):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        run_corpus(path, tmp_path / "out", ["rollout"], explainer=explainers[0], progress=False)
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_arguments(tmp_path, explainers):
    path = tmp_path / "in.txt"
    path.write_text("a b c\n")
    ex = explainers[0]
    for kwargs, error, message in [
        ({"methods": ["nosuch"]}, ValueError, "unknown method"),
        ({"methods": ["rollout"], "options": {"rollout": {"nosuch": 1}}}, ValueError, "nosuch"),
        ({"methods": ["rollout"], "options": {"lrp": {}}}, ValueError, "not run"),
        ({"methods": ["rollout"], "chunk_texts": 0}, ValueError, "chunk_texts"),
        ({"methods": ["rollout"], "backend": "spark"}, ValueError, "backend"),
        ({"methods": ["rollout"], "workers": 2}, ValueError, "backend='ray'"),
    ]:
        with pytest.raises(error, match=message):
            run_corpus(path, tmp_path / "out", explainer=ex, progress=False, **kwargs)
    with pytest.raises(FileNotFoundError):
        run_corpus(tmp_path / "nowhere.txt", tmp_path / "out", ["rollout"], explainer=ex)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="unsupported input"):
        run_corpus(tmp_path / "x.csv", tmp_path / "out", ["rollout"], explainer=ex)


def test_another_fingerprint_is_refused_unless_overwrite(tmp_path, explainers):
    ex = explainers[0]
    path = tmp_path / "in.txt"
    path.write_text("a b c\nd e f g\n")
    out = tmp_path / "out"
    run_corpus(path, out, ["rollout"], explainer=ex, model_name="tiny", progress=False)
    again = run_corpus(path, out, ["rollout"], explainer=ex, model_name="tiny", progress=False)
    assert again.computed_texts == 0 and again.rows == 2  # complete: nothing recomputed
    with pytest.raises(ValueError, match="another job.*methods"):
        run_corpus(path, out, ["leave_one_out"], explainer=ex, model_name="tiny", progress=False)
    path.write_text("a b c\nd e f h\n")  # the input changed
    with pytest.raises(ValueError, match="input_sha256"):
        run_corpus(path, out, ["rollout"], explainer=ex, model_name="tiny", progress=False)
    summary = run_corpus(path, out, ["leave_one_out"], explainer=ex, model_name="tiny", progress=False, overwrite=True)
    assert summary.computed_texts == 2 and {r["method"] for r in read_output(out)} == {"leave_one_out"}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "part-00000.parquet").write_text("x")
    with pytest.raises(ValueError, match="no _manifest.json"):
        run_corpus(path, foreign, ["rollout"], explainer=ex, progress=False)


def _engine_run(model_dir, source, out, *extra):
    return [sys.executable, "-m", "engine", "run", str(source), "--out", str(out), "--model", str(model_dir),
            "--methods", "leave_one_out,integrated_gradients", "--options", '{"integrated_gradients": {"n_steps": 24}}',
            "--chunk-texts", "3", "--quiet", *extra]  # fmt: skip


def _committed(out) -> int:
    try:
        return len(json.loads((out / MANIFEST).read_text())["parts"])
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def test_kill_9_at_three_points_then_resume_equals_an_uninterrupted_run(tmp_path, model_dir):
    texts = random_texts(30, 4, 12)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert subprocess.run(_engine_run(model_dir, source, whole), capture_output=True).returncode == 0
    kills = []
    for at in (0, 2, 6):  # no part yet (the manifest just written), then after 2 and after 6 of 10 parts
        proc = subprocess.Popen(
            _engine_run(model_dir, source, resumed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 300
        while _committed(resumed) < at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
        kills.append(_committed(resumed))
        assert not json.loads((resumed / MANIFEST).read_text())["complete"]
    print("kills at committed parts:", kills)
    assert kills[0] >= 0 and kills == sorted(kills) and kills[-1] < 10, kills
    done = subprocess.run(_engine_run(model_dir, source, resumed), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not [p for p in os.listdir(resumed) if p.startswith(".")]  # no temporary file left
    a, b = read_output(whole), read_output(resumed)
    assert [(r["id"], r["method"]) for r in a] == [(r["id"], r["method"]) for r in b]  # exactly once each
    assert len({(r["id"], r["method"]) for r in b}) == len(b) == 60
    for x, y in zip(a, b, strict=True):
        assert x["tokens"] == y["tokens"] and x["target_id"] == y["target_id"] and x["error"] == y["error"]
    ex32 = Explainer.from_pretrained(str(model_dir), progress=False)
    ex64 = Explainer.from_pretrained(str(model_dir), dtype="float64", progress=False)
    options = {"integrated_gradients": {"n_steps": 24}}
    for rows in (a, b):  # both runs within the float32 noise of the float64 run (batches differ)
        _check_against_facade(rows, {str(i): t for i, t in enumerate(texts)}, ["leave_one_out", "integrated_gradients"],
                              options, ex32, ex64)  # fmt: skip


def test_engine_run_compile_equals_the_facade(tmp_path, model_dir):
    """`engine run --compile` (the decoder's MLPs and norms through torch.compile) writes the rows the
    uncompiled facade gives, within the float32 noise of the float64 run."""
    texts = random_texts(6, 3, 9)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n")
    done = subprocess.run(_engine_run(model_dir, source, tmp_path / "out", "--compile"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ex32 = Explainer.from_pretrained(str(model_dir), progress=False)
    ex64 = Explainer.from_pretrained(str(model_dir), dtype="float64", progress=False)
    _check_against_facade(read_output(tmp_path / "out"), {str(i): t for i, t in enumerate(texts)},
                          ["leave_one_out", "integrated_gradients"], {"integrated_gradients": {"n_steps": 24}},
                          ex32, ex64)  # fmt: skip


def test_engine_run_cli_errors_exit_2(tmp_path, model_dir):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "a b"}\n{"id": 1, "text": "c d"}\n')
    for args, message in [
        ([str(source), "--out", str(tmp_path / "o"), "--model", str(model_dir)], "duplicate id"),
        ([str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")], "no such input"),
        ([str(source), "--out", str(tmp_path / "o"), "--options", "{bad"], "--options is not JSON"),
    ]:
        done = subprocess.run([sys.executable, "-m", "engine", "run", *args], capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.fixture(scope="module")
def local_ray():
    """Ray on this machine, loopback only; skipped (with the sockets that break the rule) where any
    socket of its processes is on another address."""
    ray = pytest.importorskip("ray", reason='the Ray backend needs the ray extra: pip install -e ".[ray]"')
    from engine.corpus.ray_job import loopback_violations, start_local_ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(num_cpus=2)
    bad = loopback_violations()
    if bad:
        ray.shutdown()
        pytest.skip(f"Ray holds sockets off loopback, so it may not run here: {'; '.join(bad[:4])}")
    yield loopback_violations
    ray.shutdown()


@pytest.mark.ray
def test_ray_backend_on_a_2_worker_local_cluster_equals_the_local_backend(tmp_path, model_dir, local_ray):
    texts = random_texts(8, 3, 8)
    records = [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)]
    records.insert(4, {"id": "bad", "text": ""})
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    methods, options = ["leave_one_out", "rollout"], {"rollout": {"head_fusion": "max"}}
    common = {"options": options, "model": str(model_dir), "chunk_texts": 2, "progress": False}
    on_ray = run_corpus(source, tmp_path / "ray", methods, backend="ray", workers=2, **common)
    assert not local_ray()  # the workers' sockets too, after the work
    local = run_corpus(source, tmp_path / "local", methods, **common)
    assert (on_ray.texts, on_ray.rows, on_ray.failures) == (local.texts, local.rows, local.failures) == (9, 18, 2)
    a, b = read_output(tmp_path / "ray"), read_output(tmp_path / "local")
    assert [(r["id"], r["method"]) for r in a] == [(r["id"], r["method"]) for r in b]  # each once
    for x, y in zip(a, b, strict=True):
        assert x["tokens"] == y["tokens"] and x["target_id"] == y["target_id"] and x["error"] == y["error"]
    manifests = [json.loads((tmp_path / d / MANIFEST).read_text()) for d in ("ray", "local")]
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"] and manifests[0]["complete"]
    assert sorted(manifests[0]["parts"]) == sorted(manifests[1]["parts"])
    ex32 = Explainer.from_pretrained(str(model_dir), progress=False)
    ex64 = Explainer.from_pretrained(str(model_dir), dtype="float64", progress=False)
    good = {r["id"]: r["text"] for r in records}
    _check_against_facade(a, good, methods, options, ex32, ex64)
    again = run_corpus(source, tmp_path / "ray", methods, **common)  # the same job, on the local backend
    assert again.computed_texts == 0
