"""What every command shares: a parser whose mistakes are user errors, and the wrapper that turns a user error
into one `error:` line and exit status 2 (a TrainingError into exit 1), with no traceback.

    @command(interrupted="interrupted; ...")
    def main(argv: list[str] | None = None) -> int:
        args = Parser(prog=...).parse_args(argv)
        ...
"""

import argparse
import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from production.core.errors import TrainingError, UserError
from production.core.launch import launch_rank


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows an option's default in its help unless the help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


class Parser(argparse.ArgumentParser):
    """argparse whose usage mistakes raise UserError (so `command` reports them like any other), and whose help
    shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def command(interrupted: str | None = None) -> Callable:
    """Decorator for a command's `main(argv) -> int`. Only rank 0 of a torchrun job prints the error line.
    `interrupted`: the line printed on Ctrl-C (exit 130); without it Ctrl-C propagates."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except (UserError, TrainingError) as e:
                if launch_rank() == 0:
                    print(f"error: {e}", file=sys.stderr)
                return 2 if isinstance(e, UserError) else 1
            except KeyboardInterrupt:
                if interrupted is None:
                    raise
                print(f"\n{interrupted}", file=sys.stderr)
                return 130
            except BrokenPipeError:  # the output went to a reader that stopped early (`| head`): not an error
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush stays quiet
                return 1

        return run

    return wrap


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt: for updates that must not stop
    half-way (an optimizer step, a checkpoint pair). Outside the main thread signals cannot be handled: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt
