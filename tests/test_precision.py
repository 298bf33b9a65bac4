"""--amp auto: bf16 only where the device has it natively, and every record says what was computed, not 'auto'."""
import json
import sys
from pathlib import Path

import pytest
import torch

from pretrain import precision
from pretrain.errors import BadOptionError
from pretrain.main_pretrain import PretrainConfig
from pretrain.main_pretrain import main as pretrain_main
from transfer.experiment import FinetuneConfig, setup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run_all  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-native-bf16"])
def native(request, monkeypatch) -> bool:
    monkeypatch.setattr(precision, "native_bf16", lambda device: request.param)
    return request.param


def test_auto_is_bf16_only_with_native_support(native):
    assert precision.resolve_amp("auto", CPU) == ("bf16" if native else "none")
    assert precision.resolve_amp("none", CPU) == "none"


def test_an_explicit_bf16_is_kept_and_warned_about_only_when_emulated(native, recwarn):
    assert precision.resolve_amp("bf16", CPU) == "bf16"
    warned = [w for w in recwarn if "emulated" in str(w.message)]
    assert len(warned) == (0 if native else 1)


def test_an_explicit_bf16_on_a_gpu_without_it_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with pytest.raises(BadOptionError, match="--amp auto or none"):
        precision.resolve_amp("bf16", torch.device("cuda"))
    assert precision.resolve_amp("auto", torch.device("cuda")) == "none"


def test_native_bf16_agrees_with_onednn_on_this_cpu():
    assert precision.native_bf16(CPU) == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_a_pretraining_run_records_the_resolved_precision(native, tmp_path, tiny_voc):
    cfg = PretrainConfig(name="auto", output_dir=str(tmp_path), data=str(tiny_voc), steps=1, batch_size=2, workers=0,
                         eval_images=2, lambda_adv=0.0, log_every=1, ckpt_every=1)
    assert cfg.amp == "auto"
    pretrain_main(cfg)
    stored = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert stored["amp"] == ("bf16" if native else "none")


def test_transfer_setup_resolves_the_config_in_place(native, tmp_path, tiny_voc):
    cfg = FinetuneConfig(data=str(tiny_voc), out=str(tmp_path / "out"))
    setup(cfg, "classify")
    assert cfg.amp == ("bf16" if native else "none")


def test_a_cell_identity_names_the_precision_the_run_will_use(native):
    auto = run_all.cell_identity("classify", FinetuneConfig())
    explicit = run_all.cell_identity("classify", FinetuneConfig(amp="bf16" if native else "none"))
    assert auto["config"]["amp"] == explicit["config"]["amp"] and auto["config_hash"] == explicit["config_hash"]
