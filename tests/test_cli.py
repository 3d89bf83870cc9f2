"""The real `vlfit` entry point, run as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "tiny-clip.yaml"
QUICK = ["--set", "data.num_images=150", "--set", "data.image_size=64", "--set", "train.epochs=1",
         "--set", "train.micro_batch=32"]


def vlfit(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlfit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = vlfit("train", DEMO, *QUICK, "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_train_prints_epoch_table_and_writes_run(trained):
    run_dir, result = trained
    assert "val acc" in result.stdout and "best val_acc" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{summary['best_val_acc']:.4f}" in result.stdout
    assert (run_dir / "checkpoints" / "best" / "model.safetensors").is_file()


def test_existing_run_is_not_overwritten(trained):
    run_dir, _ = trained
    before = (run_dir / "metrics.jsonl").read_text()
    result = vlfit("train", DEMO, *QUICK, "--run-dir", run_dir)
    assert result.returncode == 2 and "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_foreign_directory_is_never_deleted(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    result = vlfit("train", DEMO, *QUICK, "--run-dir", tmp_path, "--overwrite")
    assert result.returncode == 2 and "not a vlfit run" in result.stderr
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_eval_reproduces_recorded_accuracy(trained):
    run_dir, _ = trained
    result = vlfit("eval", run_dir)
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"val_acc {summary['best_val_acc']:.4f} (recorded {summary['best_val_acc']:.4f})" in result.stdout


@pytest.mark.parametrize("args,expected", [
    (["--set", "train.epohcs=2"], "train.epohcs: unknown key (did you mean 'epochs'?)"),
    (["--set", "train.lr=-1"], "train.lr: Input should be greater than 0"),
    (["--set", "train.micro_batch=many"], "train.micro_batch"),
    (["--set", "oops"], "must look like key.sub=value"),
])
def test_config_errors_exit_2_without_traceback(tmp_path, args, expected):
    result = vlfit("train", DEMO, *args, "--run-dir", tmp_path / "run")
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_missing_config_and_bad_usage_exit_2(tmp_path):
    assert vlfit("train", tmp_path / "missing.yaml").returncode == 2
    assert vlfit("train").returncode == 2
    assert vlfit("frobnicate").returncode == 2


def test_unreachable_backbone_is_a_clear_error(tmp_path):
    result = vlfit("train", DEMO, *QUICK, "--set", f"model.backbone={tmp_path}/nowhere", "--run-dir", tmp_path / "r")
    assert result.returncode == 2 and "model.backbone" in result.stderr and "Traceback" not in result.stderr


def test_eval_of_a_non_run_is_a_clear_error(tmp_path):
    result = vlfit("eval", tmp_path)
    assert result.returncode == 2 and "not a vlfit run" in result.stderr


def test_validate_prints_resolved_config():
    result = vlfit("validate", DEMO, "--set", "train.lr=3e-4")
    assert result.returncode == 0 and "lr: 0.0003" in result.stdout
