"""A run folder has one owner and one run: reruns, concurrent runs, changed resumes, damaged checkpoints,
killed writes and full disks stop with a message and leave the folder's history intact."""
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import pretrain.checkpoint
from pretrain.checkpoint import CheckpointWriteError, UnreadableCheckpointError, atomic_torch_save, list_checkpoints
from pretrain.errors import UserError
from pretrain.main_pretrain import RESUMABLE_CHANGES, PretrainConfig, check_resumable, main
from pretrain.run_folder import LOCK_FILE, RunFolderBusyError, config_changes, hold_run_folder


def _copy_run(run, tmp_path, name="run"):
    """A private copy of the session's finished 2-step run (checkpoints at steps 1 and 2) and its config."""
    shutil.copytree(run, tmp_path / name)
    stored = json.loads((run / "config.json").read_text())
    return tmp_path / name, PretrainConfig(**{**stored, "output_dir": str(tmp_path), "name": name})


def _snapshot(run_dir):
    """Every file's bytes, the lock file left out (its content is the current holder's PID)."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
            and p.name != LOCK_FILE}


def test_rerun_of_the_same_name_stops_and_changes_nothing(tiny_pretrain_run, tmp_path):
    run_dir, cfg = _copy_run(tiny_pretrain_run, tmp_path)
    before = _snapshot(run_dir)
    with pytest.raises(UserError, match="already holds a run.*--resume.*another --name.*--overwrite"):
        main(cfg)
    assert _snapshot(run_dir) == before


def test_overwrite_moves_the_old_run_aside_whole(tiny_pretrain_run, tmp_path):
    run_dir, cfg = _copy_run(tiny_pretrain_run, tmp_path)
    before = _snapshot(run_dir)
    main(dataclasses.replace(cfg, overwrite=True, steps=1))
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and _snapshot(moved[0]) == before
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-00000001.pth"]
    assert (run_dir / "metrics.csv").read_text().count("\n") == 2  # header + the new run's one step


def test_second_process_on_a_held_folder_stops_naming_the_holder(tiny_pretrain_run, tmp_path):
    run_dir, cfg = _copy_run(tiny_pretrain_run, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pretrain.run_folder import hold_run_folder\n"
         f"with hold_run_folder({str(run_dir)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusyError, match=rf"in use by another run \(PID {holder.pid},"):
            main(dataclasses.replace(cfg, resume=True))
    finally:
        holder.kill()
        holder.wait()
    with hold_run_folder(run_dir):  # the lock died with its holder
        pass


def test_resume_with_a_changed_lr_and_mask_stops_naming_both(tiny_pretrain_run, tmp_path):
    run_dir, cfg = _copy_run(tiny_pretrain_run, tmp_path)
    before = _snapshot(run_dir)
    with pytest.raises(UserError) as info:
        main(dataclasses.replace(cfg, resume=True, lr=0.01, mask="center", steps=4))
    assert "lr: 0.001 -> 0.01" in str(info.value) and "mask: 'random_region' -> 'center'" in str(info.value)
    assert "steps" not in str(info.value)  # a longer run is what --resume is for
    assert _snapshot(run_dir) == before


def test_only_the_allow_list_may_change_on_resume():
    stored = dataclasses.asdict(PretrainConfig(lr_schedule="constant"))
    fine = PretrainConfig(steps=900, stop_at=450, workers=0, eval_images=8, keep_checkpoints=1, log_every=1,
                          ckpt_every=5, resume=True, device="cpu", output_dir="elsewhere")
    check_resumable(fine, stored, "config.json")  # no error
    for change in ({"batch_size": 32}, {"seed": 1}, {"amp": "none"}, {"lambda_adv": 0.001}, {"data": "x"},
                   {"encoder": "alexnet-poolfree"}, {"mask_fraction": 0.2}, {"lr_schedule": "cosine"}):
        with pytest.raises(UserError, match=next(iter(change))):
            check_resumable(PretrainConfig(**change), stored, "config.json")
    cosine = dataclasses.asdict(PretrainConfig(lr_schedule="cosine"))
    with pytest.raises(UserError, match="steps: 380 -> 900.*cosine"):  # cosine: --steps sets every lr
        check_resumable(PretrainConfig(lr_schedule="cosine", steps=900), cosine, "config.json")
    resume_help = next(f.metadata["help"] for f in dataclasses.fields(PretrainConfig) if f.name == "resume")
    assert {n for n in RESUMABLE_CHANGES if f"--{n.replace('_', '-')}" not in resume_help} == {"name", "resume", "overwrite"}
    # an option the stored run predates is compared with its default: how that run behaved
    assert config_changes({"lr": 1.0}, {"lr": 1.0, "beta1": 0.9}, (), {"beta1": 0.5}) == ["beta1: 0.5 -> 0.9"]


def test_resume_with_every_checkpoint_damaged_stops_and_keeps_the_metrics(tiny_pretrain_run, tmp_path):
    run_dir, cfg = _copy_run(tiny_pretrain_run, tmp_path)
    newest, oldest = list_checkpoints(run_dir)[::-1]
    newest.write_bytes(newest.read_bytes()[:4096])  # truncated
    oldest.write_bytes(b"garbage")
    metrics = (run_dir / "metrics.csv").read_text()
    with pytest.raises(UnreadableCheckpointError) as info:
        main(dataclasses.replace(cfg, resume=True, steps=4))
    message = str(info.value)
    assert "checkpoint-00000002.pth (truncated or corrupt)" in message
    assert "checkpoint-00000001.pth (not a checkpoint file)" in message and "--overwrite" in message
    assert "weights_only" not in message
    assert (run_dir / "metrics.csv").read_text() == metrics and not (run_dir / "checkpoint-00000003.pth").exists()


def test_fallback_warning_names_the_step_used(tiny_pretrain_run, tmp_path):
    run_dir, _ = _copy_run(tiny_pretrain_run, tmp_path)
    list_checkpoints(run_dir)[-1].write_bytes(b"")
    with pytest.warns(UserWarning, match=r"checkpoint-00000002\.pth \(truncated or corrupt\) damaged; using "
                                         r"checkpoint-00000001\.pth \(step 1\)"):
        ckpt, path = pretrain.checkpoint.load_latest_checkpoint(run_dir)
    assert ckpt["step"] == 1 and path.name == "checkpoint-00000001.pth"


def test_stale_temporary_checkpoints_are_removed_at_start(tiny_pretrain_run, tmp_path):
    run_dir, cfg = _copy_run(tiny_pretrain_run, tmp_path)
    stale = [run_dir / ".checkpoint-00000003.pth.tmp-4194303", run_dir / f".checkpoint-00000002.pth.tmp-{os.getpid()}"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    main(dataclasses.replace(cfg, resume=True))  # already at its last step: loads, evaluates, writes eval.json
    assert not any(p.exists() for p in stale)
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-00000001.pth", "checkpoint-00000002.pth"]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")])
def test_a_failed_checkpoint_write_says_the_disk_is_full_and_keeps_the_earlier_ones(tmp_path, monkeypatch, failure):
    target = tmp_path / "checkpoint-00000003.pth"

    def half_written(obj, f):
        f.write(b"x" * 64)
        raise failure

    monkeypatch.setattr(pretrain.checkpoint.torch, "save", half_written)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint-00000003\.pth: .*disk is full.*intact.*--resume"):
        atomic_torch_save({"step": 3}, target)
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary file


def test_disk_full_during_a_run_keeps_every_earlier_checkpoint(tiny_pretrain_run, tmp_path, monkeypatch):
    run_dir, cfg = _copy_run(tiny_pretrain_run, tmp_path)
    before = {p.name: p.read_bytes() for p in list_checkpoints(run_dir)}

    def disk_full(obj, f):
        f.write(b"x" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pretrain.checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match="the disk is full"):
        main(dataclasses.replace(cfg, resume=True, steps=3, keep_checkpoints=1))
    assert {p.name: p.read_bytes() for p in list_checkpoints(run_dir)} == before  # nothing rotated away
    assert not list(run_dir.glob(".checkpoint-*"))
    assert torch.load(list_checkpoints(run_dir)[-1], weights_only=False)["step"] == 2
