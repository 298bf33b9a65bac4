"""torchrun with 2 gloo processes gives the parameters of one process with the same global batch."""
import os
import subprocess
import sys

import torch

from pretrain.checkpoint import list_checkpoints


def _run(args, tmp_path, name, nproc=None):
    common = ["--output-dir", str(tmp_path), "--name", name, "--batch-size", "4", "--steps", "3", "--workers", "0",
              "--dropout", "0", "--lambda-adv", "0", "--amp", "none", "--channels-last", "false", "--eval-images", "2",
              "--ckpt-every", "3", "--log-every", "1", "--lr", "1e-6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "pretrain"]
    else:
        cmd = [sys.executable, "-m", "pretrain"]
    out = subprocess.run(cmd + common + args, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return torch.load(list_checkpoints(tmp_path / name)[-1], weights_only=False)["model"]


def test_two_process_ddp_matches_one_process(tmp_path, tiny_voc):
    # Gradients agree to float rounding, but Adam divides by sqrt(v): a gradient near zero whose sign
    # differs by rounding moves a weight by up to 2*lr either way. lr 1e-6 bounds that drift to 6e-6
    # over 3 steps, so a 1e-5 tolerance still catches any real difference (wrong batch, wrong averaging).
    data = ["--data", str(tiny_voc)]
    single = _run(data, tmp_path, "single")
    ddp = _run(data, tmp_path, "ddp", nproc=2)
    assert single.keys() == ddp.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-5, msg=f"{k} differs")
