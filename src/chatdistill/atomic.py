"""Files written so that a crash, Ctrl-C or a full disk never leaves half of one in place.

Each writer fills a hidden temporary file beside the target, flushes it to disk and renames it
over the target (atomic on POSIX); when anything fails the temporary file is removed, so a failed
write also gives its space back.
"""

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it goes."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
