"""Exception types shared by every layer.

Every error a user can cause (bad data, bad config, bad flag) is a :class:`ZhtuneError` whose message says
what was wrong, where, and what to do; the CLI prints it without a traceback. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class ZhtuneError(Exception):
    """An error caused by user input; the CLI prints its message and exits with status 2."""


class ConfigError(ZhtuneError):
    """A recipe or option is invalid (unknown key, wrong type, unknown registry name)."""


class DataError(ZhtuneError):
    """A data record is invalid.

    Args:
        path: the file the record came from.
        line: 1-based line where the record starts (None when unknown).
        field: the offending field, dotted for nested ones (``conversations[3].from``).
        reason: what is wrong, in words.
    """

    def __init__(self, path: str, line: int | None, field: str | None, reason: str):
        self.path, self.line, self.field, self.reason = path, line, field, reason
        where = f"{path}:{line}" if line is not None else str(path)
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{reason}")
