"""Faults a run must survive: kills at any step, stop signals, non-finite losses, running out of
memory, damaged checkpoints, pickles posing as checkpoints or weights, and malformed configs.

The signalled runs are real `vlfit train` subprocesses that signal themselves at an exact moment
(tests/fault_injection.py); they all start at once and run in parallel, and are resumed in-process.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlfit.config import load_config
from vlfit.metrics import MetricsLog
from vlfit.train import train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "tiny-clip.yaml"
HELPER = ROOT / "tests" / "fault_injection.py"

# 150 images -> 120 for training = 15 micro-batches of 8 = 8 optimizer steps per epoch (the last one
# accumulates a single micro-batch), 24 in all; a checkpoint every 3 steps and at each epoch end.
# Head dropout makes the model draw from the global random streams, which resume must restore.
STEPS = 24
TIMING = {"epoch_time_s", "train_images_per_s", "peak_mem_mb", "mean_epoch_time_s", "total_train_time_s",
          "saliency_time_s", "train_images_per_s_per_process", "peak_mem_mb_per_process"}

_rng = random.Random(7)  # fixed: a failure names a kill point that reproduces
KILL_STEPS = sorted(_rng.sample(range(1, STEPS + 1), 5))
FAULTS = {f"kill-step{n}": ("SIGKILL", f"step:{n}", 1) for n in KILL_STEPS}
FAULTS["kill-writing"] = ("SIGKILL", f"fsync:{_rng.randint(1, 40)}", 1)  # part way through a checkpoint
FAULTS["term"] = ("SIGTERM", "step:11", 1)
FAULTS["int-twice"] = ("SIGINT", "step:11", 2)
KILLS = [label for label in FAULTS if label.startswith("kill")]


def tiny(backbone: Path) -> list[str]:
    return [f"model.backbone={backbone}", "model.head_dropout=0.1", "data.num_images=150", "data.image_size=32",
            "train.epochs=3", "train.micro_batch=8", "train.accum_steps=2", "train.checkpoint_every=3",
            "train.eval_batch=64"]


def as_set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def outcome(run_dir: Path) -> dict:
    """Everything a run computed, without wall-clock timings: per-epoch metrics, summary, weights."""
    records = [{k: v for k, v in r.items() if k not in TIMING} for r in MetricsLog.read(run_dir / "metrics.jsonl")]
    summary = {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if k not in TIMING}
    weights = {name: load_file(run_dir / "checkpoints" / name / "model.safetensors") for name in ("last", "best")}
    return {"records": records, "summary": summary, "weights": weights}


def assert_same_outcome(a: dict, b: dict) -> None:
    assert a["records"] == b["records"]
    assert a["summary"] == b["summary"]
    for name in ("last", "best"):
        assert a["weights"][name].keys() == b["weights"][name].keys()
        for k, v in a["weights"][name].items():
            assert torch.equal(v, b["weights"][name][k]), f"{name}/{k} differs"


def newest_meta(run_dir: Path) -> dict | None:
    metas = [json.loads(p.read_text())["meta"] for p in (run_dir / "checkpoints").glob("*/state.json")]
    return max(metas, key=lambda m: (m["step"], not m["mid_epoch"]), default=None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Bit-identical comparison needs one thread count in every process (the subprocesses get
    # OMP_NUM_THREADS=1); one thread is also the fastest on a shared two-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def overrides(clip_dir) -> list[str]:
    return tiny(clip_dir)


@pytest.fixture(scope="module")
def signalled(overrides, tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """Every run of FAULTS, started together: label -> (run dir, exit code, stderr)."""
    base = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    procs = {}
    for label, (sig, when, times) in FAULTS.items():
        cmd = [sys.executable, str(HELPER), sig, when, str(times), "--", "train", str(DEMO),
               *as_set_args(overrides), "--run-dir", str(base / label)]
        procs[label] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return {label: (base / label, p.wait(timeout=600), p.stderr.read()) for label, p in procs.items()}


@pytest.fixture(scope="module")
def reference(overrides, tmp_path_factory, signalled) -> dict:
    run_dir = tmp_path_factory.mktemp("reference")
    train(load_config(DEMO, overrides), run_dir, show=False)
    return outcome(run_dir)


# ----------------------------------------------------------------------------- kills and signals


@pytest.mark.parametrize("label", KILLS)
def test_sigkill_at_any_moment_then_resume_equals_uninterrupted_run(label, signalled, reference, overrides):
    run_dir, code, stderr = signalled[label]
    assert code == -signal.SIGKILL, stderr
    assert not (run_dir / "summary.json").exists()
    if label == f"kill-step{KILL_STEPS[-1]}":
        # Also damage the newest checkpoint: resume must fall back to the one before it.
        assert KILL_STEPS[-1] > 6  # so that two periodic checkpoints exist
        victim = run_dir / "checkpoints" / "last" / "optimizer.safetensors"
        size = victim.stat().st_size
        os.truncate(victim, random.Random(label).randrange(size))
    train(load_config(DEMO, overrides), run_dir, show=False, resume=True)
    assert_same_outcome(outcome(run_dir), reference)
    if label == f"kill-step{KILL_STEPS[-1]}":
        assert (run_dir / "checkpoints" / "last.damaged").is_dir()  # kept for inspection, not deleted


def test_sigterm_finishes_the_step_checkpoints_and_says_how_to_resume(signalled, reference, run_vlfit):
    run_dir, code, stderr = signalled["term"]
    assert code == 128 + signal.SIGTERM, stderr
    assert f"vlfit train --resume {run_dir}" in stderr and "Traceback" not in stderr
    meta = json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())["meta"]
    assert meta["step"] == 11 and meta["mid_epoch"]  # the signalled step finished and was saved
    code, stderr = run_vlfit("train", "--resume", run_dir)  # the user's command, config read from the run
    assert code == 0, stderr
    assert_same_outcome(outcome(run_dir), reference)


def test_second_signal_exits_at_once_without_checkpoint(signalled):
    run_dir, code, stderr = signalled["int-twice"]
    assert code == 128 + signal.SIGINT and "exiting now" in stderr
    assert newest_meta(run_dir)["step"] == 9  # the periodic one before the signals, none after


# ----------------------------------------------------------------------------- non-finite loss


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(overrides, tmp_path, monkeypatch, run_vlfit):
    real = torch.nn.functional.cross_entropy
    calls = 0

    def poisoned(*args, **kwargs):  # the 9th training micro-batch = the 5th optimizer step
        nonlocal calls
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls += 1
            if calls == 9:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    run_dir = tmp_path / "run"
    code, stderr = run_vlfit("train", DEMO, *as_set_args(overrides), "--run-dir", run_dir)
    assert code == 2 and "Traceback" not in stderr
    assert "non-finite" in stderr and "optimizer step 5" in stderr
    meta = json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())["meta"]
    assert meta["step"] == 3  # the periodic checkpoint before the bad step; step 6's was never written
    from vlfit.checkpoint import load_checkpoint

    model, _ = load_checkpoint(run_dir / "checkpoints" / "last")  # intact: every checksum verifies
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scaler_skips_are_counted_and_a_lasting_nan_stops_the_run():
    from vlfit.resilience import NonFiniteGuard, NonFiniteLoss

    finite, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    guard = NonFiniteGuard(patience=3, scaler=True)
    for step, (loss, skipped) in enumerate([(finite, True), (nan, True), (nan, True), (finite, False)], 1):
        guard.observe(loss, torch.tensor(float("inf")))  # an overflowing norm is the scaler's business
        guard.end_step(step, 1, skipped)
    guard.flush(torch.nn.Linear(2, 2))
    assert guard.skipped == 3 and guard.streak == 0  # two bad steps in a row, then a good one: no stop
    with pytest.raises(NonFiniteLoss, match=r"3 optimizer steps in a row \(steps 5-7\), epoch 2"):
        for step in (5, 6, 7, 8):
            guard.observe(nan)
            guard.end_step(step, 2, skipped=True)
    no_scaler = NonFiniteGuard(patience=3, scaler=False)
    no_scaler.observe(finite, torch.tensor(float("inf")))  # without a scaler a bad gradient stops at once
    no_scaler.end_step(1, 1, skipped=False)
    with pytest.raises(NonFiniteLoss, match="at optimizer step 1"):
        no_scaler.flush(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- out of memory


class OOMAbove(torch.nn.Module):
    """A model that behaves like a GPU with room for `limit` images per step."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.layer, self.sizes = limit, torch.nn.Linear(3, 4), []

    def forward(self, pixels):
        self.sizes.append(len(pixels))
        if len(pixels) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.layer(pixels.mean(dim=(2, 3)))


@pytest.mark.parametrize("limit,effective,expected", [(48, 96, 48), (40, 96, 32), (1000, 96, 96), (5, 96, 4),
                                                      (6, 7, 1), (0, 96, None)])
def test_micro_batch_search_finds_largest_fitting_divisor(limit, effective, expected):
    from accelerate import Accelerator

    from vlfit.resilience import largest_fitting, step_fits

    model = OOMAbove(limit)
    candidates = [m for m in range(1, effective + 1) if effective % m == 0]
    found = largest_fitting(candidates, lambda m: step_fits(model, m, 4, Accelerator(cpu=True)))
    assert found == expected
    assert len(model.sizes) <= len(candidates).bit_length()  # bisection, not a scan
    assert all(p.grad is None for p in model.parameters())  # trials leave no gradients behind


def test_micro_batch_auto_keeps_the_effective_batch():
    from accelerate import Accelerator

    from vlfit.resilience import resolve_micro_batch

    cfg = load_config(None, ["train.micro_batch=auto", "train.effective_batch=192"]).train
    on_cpu = resolve_micro_batch(cfg, OOMAbove(1000), Accelerator(cpu=True))
    assert (on_cpu.micro_batch, on_cpu.accum_steps) == (64, 3)  # no search on the CPU: largest divisor <= 64
    resumed = resolve_micro_batch(cfg, OOMAbove(1000), Accelerator(cpu=True), recorded=(48, 4))
    assert (resumed.micro_batch, resumed.accum_steps) == (48, 4)  # a resumed run keeps what it recorded


@pytest.mark.parametrize("phase,expected", [
    ("training", ["train.micro_batch 8 x train.accum_steps 2", "train.micro_batch=4 --set train.accum_steps=4",
                  "train.micro_batch=auto", "train.effective_batch=16"]),
    ("evaluation", ["train.eval_batch 64", "train.eval_batch to 32"]),
])
def test_out_of_memory_names_the_batch_and_what_to_change(phase, expected, overrides, tmp_path, monkeypatch, run_vlfit):
    from vlfit.models import Backbone

    real = Backbone.forward

    def forward(self, pixels, keep=None):
        if torch.is_grad_enabled() == (phase == "training"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, pixels, keep)

    monkeypatch.setattr(Backbone, "forward", forward)
    code, stderr = run_vlfit("train", DEMO, *as_set_args(overrides), "--run-dir", tmp_path / "run")
    assert code == 2 and "Traceback" not in stderr and "out of GPU memory" in stderr
    assert all(e in stderr for e in expected), stderr


# ----------------------------------------------------------------------------- resume arguments


def test_resume_refuses_what_it_cannot_do(overrides, tmp_path, monkeypatch, signalled, run_vlfit):
    import vlfit.train

    monkeypatch.setattr(vlfit.train, "prepare_data", lambda *a: pytest.fail("data loaded before the check"))
    run_dir = signalled["int-twice"][0]
    before = sorted(p.name for p in run_dir.rglob("*"))
    code, stderr = run_vlfit("train", DEMO, *as_set_args(overrides), "--set", "train.lr=0.5", "--resume", run_dir)
    assert code == 2 and "train.lr: 0.001 in the run, 0.5 now" in stderr
    code, stderr = run_vlfit("train", "--resume", run_dir, "--overwrite")
    assert code == 2 and "cannot be combined" in stderr
    code, stderr = run_vlfit("train", "--resume", tmp_path)
    assert code == 2 and "not a vlfit run" in stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing touched


# ----------------------------------------------------------------------------- code in files


def payload(marker: Path) -> bytes:
    class Exploit:
        def __reduce__(self):
            return open, (str(marker), "w")  # unpickling this creates `marker`

    return pickle.dumps(Exploit())


def test_pickle_in_place_of_a_checkpoint_is_refused_and_never_runs(signalled, tmp_path, run_vlfit):
    pickle.loads(payload(tmp_path / "proof"))
    assert (tmp_path / "proof").exists()  # the payload is live: loading it would run code

    run_dir = tmp_path / "run"
    shutil.copytree(signalled["int-twice"][0], run_dir)
    marker = tmp_path / "pwned"
    for ckpt in (run_dir / "checkpoints").iterdir():
        (ckpt / "model.safetensors").write_bytes(payload(marker))
    code, stderr = run_vlfit("eval", run_dir, "--checkpoint", "last")
    assert code == 2 and "holds a pickle" in stderr and "Traceback" not in stderr
    code, stderr = run_vlfit("train", "--resume", run_dir)
    assert code == 2 and "no usable checkpoint" in stderr and "holds a pickle" in stderr
    (run_dir / "checkpoints" / "last" / "model.safetensors").unlink()
    (run_dir / "checkpoints" / "last" / "checkpoint.pt").write_bytes(payload(marker))  # torch.save's name
    code, stderr = run_vlfit("eval", run_dir, "--checkpoint", "last")
    assert code == 2 and "checkpoint.pt holds a pickle" in stderr
    assert not marker.exists()


def test_pickled_backbone_weights_are_refused(clip_dir, tmp_path):
    from vlfit.errors import UserError
    from vlfit.models import build_backbone

    model_dir = tmp_path / "model"
    shutil.copytree(clip_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (model_dir / "pytorch_model.bin").write_bytes(payload(marker))
    with pytest.raises(UserError, match="only from model.safetensors"):
        build_backbone(str(model_dir))
    assert not marker.exists()


def test_source_never_unpickles():
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "vlfit").rglob("*.py"))
    assert not re.search(r"pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)", source)
    assert "trust_remote_code=True" not in source


def test_loader_workers_change_nothing(overrides, reference, tmp_path):
    # Augmentation is seeded per image and epoch, so worker processes draw what the main process
    # would: why a resume may change data.num_workers.
    train(load_config(DEMO, [*overrides, "data.num_workers=2"]), tmp_path, show=False)
    assert_same_outcome(outcome(tmp_path), reference)


@pytest.fixture(scope="module")
def masked_overrides(clip_dir) -> list[str]:
    # The third epoch (steps 17-24) is FLIP's unmasked phase.
    return [*tiny(clip_dir), "model.mask.kind=attentive", "model.mask.block=2", "loss.contrastive_weight=0.5",
            "model.mask.unmasked_epochs=1"]


@pytest.fixture(scope="module")
def masked_reference(masked_overrides, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("masked-reference")
    train(load_config(DEMO, masked_overrides), run_dir, show=False)
    return run_dir


# Killed in the masked phase (resumed from step 12, it crosses into the unmasked phase) and inside
# the unmasked phase (resumed from step 18, part way through it).
@pytest.mark.parametrize("kill_step,resumed_from", [(13, 12), (20, 18)])
def test_masked_run_with_ema_teacher_resumes_exactly(kill_step, resumed_from, masked_overrides, masked_reference,
                                                     tmp_path):
    """The EMA teacher chooses which tokens the online tower sees, and the epoch whether it masks at
    all: resume must restore the one and replay the other exactly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(HELPER), "SIGKILL", f"step:{kill_step}", "--", "train", str(DEMO),
           *as_set_args(masked_overrides), "--run-dir", str(killed)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = json.loads((killed / "checkpoints" / "last" / "state.json").read_text())
    assert "teacher" in state["parts"]  # the teacher is part of what a checkpoint holds
    assert state["meta"]["step"] == resumed_from  # the periodic checkpoint before the kill
    train(load_config(DEMO, masked_overrides), killed, show=False, resume=True)
    assert_same_outcome(outcome(killed), outcome(masked_reference))
    records = MetricsLog.read(masked_reference / "metrics.jsonl")
    # 4x4 patches in 4 cells of 2x2: A-CLIP's count keeps int(4 * 0.5) + 1 = 3 cells
    assert [(r["masked"], r["kept_token_fraction"]) for r in records] == [(True, 0.75), (True, 0.75), (False, 1.0)]
