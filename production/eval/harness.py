"""`python -m production.eval.harness --model dba --model_args ckpt=RUN/best.pt --tasks lambada_openai ...`:
lm-evaluation-harness's own command line with this harness's checkpoints registered as the model `dba`
(production.eval.lm_adapter). Every lm-eval flag works as documented by lm-eval; lm-eval itself is an optional
install: pip install -r requirements-lm-eval.txt."""

from __future__ import annotations

import sys

from production.core.entry import command
from production.core.errors import UserError

try:  # an optional install: only this command needs lm-eval
    from lm_eval.__main__ import cli_evaluate

    import production.eval.lm_adapter  # noqa: F401  (registers the model "dba")

    MISSING = None
except ModuleNotFoundError as e:
    if e.name is None or e.name.split(".")[0] != "lm_eval":
        raise
    MISSING = e.name


@command(interrupted="interrupted; lm-eval wrote no results")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if MISSING:
        raise UserError("the lm-eval adapter needs lm-evaluation-harness: pip install -r requirements-lm-eval.txt")
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's CLI reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
