"""The chatdistill command limits how long PyTorch's idle OpenMP threads spin, before torch loads
its OpenMP runtime (which reads the setting once), and leaves a user's own setting alone."""

import os
import subprocess
import sys

from chatdistill.openmp import SPINCOUNT, limit_openmp_spin

# Records GOMP_SPINCOUNT at the moment torch is first imported, then imports the command line.
AT_TORCH_IMPORT = """
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
        return None
sys.meta_path.insert(0, Watch())
import chatdistill.cli
print(seen[0])
"""


def test_the_command_sets_the_spin_count_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", AT_TORCH_IMPORT], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [SPINCOUNT]


def test_a_users_own_setting_is_kept(monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    limit_openmp_spin()
    assert os.environ["GOMP_SPINCOUNT"] == "5"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    limit_openmp_spin()
    assert "GOMP_SPINCOUNT" not in os.environ
