"""A run SIGKILLed at random steps and resumed each time ends where an uninterrupted run ends."""
import os
import random
import signal
import subprocess
import sys
import time

import torch

from pretrain.checkpoint import list_checkpoints

STEPS = 8


def _cmd(tmp_path, data, name, resume):
    return [sys.executable, "-m", "pretrain", "--output-dir", str(tmp_path), "--name", name, "--data", str(data),
            "--batch-size", "4", "--steps", str(STEPS), "--workers", "0", "--amp", "none", "--channels-last", "false",
            "--eval-images", "2", "--ckpt-every", "1", "--log-every", "1", "--keep-checkpoints", "2", "--lambda-adv", "0.001",
            "--resume", str(resume).lower()]


def _final_state(run_dir):
    return torch.load(list_checkpoints(run_dir)[-1], weights_only=False)


def test_sigkill_and_resume_ends_with_identical_parameters(tmp_path, tiny_voc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cmd(tmp_path, tiny_voc, "straight", False), env=env, check=True, capture_output=True, timeout=300)

    rng = random.Random(0)
    run_dir = tmp_path / "killed"
    kills = 0
    for attempt in range(10):
        proc = subprocess.Popen(_cmd(tmp_path, tiny_voc, "killed", attempt > 0), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills < 3:
            target = rng.randint(1, STEPS - 1)  # kill once the run has passed a random step
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                done = [int(p.stem.split("-")[1]) for p in list_checkpoints(run_dir)] if run_dir.exists() else []
                if done and max(done) >= target:
                    break
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        if proc.wait(timeout=300) == 0:
            break
    assert kills >= 2, "the run finished before it could be killed; the test did not test anything"
    straight, killed = _final_state(tmp_path / "straight"), _final_state(run_dir)
    assert killed["step"] == straight["step"] == STEPS
    for part in ("model", "discriminator"):
        for k, v in straight[part].items():
            assert torch.equal(v, killed[part][k]), f"{part}.{k} differs after kill/resume"
