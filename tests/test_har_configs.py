"""The HAR configs of the comparison validate and start, and say plainly when the hub is out of reach."""

import sys
from pathlib import Path

import pytest

from vlfit.cli import main
from vlfit.config import load_config

HAR = sorted((Path(__file__).resolve().parents[1] / "configs" / "har").glob("*.yaml"))


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["vlfit", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr().err


def test_reference_and_recommended_recipes_are_all_there():
    assert {p.stem for p in HAR} == {f"{m}-{r}" for m in ("clip", "siglip", "aclip")
                                     for r in ("reference", "recommended")}


@pytest.mark.parametrize("path", [p for p in HAR if p.stem.endswith("reference")], ids=lambda p: p.stem)
def test_reference_configs_follow_the_report(path):
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.weight_decay) == (10, 1e-4, 1e-4)
    assert cfg.train.precision == "fp16" and cfg.data.source == "hub"
    if path.stem.startswith("aclip"):
        assert cfg.train.micro_batch * cfg.train.accum_steps == 4096 == 64 * 64
        assert cfg.model.mask.kind == "attentive" and cfg.loss.contrastive_weight > 0
        assert cfg.model.mask.unmasked_epochs == 0  # the report describes no unmasked final phase


@pytest.mark.parametrize("path", [p for p in HAR if p.stem.endswith("recommended")], ids=lambda p: p.stem)
def test_recommended_masked_configs_end_unmasked(path):
    mask = load_config(path).model.mask
    assert mask.kind == "none" or mask.unmasked_epochs == 1  # FLIP: a short unmasked tuning at the end


@pytest.mark.parametrize("path", HAR, ids=lambda p: p.stem)
def test_har_configs_stop_cleanly_when_the_hub_is_unreachable(path, tmp_path, monkeypatch, capsys):
    # Offline mode, as set before the libraries are imported: these read it once, at import. (Without it
    # each hub request is retried for about 25 s on a machine without network before failing alike.)
    import datasets.config
    import huggingface_hub.constants

    for module in (huggingface_hub.constants, datasets.config):
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached: the hub would be needed
    # fp16 needs a GPU; on this CPU-only test machine the run may only get as far as the data.
    code, err = run_cli(monkeypatch, capsys, "train", path, "--set", "train.precision=fp32",
                        "--run-dir", tmp_path / "run")
    assert code == 2 and "cannot load hub dataset 'Bingsu/Human_Action_Recognition'" in err
    assert "Traceback" not in err
    code, err = run_cli(monkeypatch, capsys, "train", path, "--set", "train.precision=fp32",
                        "--set", "data.source=synthetic-har", "--set", "data.path=null", "--set", "data.num_images=75", "--run-dir", tmp_path / "run2")
    assert code == 2 and f"model.backbone: cannot load '{load_config(path).model.backbone}'" in err
