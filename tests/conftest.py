import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

# Triton kernels run on CPU tensors through Triton's interpreter when no GPU is here; the switch is read when a
# kernel is decorated, so it is set before the project is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the top-level scripts (run_paper_manifest.py, ...) import as modules

from production.cli.main import main as main_py  # noqa: E402
from production.data.tokenizer import gpt2_files  # noqa: E402

# A tiny but real training config: nano presets with one narrow layer and short windows.
TINY = "--size nano --n-layer 1 --d-model 64 --d-ff 128 --block 32 --batch-size 4 --device cpu --no-compile".split()


INDUCTOR_CACHE = tempfile.mkdtemp(prefix="dba-tests-torchinductor-")


def pytest_configure(config):
    """torch makes its compile-cache folder (<temp>/torchinductor_<user>) as soon as torch.nn.attention.bias is
    imported, at collection: point it at a folder this session removes."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = INDUCTOR_CACHE


def pytest_unconfigure(config):
    shutil.rmtree(INDUCTOR_CACHE, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/*.json from this run")


@dataclass
class Result:
    """What a command printed and returned (the fields of subprocess.CompletedProcess)."""

    returncode: int
    stdout: str
    stderr: str


def call(main, *args) -> Result:
    """Run a command's `main(argv)` in this process, as a user runs it from a shell, capturing its output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # --help
            code = e.code
    return Result(code, out.getvalue(), err.getvalue())


def run_main(*args) -> Result:
    """`python main.py ARGS`, in this process."""
    return call(main_py, *args)


def train_tiny(out: Path, data: Path, *args) -> Path:
    """A real training run of the TINY config on `data` into `out` (args: more flags); asserts that it finished."""
    proc = run_main("--mode", "train", *TINY, "--data", data, "--out-dir", out, *args)
    assert proc.returncode == 0, proc.stderr
    return out


def run_script(script: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """A real subprocess, for the few end-to-end checks of the scripts as files."""
    command = [sys.executable, str(REPO / script), *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc, *fragments: str) -> None:
    """Exit 2, one `error:` line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


def checkout_runs() -> dict[str, str]:
    """sha256 of every file under the checkout's runs/ (the user's runs and decision store)."""
    root = REPO / "runs"
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="session", autouse=True)
def _session_cwd(tmp_path_factory):
    """Module fixtures run here too: nothing a test writes by default lands in the checkout (runs/, tuner.json).
    Temporary files of the tests and of their subprocesses (torchrun's torchelastic_* folders) go under pytest's
    own temporary directory, which pytest removes (pyproject: tmp_path_retention_policy)."""
    before = checkout_runs()
    temp = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        mp.setenv("TMPDIR", str(temp))
        mp.setattr(tempfile, "tempdir", str(temp))
        yield
    assert checkout_runs() == before, "the test suite wrote into the checkout's runs/"


@pytest.fixture(autouse=True)
def _test_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def token_file(tmp_path_factory) -> Path:
    """40k tokens of a learnable synthetic language (a noisy repeating pattern) as a uint16 .npy."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 50257, size=97)
    tokens = np.resize(pattern, 40_000).astype(np.uint16)
    noise = rng.random(tokens.shape) < 0.05
    tokens[noise] = rng.integers(0, 50257, size=int(noise.sum()))
    path = tmp_path_factory.mktemp("data") / "tokens.npy"
    np.save(path, tokens)
    return path


@pytest.fixture(scope="session")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken's own get_encoding("gpt2"), offline: its cache is filled with the locally installed files under
    the names of the URLs it would download (tiktoken checks their sha256 on read)."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for path in gpt2_files():
        shutil.copy(path, cache / hashlib.sha1((base + path.name).encode()).hexdigest())
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    tiktoken.registry.ENCODINGS.pop("gpt2", None)
    enc = tiktoken.get_encoding("gpt2")
    yield enc
    tiktoken.registry.ENCODINGS.pop("gpt2", None)
    mp.undo()
