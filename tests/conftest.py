import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# A tiny but real training config: nano presets with one narrow layer and short windows.
TINY = [
    "--size",
    "nano",
    "--n-layer",
    "1",
    "--d-model",
    "64",
    "--d-ff",
    "128",
    "--block",
    "32",
    "--batch-size",
    "4",
    "--device",
    "cpu",
    "--no-compile",
]


def run_main(*args, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    """Run `python main.py ARGS` as a user would; returns the completed process (text output)."""
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, one `error:` line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


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
