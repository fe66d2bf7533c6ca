"""Errors that mean a mistake in the user's input, not a bug.

The launch scripts print these as one line naming the thing (no traceback); everything
else keeps its traceback. They subclass the built-in types callers already catch.
"""


class UserError(Exception):
    """A mistake in a config, a path, a data set or a checkpoint that the user can fix."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (unknown name, impossible size, changed on resume)."""


class NotFound(UserError, FileNotFoundError):
    """A file, folder, data set or checkpoint that does not exist where the config says."""


class AlreadyExists(UserError, FileExistsError):
    """An output folder or file already there that a run would write over (e.g. an export
    into a folder that is not empty)."""
