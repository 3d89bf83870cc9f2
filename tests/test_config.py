from pathlib import Path

import pytest
import yaml

from vlfit.config import Config, load_config
from vlfit.errors import ConfigError

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def problems(path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value.problems


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_shipped_configs_exist():
    assert any(p.name == "tiny-clip.yaml" for p in CONFIGS)


def test_defaults_and_name_from_file(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 3\n"))
    assert cfg.train.epochs == 3 and cfg.train.lr == Config().train.lr and cfg.name == "run"


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  backbone: tiny-siglip\n"), ["train.grad_clip=null"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg and again.train.grad_clip is None


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, ""), ["train.lr=3e-4", "data.crop_scale=[0.3, 1.0]", "train.epochs=2",
                                            "name=x"])
    assert cfg.train.lr == 3e-4 and cfg.data.crop_scale == (0.3, 1.0) and cfg.train.epochs == 2
    assert cfg.name == "x"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    [p] = problems(write(tmp_path, "train:\n  epohcs: 3\n"))
    assert p.startswith("train.epohcs: unknown key") and "'epochs'" in p


def test_unknown_section(tmp_path):
    [p] = problems(write(tmp_path, "trian:\n  epochs: 3\n"))
    assert p.startswith("trian: unknown key") and "'train'" in p


def test_every_problem_reported_once_per_line(tmp_path):
    found = problems(write(tmp_path, "train:\n  epochs: zero\n  lr: -1\n  accum_steps: 0\n"
                                     "data:\n  crop_scale: [0.9, 0.1]\n  val_fraction: 1.5\n"))
    keys = sorted(p.split(":")[0] for p in found)
    assert keys == ["data.crop_scale", "data.val_fraction", "train.accum_steps", "train.epochs", "train.lr"]
    assert all("\n" not in p for p in found)


@pytest.mark.parametrize("override,key", [
    ("train.precision=fp8", "train.precision"),
    ("train.betas=[1.5, 0.9]", "train.betas"),
    ("data.crop_scale=[0.5, 2]", "data.crop_scale"),
    ("model.attn_implementation=flash", "model.attn_implementation"),
    ("train.micro_batch=0", "train.micro_batch"),
])
def test_impossible_values(tmp_path, override, key):
    [p] = problems(write(tmp_path, ""), [override])
    assert p.startswith(key + ":")


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=3", "train.epochs.x=1"])
def test_malformed_overrides(tmp_path, override):
    [p] = problems(write(tmp_path, "train:\n  epochs: 2\n"), [override])
    assert p


@pytest.mark.parametrize("text", ["[1, 2]", "train: [unclosed", "42"])
def test_bad_yaml_files(tmp_path, text):
    assert len(problems(write(tmp_path, text))) == 1


def test_missing_file(tmp_path):
    [p] = problems(tmp_path / "nope.yaml")
    assert "not found" in p


def test_config_written_to_yaml_is_plain_data(tmp_path):
    assert isinstance(yaml.safe_load(Config().to_yaml()), dict)
