"""Fingerprints that tie an output to its inputs, so a resumed or reused output is refused when
they changed: the teacher cache (`cache`) and the teacher's answers (`teacher_answers`) both record
them."""

import hashlib
from pathlib import Path

from chatdistill.errors import UserError

_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def teacher_fingerprint(model_dir: str | Path) -> str:
    """Hash identifying a teacher's weights without reading them all (fast for multi-GB models).

    Covers config.json and, for every *.safetensors file: its name, size, JSON header (names,
    dtypes, shapes, offsets) and 16 evenly spaced 64 KiB samples of its data, so two checkpoints
    of the same architecture differ unless their sampled bytes are equal.
    """
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise UserError(f"teacher {model_dir}: no config.json there; is it a model directory?")
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, size)))
            start = 8 + n
            span = max(size - start - _SAMPLE_BYTES, 0)
            for i in range(_SAMPLES):
                fh.seek(start + span * i // max(_SAMPLES - 1, 1))
                h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]
