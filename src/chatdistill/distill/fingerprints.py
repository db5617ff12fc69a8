"""Fingerprints that tie an output to its inputs, so a resumed or reused output is refused when
they changed: the teacher cache (`cache`) and the teacher's answers (`teacher_answers`) both record
them."""

import hashlib
from pathlib import Path

from chatdistill.hashing import file_sha256
from chatdistill.models import ModelSource, resolve

_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def teacher_fingerprint(model: str | Path | ModelSource) -> str:
    """Hash identifying a teacher's weights without reading them all (fast for multi-GB models).

    Covers config.json and, for every *.safetensors file: its name, size, JSON header (names,
    dtypes, shapes, offsets) and 16 evenly spaced 64 KiB samples of its data, so two checkpoints
    of the same architecture differ unless their sampled bytes are equal. A GGUF file is
    fingerprinted through its converted directory, a base + adapter with the adapter's files.
    """
    src = resolve(model, "teacher")
    if src.kind == "hub":
        return src.arg  # a hub id names its weights only as far as the hub keeps them unchanged
    d = Path(src.path)
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
    if src.adapter:  # the merged model: the adapter's files are part of the weights
        for f in sorted(Path(src.adapter).glob("adapter_*")):
            h.update(f.name.encode() + file_sha256(f).encode())
    return h.hexdigest()[:16]
