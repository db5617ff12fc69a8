"""keep_freed_memory: freed tensor memory is reused without a page fault per page (glibc)."""

import os
import subprocess
import sys

import pytest

PROBE = """
import random, resource, sys, torch
from chatdistill.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
rng = random.Random(0)
def step():  # like a training step: temporaries of 128 KB-16 MB, freed in mixed order
    live = []
    for i in range(60):
        live.append(torch.empty(rng.randint(2**15, 2**22)).fill_(1))
        if rng.random() < 0.4:
            live.pop(rng.randrange(len(live)))
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
    run = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    applied, faults = run.stdout.split()
    return applied, int(faults)


# Fault counts are compared with each other, never with a fixed number: how many faults a step
# takes depends on the page size and transparent huge pages, not on this code.


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_blocks_are_reused_without_page_faults():
    applied, faults_on = _probe("on")
    _, faults_off = _probe("off")
    assert applied == "True"
    # Without it glibc maps fresh (faulting, zeroed) pages on every step.
    assert faults_on < faults_off / 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_users_own_malloc_settings_win():
    applied, faults_user = _probe("on", MALLOC_TRIM_THRESHOLD_="131072")
    _, faults_on = _probe("on")
    assert applied == "False"
    # The user's setting is in force, not ours: their small trim threshold hands freed memory
    # back, so the steps fault again.
    assert faults_user > 4 * faults_on
