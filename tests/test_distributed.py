"""Training on several processes: the README's multi-GPU command, run on the CPU (gloo) with two
processes, trains exactly what one process trains with the same effective batch, writes one run
directory, and resumes after every process was killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_faults import HELPER, as_set_args, outcome

from vlfit.config import load_config
from vlfit.errors import UserError
from vlfit.metrics import MetricsLog
from vlfit.train import train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "tiny-clip.yaml"
# The README's multi-GPU command; on the CPU it runs one gloo process per --num_processes.
LAUNCH = "accelerate launch --multi_gpu --num_processes 2"
PER_PROCESS = {"train_images_per_s_per_process", "peak_mem_mb_per_process"}


def tiny(backbone: Path) -> list[str]:
    # 150 images -> 120 train = 12 micro-batches of 10 per epoch: 6 optimizer steps of 20 images, as
    # 2 accumulated micro-batches on one process or 1 on each of two. 30 val images in batches of 7:
    # 5 batches, so the second process's last batch is padding that must not be counted.
    return [f"model.backbone={backbone}", "data.num_images=150", "data.image_size=32", "train.epochs=2",
            "train.micro_batch=10", "train.effective_batch=20", "train.eval_batch=7", "train.checkpoint_every=2",
            "train.lr=3e-3", "train.device=cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, run: bool = True):
    """`LAUNCH ARGS` as a subprocess in a session of its own, so that a kill reaches nothing else."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, *LAUNCH.split()[1:], "--main_process_port", str(free_port()), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
                          start_new_session=True)
    return proc


@pytest.fixture(scope="module")
def overrides(clip_dir) -> list[str]:
    return tiny(clip_dir)


@pytest.fixture(scope="module")
def two(overrides, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted run on two processes, launched as the README says."""
    base = tmp_path_factory.mktemp("two")
    proc = launch("-m", "vlfit", "train", DEMO, *as_set_args(overrides), "--run-dir", base / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "run", proc


@pytest.fixture(scope="module")
def one(overrides, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process
    try:
        train(load_config(DEMO, overrides), run_dir, show=False)
    finally:
        torch.set_num_threads(before)
    return run_dir


def test_two_processes_train_what_one_trains(two, one):
    run_dir, proc = two
    a, b = outcome(run_dir), outcome(one)
    assert a["summary"]["num_processes"] == 2 and b["summary"]["num_processes"] == 1
    assert a["summary"]["effective_batch"] == b["summary"]["effective_batch"] == 20
    assert (a["summary"]["accum_steps"], b["summary"]["accum_steps"]) == (1, 2)
    # Same data order and augmentation, and gradients averaged alike: the same weights and metrics,
    # up to the order in which floating-point sums were added.
    for name in ("last", "best"):
        for k, v in a["weights"][name].items():
            torch.testing.assert_close(v, b["weights"][name][k], rtol=1e-5, atol=1e-6, msg=f"{name}/{k}")
    for ra, rb in zip(a["records"], b["records"], strict=True):
        ra, rb = ({k: v for k, v in r.items() if k not in PER_PROCESS} for r in (ra, rb))
        assert ra.keys() == rb.keys()
        for k, v in ra.items():
            assert v == (pytest.approx(rb[k], rel=1e-6) if isinstance(v, float) else rb[k]), k
    assert a["records"][-1]["train_loss"] < a["records"][0]["train_loss"]  # it trained: the comparison means something
    evals = [json.loads((d / "eval.json").read_text()) for d in (run_dir, one)]
    assert evals[0]["images"] == evals[1]["images"] == 30  # the padded duplicates are not scored
    assert evals[0]["confusion_matrix"] == evals[1]["confusion_matrix"]
    # The console shows the table once, from the main process.
    assert proc.stdout.count("best val_acc") == 1 and proc.stdout.count("val loss") == 1


def test_speed_and_memory_per_process_and_in_total(two):
    run_dir, _ = two
    for r in MetricsLog.read(run_dir / "metrics.jsonl"):
        assert len(r["train_images_per_s_per_process"]) == len(r["peak_mem_mb_per_process"]) == 2
        assert r["train_images_per_s"] == pytest.approx(sum(r["train_images_per_s_per_process"]))
        assert r["peak_mem_mb"] == max(r["peak_mem_mb_per_process"]) > 0


def test_one_run_directory_with_one_set_of_files(two, one):
    run_dir, _ = two
    assert [p.name for p in run_dir.parent.iterdir()] == ["run"]  # no second, differently stamped directory
    files = lambda d: sorted(p.name for p in d.iterdir() if not p.name.startswith("events."))  # noqa: E731
    assert files(run_dir) == files(one)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert [len(MetricsLog.read(d / "metrics.jsonl")) for d in (run_dir, one)] == [2, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "last", "previous"]


def test_killed_run_resumes_on_as_many_processes(two, overrides, tmp_path, run_vlfit):
    run_dir = tmp_path / "run"
    # Step 5: after the checkpoint of step 4, part way through the first epoch's last step.
    proc = launch(HELPER, "SIGKILL-ALL", "step:5", "--", "train", DEMO, *as_set_args(overrides), "--run-dir", run_dir)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (run_dir / "summary.json").exists()
    meta = json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())["meta"]
    assert (meta["step"], meta["num_processes"]) == (4, 2)

    before = sorted(p.name for p in run_dir.rglob("*"))
    code, stderr = run_vlfit("train", "--resume", run_dir)  # one process: refused, nothing touched
    assert code == 2 and "trained by 2 processes and would be resumed by 1" in stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before

    proc = launch("-m", "vlfit", "train", "--resume", run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, uninterrupted = outcome(run_dir), outcome(two[0])
    strip = lambda rs: [{k: v for k, v in r.items() if k not in PER_PROCESS} for r in rs]  # noqa: E731
    assert strip(resumed["records"]) == strip(uninterrupted["records"])
    assert resumed["summary"] == uninterrupted["summary"]
    for k, v in resumed["weights"]["last"].items():
        assert torch.equal(v, uninterrupted["weights"]["last"][k]), k


def test_compare_with_a_masked_run_on_two_processes(overrides, tmp_path):
    """compare under the launcher: both runs train, the masked one saves its example masks, one report."""
    masked = ROOT / "configs" / "demo" / "tiny-masked-clip.yaml"
    one_epoch = ["train.epochs=1"]  # the masked demo's unmasked final epoch gives way: its one epoch trains masked
    proc = launch("-m", "vlfit", "compare", DEMO, masked, *as_set_args([*overrides, *one_epoch]),
                  "--out", tmp_path / "cmp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.json", "report", "tiny-clip",
                                                                  "tiny-masked-clip"]
    assert (tmp_path / "cmp" / "tiny-masked-clip" / "mask_examples.npz").is_file()
    assert not (tmp_path / "cmp" / "tiny-clip" / "mask_examples.npz").exists()
    assert (tmp_path / "cmp" / "report" / "mask-tiny-masked-clip.png").is_file()
    assert proc.stdout.count("report: ") == 1


def test_effective_batch_is_split_over_the_processes():
    from vlfit.resilience import resolve_micro_batch

    def resolved(processes: int, *settings: str):
        cfg = load_config(None, list(settings)).train
        got = resolve_micro_batch(cfg, None, SimpleNamespace(num_processes=processes, device=torch.device("cpu")))
        return got.micro_batch, got.accum_steps

    assert resolved(1, "train.micro_batch=8", "train.effective_batch=64") == (8, 8)
    assert resolved(4, "train.micro_batch=8", "train.effective_batch=64") == (8, 2)
    assert resolved(4, "train.micro_batch=8", "train.accum_steps=3") == (8, 3)  # without it: micro x accum x processes
    assert resolved(2, "train.micro_batch=auto", "train.effective_batch=192") == (48, 2)  # CPU: largest <= 64 of 96
    with pytest.raises(UserError, match="cannot be split evenly over 3 processes x train.micro_batch 8"):
        resolved(3, "train.micro_batch=8", "train.effective_batch=64")


def test_fsdp_is_an_option_for_gpus(run_vlfit, tmp_path):
    from accelerate import FullyShardedDataParallelPlugin

    from vlfit.train import fsdp_plugin

    plugin = fsdp_plugin()  # what a GPU run hands to Accelerate
    assert isinstance(plugin, FullyShardedDataParallelPlugin) and plugin.fsdp_version == 2
    assert load_config(DEMO, ["train.distributed=fsdp"]).train.distributed == "fsdp"
    code, stderr = run_vlfit("train", DEMO, "--set", "train.distributed=fsdp", "--set", "train.device=cpu",
                             "--run-dir", tmp_path / "run")
    assert code == 2 and "train.distributed: fsdp shards the model over CUDA GPUs" in stderr


def test_readme_names_the_command_this_file_runs():
    readme = (ROOT / "README.md").read_text()
    assert f"{LAUNCH} -m vlfit train" in readme
