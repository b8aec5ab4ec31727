"""`python main.py --mode train|sample|export|eval|upcycle ...`: the parser, generated from
production.config.fields, the mode checks, and the dispatch to the mode's command. Nothing here imports torch, so
`--help` and usage mistakes answer at once.

User mistakes print one `error: ...` line and exit 2 before any file of an earlier run is touched.
"""

import importlib
import sys

from production.cli.checks import CHECKS
from production.config.fields import add_arguments, check_mode, given, with_defaults
from production.core.entry import Parser, command


def build_parser() -> Parser:
    p = Parser(
        prog="main.py",
        description="Decoupled Bottleneck Attention: train GPT-style models with four attention variants, "
        "sample from them with quantized KV caches, evaluate them past their training length, export them as "
        "safetensors, and upcycle trained standard/GQA models (or Hugging Face Llamas) into DBA.",
    )
    add_arguments(p, group_by_mode=True)
    return p


@command(interrupted="interrupted before anything was saved; the same command starts over")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    values = given(build_parser().parse_args(argv))
    mode = with_defaults(values)["mode"]
    check_mode(values, mode)
    CHECKS[mode](with_defaults(values))
    # The one lazy import of the project: torch and the mode's command load only once the arguments parse.
    mode_command = importlib.import_module(f"production.cli.{mode}")
    return mode_command.run(values, argv)
