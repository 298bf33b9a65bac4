import os
import subprocess
import sys

import pytest

# A training step whose 64 MiB weight gradient is allocated and freed every step: count the page faults
# of the last step, when a malloc that keeps freed memory has nothing left to fault in.
PROBE = """
import resource, torch
from pretrain.allocator import retain_freed_memory
applied = retain_freed_memory()
layer = torch.nn.Linear(4096, 4096)
opt = torch.optim.SGD(layer.parameters(), lr=0.1)
x = torch.randn(8, 4096)
for step in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad(set_to_none=True)
    layer(x).square().mean().backward()
    opt.step()
print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _last_step_faults(system_malloc: bool) -> tuple[bool, int]:
    env = {**os.environ, "CTXENC_SYSTEM_MALLOC": "1" if system_malloc else "0"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied == "1", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_training_step_reuses_freed_gradient_memory():
    applied_off, faults_system = _last_step_faults(system_malloc=True)
    assert not applied_off  # the opt-out leaves malloc alone
    if faults_system < 4000:
        pytest.skip(f"system malloc re-faults only {faults_system} pages here (huge pages?): nothing to compare")
    applied, faults_retained = _last_step_faults(system_malloc=False)
    assert applied
    assert faults_retained < faults_system / 10, (faults_retained, faults_system)
