"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line (`error: ...`) and exits with status 2; everything
else is a bug and keeps its traceback. Messages say what was wrong, where, and what to do. A write
the disk refused (`failed_write`) or an output path the OS refuses (`unusable_output`) is not a
bug either: the CLI reports each in one line too.
"""

import errno
import shutil
from pathlib import Path


class UserError(Exception):
    """Bad input (file, config value, model pairing) the user can correct."""


# Libraries that drop the errno of a failed write: safetensors keeps the OS message,
# torch.save only says its stream failed.
_DISK_FULL = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_WRITE_FAILED = ("iostream error", "file write failed", "PytorchStreamWriter failed")


def _chain(exc: BaseException):
    """`exc` and the exceptions it was raised from or while handling, each once."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def failed_write(exc: BaseException) -> str | None:
    """What went wrong when `exc` (or an exception it was raised from) is a write the disk
    refused; None for anything else."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on the device"
        message = str(e)
        if any(m in message for m in _DISK_FULL):
            return "no space left on the device"
        if any(m in message for m in _WRITE_FAILED):
            return "a file could not be written (is the disk full?)"
    return None


_UNUSABLE = (errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS,
             errno.EISDIR)  # fmt: skip


def unusable_output(exc: BaseException, output: object) -> str | None:
    """`strerror: path` when `exc` (or one it came from) is the OS refusing a path on the way to
    `output`, at it, or beside it (siblings it names, such as `OUT.generate.json`): a parent that
    is a file, a read-only or forbidden place. None for anything else."""
    if not output:
        return None
    out = Path(str(output)).absolute()
    for e in _chain(exc):
        name = getattr(e, "filename", None)
        if not (isinstance(e, OSError) and e.errno in _UNUSABLE and name):
            continue
        path = Path(str(name)).absolute()
        # EEXIST only for a parent that is a file: an existing path inside the output is a bug.
        beside = str(path).startswith(str(out)) and e.errno != errno.EEXIST
        if beside or path in out.parents:
            return f"{e.strerror}: {name}"
    return None


def free_space(path: object) -> str:
    """`, N MB free there` for the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(str(path)).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f", {shutil.disk_usage(p).free / 2**20:,.0f} MB free there"
    except OSError:
        return ""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C that the command has already explained (what a rerun does): the CLI exits 130
    without printing a second "interrupted"."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for the
    one-line errors that wrap a library's multi-line one."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
