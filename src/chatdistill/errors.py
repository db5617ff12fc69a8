"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line (`error: ...`) and exits with status 2; everything
else is a bug and keeps its traceback. Messages say what was wrong, where, and what to do.
"""


class UserError(Exception):
    """Bad input (file, config value, model pairing) the user can correct."""


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format a location as `path:line (field)` for error messages."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if field:
        loc += f" ({field})"
    return loc
