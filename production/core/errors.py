"""The two ways a command ends on purpose: a user mistake (exit 2) or a run that cannot go on (exit 1)."""


class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint, paths). The message names the problem and the fix."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""
