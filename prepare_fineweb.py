"""Tokenize FineWeb-Edu (or local text) into a GPT-2 token file for training. See README.md and `--help`.

python prepare_fineweb.py --tokens 100M --output fineweb_100m.npy
python prepare_fineweb.py --tokens 1M --output local.npy --source data/*.parquet --workers 2
"""

import sys
from pathlib import Path

from production.core.entry import Parser, command
from production.core.errors import UserError
from production.data.tokenize import default_workers, parse_count

try:  # `datasets` (with pyarrow) is an optional install: only data preparation needs it
    from production.data.prepare import PrepareArgs, default_config, prepare

    MISSING = None
except ModuleNotFoundError as e:
    if e.name not in ("datasets", "pyarrow"):
        raise
    MISSING = e.name


def build_parser() -> Parser:
    p = Parser(
        prog="prepare_fineweb.py",
        description="Stream FineWeb-Edu (or local parquet/jsonl/txt files) "
        "through the GPT-2 tokenizer into a uint16 token file.",
    )
    p.add_argument("--tokens", required=True, help="exact number of tokens to write: 250K, 100M, 1.5B or an int")
    p.add_argument("--output", required=True, type=Path, help="output .npy (or .bin / a folder of .bin shards)")
    p.add_argument(
        "--source",
        nargs="+",
        default=["hf"],
        metavar="PATH",
        help="hf (stream HuggingFaceFW/fineweb-edu) or local files/folders with a `text` field",
    )
    p.add_argument("--config", help="fineweb-edu config (default sample-10BT; sample-100BT above ~9.5B tokens)")
    p.add_argument(
        "--workers", type=int, default=default_workers(), help="tokenizer processes (default: the usable CPU cores)"
    )
    p.add_argument("--format", choices=["npy", "bin"], help="npy (default) or llm.c .bin shards")
    p.add_argument("--shard-tokens", default="100M", help="tokens per .bin shard when --output is a folder")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    return p


@command(interrupted="interrupted; nothing was written to the output (its temp file is removed)")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if MISSING:
        raise UserError(f"prepare_fineweb.py needs the `{MISSING}` package: pip install -r requirements-prepare.txt")
    n = parse_count(args.tokens)
    hub = args.source == ["hf"]
    if not hub and "hf" in args.source:
        raise UserError("--source takes either hf or local paths, not both")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    fmt = args.format or ("bin" if args.output.suffix == ".bin" else "npy")
    if fmt == "npy" and args.output.suffix != ".npy":
        raise UserError(f"a .npy output must end in .npy, got {args.output}")
    config = args.config or default_config(n)
    if hub and args.config is None and config != "sample-10BT":
        print(f"note: {n:,} tokens exceed what sample-10BT holds; streaming config {config}")
    prepare(
        PrepareArgs(
            n_tokens=n,
            output=args.output,
            source=None if hub else args.source,
            config=config,
            workers=args.workers,
            fmt=fmt,
            shard_tokens=parse_count(args.shard_tokens),
            force=args.force,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
