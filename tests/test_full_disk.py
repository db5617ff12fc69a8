"""A disk that fills up, for real (a small tmpfs): one-line errors, nothing half-written left
behind, and the same command run again continues."""

import shutil
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from chatdistill.cli import main
from chatdistill.errors import failed_write


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("needs permission to mount a tmpfs (root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk, leave: int) -> None:
    """Leave about `leave` bytes free on `disk`."""
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_failed_write_recognises_each_librarys_full_disk_error(small_disk):
    _fill(small_disk, 0)
    writes = {
        "open": lambda: (small_disk / "a.txt").write_bytes(b"x" * 100_000),
        "torch.save": lambda: torch.save(torch.zeros(100_000), small_disk / "a.pt"),
        "safetensors": lambda: save_file({"x": np.zeros(100_000)}, str(small_disk / "a.st")),
    }
    for name, write in writes.items():
        with pytest.raises(Exception) as e:  # noqa: B017 - each library raises its own type
            write()
        assert failed_write(e.value) is not None, name
    assert failed_write(ValueError("bad value")) is None
    assert failed_write(OSError(2, "No such file or directory")) is None


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def test_distill_on_a_full_disk_says_so_and_resume_finishes_the_same(
    small_disk, tmp_path, tiny_models, chat_file, capsys
):
    def distill(output, *extra):
        argv = ["distill", "--teacher", str(tiny_models["llama"]), "--student-num-layers", "1",
                "--data", str(chat_file), "--output", str(output), "--max-steps", "4",
                "--set", "train.save_every=2", "--set", "train.batch_size=4", *extra]  # fmt: skip
        code = main(argv)
        return code, capsys.readouterr().err.strip()

    assert distill(tmp_path / "full")[0] == 0
    checkpoint = sum(
        f.stat().st_size for f in (tmp_path / "full" / "checkpoints" / "step-0000002").iterdir()
    )
    # Room for the first checkpoint, not for the second.
    _fill(small_disk, int(1.5 * checkpoint))
    out = small_disk / "out"
    code, err = distill(out)
    assert code == 2 and len(err.splitlines()) == 1, err
    # torch.save (the optimizer state) reports a failed write without its errno.
    assert err.startswith("error: ") and f"while writing {out}" in err
    assert "no space left on the device" in err or "is the disk full?" in err
    assert "with --resume it continues" in err
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-0000002"]  # the half-written second one was removed

    (small_disk / "filler").unlink()
    assert distill(out, "--resume")[0] == 0
    a, b = _weights(tmp_path / "full"), _weights(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
