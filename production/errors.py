"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint, paths). The message names the problem and the fix."""
