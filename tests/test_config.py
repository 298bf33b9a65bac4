from dataclasses import dataclass

import pytest

from pretrain.config import field, parse_config
from pretrain.main_pretrain import PretrainConfig


@dataclass
class Example:
    name: str = field("x", "a name")
    steps: int = field(3, "steps")
    amp: bool = field(False, "autocast")
    sizes: tuple[int, ...] = field((1, 2), "sizes")
    kind: str = field("a", "kind", choices=("a", "b"))


def test_defaults_and_overrides_round_trip():
    assert parse_config(Example, []) == Example()
    cfg = parse_config(Example, ["--name", "run", "--steps", "7", "--amp", "--sizes", "4", "5", "6", "--kind", "b"])
    assert cfg == Example(name="run", steps=7, amp=True, sizes=(4, 5, 6), kind="b")
    assert parse_config(Example, ["--amp", "false"]).amp is False


def test_bad_choice_is_refused():
    with pytest.raises(SystemExit):
        parse_config(Example, ["--kind", "c"])


def test_pretrain_config_defaults_are_the_papers():
    cfg = parse_config(PretrainConfig, [])
    assert (cfg.lambda_rec, cfg.lambda_adv, cfg.overlap, cfg.overlap_weight) == (0.999, 0.0, 7, 10.0)
    assert cfg.mask == "random_region" and cfg.mask_fraction == 0.25 and cfg.data == "builtin"


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        parse_config(Example, ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert text.count("(default: 3)") == 1 and "(default: (1, 2))" in text
