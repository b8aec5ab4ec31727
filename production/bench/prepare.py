"""Benchmark of prepare_fineweb.py on a local source: tokens/s by worker count, and peak memory by target size.

    python -m production.bench.prepare --tokens 3M --workers 1,2 --memory-targets 100K,1M

Writes a local parquet with FineWeb-Edu's `text` column (the embedded plays, paragraph by paragraph, repeated
until the source holds the largest target), then runs the real command once per setting in a fresh process
and reports wall time, tokens/s (tokenization and writing, from the sidecar) and the peak RSS of the largest
process involved.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from production.core.entry import Parser, command
from production.core.layout import REPO_ROOT
from production.core.runtime import maxrss_bytes
from production.data.corpus import clean_play, play_files
from production.data.tokenize import parse_count

# runs a command and prints the raw ru_maxrss (KiB on Linux, bytes on macOS) of its largest descendant
PEAK_WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def write_source(path: Path, n_tokens: int) -> None:
    """Paragraphs of the plays, repeated with a round number so documents differ, ~4 chars per token."""
    paras = [p for f in play_files() for p in clean_play(f.read_text()).split("\n\n") if p.strip()]
    texts, chars, r = [], 0, 0
    while chars < 4.5 * n_tokens:
        for p in paras:
            texts.append(f"{p}\n({r})")
            chars += len(texts[-1])
        r += 1
    pq.write_table(pa.table({"text": texts, "id": [str(i) for i in range(len(texts))]}), path, row_group_size=2000)


def run_once(source: Path, out: Path, n_tokens: int, workers: int) -> dict:
    cmd = [
        sys.executable,
        str(REPO_ROOT / "prepare_fineweb.py"),
        "--tokens",
        str(n_tokens),
        "--output",
        str(out),
        "--source",
        str(source),
        "--workers",
        str(workers),
        "--force",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], capture_output=True, text=True, cwd=REPO_ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    side = json.loads(out.with_name(out.name + ".json").read_text())
    return {
        "tokens": side["tokens"],
        "workers": workers,
        "wall_s": wall,
        "tokens_per_s": side["tokens_per_s"],
        "peak_rss_mib": maxrss_bytes(int(proc.stdout.strip().splitlines()[-1])) / 2**20,
    }


@command()
def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m production.bench.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="3M", help="target of the worker comparison")
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--memory-targets", default="100K,1M", help="targets whose peak memory is compared")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    n = parse_count(args.tokens)
    workers = [int(w) for w in args.workers.split(",")]
    targets = [parse_count(t) for t in args.memory_targets.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source.parquet"
        write_source(source, max([n, *targets]))
        speed = [run_once(source, Path(tmp) / "out.npy", n, w) for w in workers]
        memory = [run_once(source, Path(tmp) / "out.npy", t, workers[-1]) for t in targets]
    report = {"speed": speed, "memory": memory, "speedup": speed[-1]["tokens_per_s"] / speed[0]["tokens_per_s"]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for r in speed:
        print(
            f"workers={r['workers']}: {r['tokens']:,} tokens, {r['tokens_per_s']:,.0f} tok/s, wall {r['wall_s']:.1f}s"
        )
    print(f"speedup workers={workers[-1]} vs {workers[0]}: {report['speedup']:.2f}x")
    for r in memory:
        print(f"target {r['tokens']:,} tokens: peak RSS {r['peak_rss_mib']:.0f} MiB (largest process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
