"""torchrun's launch contract, read here and only here: RANK, WORLD_SIZE and LOCAL_RANK in the environment tell
a process its place in a job. Everything else is an explicit option."""

import os


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_rank() -> int:
    """This process's rank in a torchrun job (0 outside one): only rank 0 reports errors."""
    return int(os.environ.get("RANK", "0"))


def launch_place() -> tuple[int, int, int]:
    """(rank, world size, local rank) of a torchrun process."""
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
