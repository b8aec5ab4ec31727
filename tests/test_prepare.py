"""prepare_fineweb.py on local files with FineWeb-Edu's columns, against an independent single-process
tiktoken encoding."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

OPTIONAL = "data preparation is an optional install: pip install -r requirements-prepare.txt"
pytest.importorskip("datasets", reason=OPTIONAL)
pa = pytest.importorskip("pyarrow", reason=OPTIONAL)

import pyarrow.parquet as pq  # noqa: E402

import prepare_fineweb  # noqa: E402
from conftest import REPO, call  # noqa: E402
from production.core.errors import UserError  # noqa: E402
from production.data.corpus import clean_play, play_files  # noqa: E402
from production.data.files import open_tokens  # noqa: E402
from production.data.prepare import PrepareArgs, prepare  # noqa: E402
from production.data.tokenize import parse_count  # noqa: E402

EXTRA = ["naïve café — “quotes” 😀 <|endoftext|> in text", "", "   ", "line\r\nbreaks\tand tabs"]


@pytest.fixture(scope="module")
def texts():
    """Real English documents: paragraphs of the embedded plays, plus edge cases."""
    paras = [p for f in play_files()[:3] for p in clean_play(f.read_text()).split("\n\n") if p.strip()]
    return EXTRA + paras[:3000]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, texts):
    """The documents split over a parquet file (FineWeb-Edu's columns), a jsonl file and a txt file."""
    d = tmp_path_factory.mktemp("src")
    a, b, c = texts[:1500], texts[1500:2900], texts[2900:]
    n = len(a)
    table = pa.table(
        {
            "text": a,
            "id": [f"<urn:uuid:{i}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{i}" for i in range(n)],
            "date": ["2024-02-20T00:00:00Z"] * n,
            "file_path": ["s3://commoncrawl/x.warc.gz"] * n,
            "language": ["en"] * n,
            "language_score": [0.97] * n,
            "token_count": [len(t) // 4 for t in a],
            "score": [3.1] * n,
            "int_score": [3] * n,
        }
    )
    pq.write_table(table, d / "part-0.parquet", row_group_size=300)
    with open(d / "part-1.jsonl", "w") as f:
        for i, t in enumerate(b):
            f.write(json.dumps({"text": t, "id": str(i), "score": 2.5, "int_score": 2}) + "\n")
    (d / "part-2.txt").write_text("\n".join(c))  # a txt file is one document
    return d, ["\n".join(c)]


@pytest.fixture(scope="module")
def reference(tiktoken_gpt2, texts, sources):
    docs = texts[:2900] + sources[1]
    return np.array([t for doc in docs for t in (50256, *tiktoken_gpt2.encode_ordinary(doc))], dtype=np.uint16)


def run_prepare(*args):
    """prepare_fineweb.py, in this process."""
    return call(prepare_fineweb.main, *args)


def test_parse_count():
    assert [parse_count(t) for t in ("250K", "100M", "1.5B", "12345", "2k")] == [
        250_000,
        10**8,
        1_500_000_000,
        12345,
        2000,
    ]
    for bad in ("12X", "-5", "0", "1.5", "M"):
        with pytest.raises(UserError):
            parse_count(bad)


@pytest.mark.parametrize("workers", [1, 2])
def test_output_equals_single_process_tiktoken_with_eot(tmp_path, sources, reference, workers):
    d, _ = sources
    n = len(reference) - 1234  # stop inside the last document
    out = tmp_path / "tok.npy"
    proc = run_prepare(
        "--tokens",
        n,
        "--output",
        out,
        "--source",
        d / "part-0.parquet",
        d / "part-1.jsonl",
        d / "part-2.txt",
        "--workers",
        workers,
    )
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)
    assert got.dtype == np.uint16 and len(got) == n
    np.testing.assert_array_equal(got, reference[:n])
    side = json.loads((tmp_path / "tok.npy.json").read_text())
    assert side["tokens"] == n and side["documents"] == int((reference[:n] == 50256).sum())
    assert side["sha256"] == __import__("hashlib").sha256(reference[:n].tobytes()).hexdigest()
    assert side["vocab_size"] == 50257 and side["format"] == "npy" and side["workers"] == workers
    assert "gpt2" in side["tokenizer"] and len(side["source"]) == 3 and side["created"]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_folder_source_and_early_end(tmp_path, sources, reference):
    d, _ = sources
    out = tmp_path / "all.npy"
    proc = run_prepare("--tokens", "10M", "--output", out, "--source", d, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "source ended" in proc.stdout
    np.testing.assert_array_equal(np.load(out), reference)  # folder read in name order; header shrunk in place
    assert json.loads((tmp_path / "all.npy.json").read_text())["tokens"] == len(reference)


def test_llmc_bin_single_file_and_shards(tmp_path, sources, reference):
    d, _ = sources
    single = tmp_path / "tok.bin"
    assert run_prepare("--tokens", "20000", "--output", single, "--source", d, "--workers", "1").returncode == 0
    header = np.fromfile(single, dtype=np.int32, count=256)
    assert (header[0], header[1], header[2]) == (20240520, 1, 20000)
    np.testing.assert_array_equal(np.fromfile(single, dtype=np.uint16, offset=1024), reference[:20000])
    shards = tmp_path / "shards"
    proc = run_prepare(
        "--tokens",
        "25000",
        "--output",
        shards,
        *"--format bin --shard-tokens 10K --source".split(),
        d,
        "--workers",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in shards.iterdir()) == [f"shards_{i:06d}.bin" for i in range(3)]
    stream, fmt = open_tokens(shards)  # the trainer reads the folder as one sequence
    assert fmt == "shards(3)" and len(stream) == 25000
    np.testing.assert_array_equal(stream.window(0, 25000), reference[:25000])


def test_skip_refuse_and_force(tmp_path, sources):
    d, _ = sources
    out = tmp_path / "t.npy"
    assert run_prepare("--tokens", "5000", "--output", out, "--source", d, "--workers", "1").returncode == 0
    mtime = out.stat().st_mtime_ns
    again = run_prepare("--tokens", "5000", "--output", out, "--source", d, "--workers", "1")
    assert again.returncode == 0 and "nothing to do" in again.stdout and out.stat().st_mtime_ns == mtime
    other = run_prepare("--tokens", "6000", "--output", out, "--source", d, "--workers", "1")
    assert other.returncode == 2 and "--force" in other.stderr and "Traceback" not in other.stderr
    assert out.stat().st_mtime_ns == mtime
    forced = run_prepare("--tokens", "6000", "--output", out, "--source", d, "--workers", "1", "--force")
    assert forced.returncode == 0 and len(np.load(out)) == 6000


def test_clear_errors(tmp_path, sources):
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text(json.dumps({"content": "hello", "id": 1}) + "\n")
    proc = run_prepare("--tokens", "100", "--output", tmp_path / "x.npy", "--source", no_text)
    assert proc.returncode == 2 and "no `text` field" in proc.stderr and "content" in proc.stderr
    assert not (tmp_path / "x.npy").exists()
    proc = run_prepare("--tokens", "1.5X", "--output", tmp_path / "x.npy", "--source", no_text)
    assert proc.returncode == 2 and "--tokens" in proc.stderr
    proc = run_prepare("--tokens", "100", "--output", tmp_path / "x.npy", "--source", tmp_path / "missing.parquet")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_hub_unreachable_says_how_to_use_local_files(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # no network here
    args = [sys.executable, str(REPO / "prepare_fineweb.py"), "--tokens", "1000", "--output", str(tmp_path / "fw.npy")]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "HuggingFaceFW/fineweb-edu" in proc.stderr and "--source PATH" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "fw.npy").exists()


def test_local_files_stream_through_datasets_and_interruption_leaves_nothing(tmp_path, sources, monkeypatch):
    import datasets

    d, _ = sources
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    out = tmp_path / "t.npy"
    prepare(PrepareArgs(3000, out, [str(d / "part-0.parquet")], "sample-10BT", 1, "npy", 10**8, False))
    assert calls[0][0] == ("parquet",) and calls[0][1]["streaming"] is True

    import production.data.prepare as prep

    def interrupted(*a, **k):
        yield ["some text " * 50]
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "iter_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareArgs(3000, tmp_path / "u.npy", ["x"], "sample-10BT", 1, "npy", 10**8, False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npy", "t.npy.json"]  # no partial, no u.npy
