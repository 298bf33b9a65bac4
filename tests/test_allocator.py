import os
import subprocess
import sys

import pytest

# A training step whose 64 MiB weight gradient is allocated and freed every step: count the page faults
# of each of the last 5 of 10 steps, when a malloc that keeps freed memory has nothing left to fault in.
# A step may still grow the heap now and then (the gradient is a 64-byte-aligned allocation that does not
# always fit the block it freed, depending on what the thread pool allocated around it: with 64 threads the
# 2nd and 3rd steps fault it in again), so the test counts the steps that fault the gradient back in.
PROBE = """
import resource, torch
from pretrain.allocator import retain_freed_memory
applied = retain_freed_memory()
layer = torch.nn.Linear(4096, 4096)
opt = torch.optim.SGD(layer.parameters(), lr=0.1)
x = torch.randn(8, 4096)
faults = []
for step in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad(set_to_none=True)
    layer(x).square().mean().backward()
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(applied), *faults[5:])
"""


GRADIENT_PAGES = 4096 * 4096 * 4 // 4096


def _last_steps_faults(system_malloc: bool) -> tuple[bool, list[int]]:
    env = {**os.environ, "CTXENC_SYSTEM_MALLOC": "1" if system_malloc else "0"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    applied, *faults = out.split()
    return applied == "1", [int(f) for f in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_training_step_reuses_freed_gradient_memory():
    applied_off, faults_system = _last_steps_faults(system_malloc=True)
    assert not applied_off  # the opt-out leaves malloc alone
    if min(faults_system) < GRADIENT_PAGES // 2:
        pytest.skip(f"system malloc re-faults only {faults_system} pages a step here (huge pages?): nothing to compare")
    applied, faults_retained = _last_steps_faults(system_malloc=False)
    assert applied
    refaulting_steps = sum(f >= GRADIENT_PAGES // 2 for f in faults_retained)
    assert refaulting_steps <= 1, (faults_retained, faults_system)
