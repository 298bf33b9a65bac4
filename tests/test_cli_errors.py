"""run_cli: a user error is a few plain lines and exit status 2; --debug / CTXENC_DEBUG=1 give the traceback;
errors raised in DataLoader workers read as the original error; `python -m pretrain --help` works."""
import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pretrain.checkpoint import list_checkpoints
from pretrain.config import field
from pretrain.data import DatasetFormatError, UnreadableImageError
from pretrain.errors import UserError, run_cli, unwrap_worker_error
from pretrain.run_folder import hold_run_folder
from tests.conftest import write_tiny_voc


@dataclass
class Options:
    fail_with: str = field("user", "which error main raises")


def _main(options: Options):
    if options.fail_with == "user":
        raise UserError("data/x.jpg is broken. Fix: replace it.")
    if options.fail_with == "disk":
        raise OSError(errno.ENOSPC, "No space left on device", "runs/a/metrics.csv")
    if options.fail_with == "none":
        return 42
    raise ZeroDivisionError("a bug")


def test_a_user_error_is_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.delenv("CTXENC_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        run_cli(_main, Options, [])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"{_prog()}: error: data/x.jpg is broken. Fix: replace it."]
    assert run_cli(_main, Options, ["--fail-with", "none"]) == 42


def _prog():
    from pretrain.config import build_parser
    return build_parser(Options).prog


def test_a_full_disk_is_a_user_error_but_a_bug_keeps_its_traceback(capsys, monkeypatch):
    monkeypatch.delenv("CTXENC_DEBUG", raising=False)
    with pytest.raises(SystemExit):
        run_cli(_main, Options, ["--fail-with", "disk"])
    assert "the disk is full (runs/a/metrics.csv)" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):
        run_cli(_main, Options, ["--fail-with", "bug"])


def test_debug_flag_and_environment_keep_the_traceback(monkeypatch):
    monkeypatch.delenv("CTXENC_DEBUG", raising=False)
    with pytest.raises(UserError):
        run_cli(_main, Options, ["--debug"])
    monkeypatch.setenv("CTXENC_DEBUG", "1")
    with pytest.raises(UserError):
        run_cli(_main, Options, [])


class _Failing(Dataset):
    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise self.error


@pytest.mark.parametrize("error", [UnreadableImageError("data/img_3.jpg", "file is empty (0 bytes)"),  # 2-arg init
                                   DatasetFormatError("data/a.xml: not valid XML")])
def test_dataloader_worker_errors_read_as_the_original(error, capsys, monkeypatch):
    monkeypatch.delenv("CTXENC_DEBUG", raising=False)
    loader = DataLoader(_Failing(error), batch_size=2, num_workers=1)
    with pytest.raises(Exception) as wrapped:
        next(iter(loader))
    assert "DataLoader worker process 0" in str(wrapped.value)  # what torch gives
    original, message = unwrap_worker_error(wrapped.value)
    assert original is type(error) and message == str(error)

    with pytest.raises(SystemExit) as info:
        run_cli(lambda _: next(iter(loader)), Options, [])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.strip() == f"{_prog()}: error: {error}" and "Caught" not in err


def test_a_bug_in_a_dataloader_worker_is_not_hidden(monkeypatch):
    monkeypatch.delenv("CTXENC_DEBUG", raising=False)
    loader = DataLoader(_Failing(ZeroDivisionError("a bug")), batch_size=2, num_workers=1)
    with pytest.raises(ZeroDivisionError, match="Caught ZeroDivisionError"):
        run_cli(lambda _: next(iter(loader)), Options, [])


def _pretrain(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CTXENC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "pretrain", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_pretrain_help_lists_every_option():
    out = _pretrain("--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert out.stdout.startswith("usage: python -m pretrain")
    assert "--lr-schedule" in text and "--overwrite" in text and "--debug" in text


def _damage_every_checkpoint(run_dir):
    for path in list_checkpoints(run_dir):
        path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize("case", ["same name again", "folder in use", "resume with another lr", "damaged checkpoints",
                                  "unreadable held-out image", "bad flag value"])
def test_each_user_error_of_pretrain_is_at_most_3_lines(case, tiny_pretrain_run, tmp_path):
    shutil.copytree(tiny_pretrain_run, tmp_path / "run")
    stored = json.loads((tiny_pretrain_run / "config.json").read_text())
    same = ["--output-dir", tmp_path, "--name", "run", "--data", stored["data"], "--batch-size", 4, "--workers", 0,
            "--eval-images", 2, "--amp", "none", "--lambda-adv", 0, "--steps", 2]
    if case == "same name again":
        out = _pretrain(*same)
    elif case == "folder in use":
        with hold_run_folder(tmp_path / "run"):
            out = _pretrain(*same, "--resume")
        assert f"PID {os.getpid()}" in out.stderr
    elif case == "resume with another lr":
        out = _pretrain(*same, "--resume", "--lr", 0.01)
        assert "lr: 0.001 -> 0.01" in out.stderr
    elif case == "damaged checkpoints":
        _damage_every_checkpoint(tmp_path / "run")
        out = _pretrain(*same, "--resume", "--steps", 4)
        assert "no readable checkpoint" in out.stderr
    elif case == "unreadable held-out image":
        voc = write_tiny_voc(tmp_path / "data")
        (voc / "VOC2007" / "JPEGImages" / "img_004.jpg").write_bytes(b"")
        out = _pretrain(*same[:4], "--name", "fresh", "--data", voc)
        assert "img_004.jpg" in out.stderr
    else:
        out = _pretrain(*same, "--mask", "hexagon")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and 1 <= len(lines) <= 3, out.stderr
    assert "Traceback" not in out.stderr and "error:" in lines[0]


def test_debug_shows_the_traceback_of_a_user_error(tiny_pretrain_run, tmp_path):
    shutil.copytree(tiny_pretrain_run, tmp_path / "run")
    out = _pretrain("--output-dir", tmp_path, "--name", "run", "--data", "builtin", "--debug")
    assert out.returncode != 0 and "Traceback (most recent call last)" in out.stderr and "already holds a run" in out.stderr
    assert torch.load(list_checkpoints(tmp_path / "run")[-1], weights_only=False)["step"] == 2  # untouched
