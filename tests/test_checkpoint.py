"""Checkpoint files: exact round trips without pickle, damage detection, fallback, and seeded samples."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlfit.checkpoint import CheckpointError, Checkpoints, read_checkpoint, restore_parts, save_checkpoint
from vlfit.resume import RNGState, SeededSamples


def make_parts(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": RNGState()}


def meta(step: int, mid_epoch: bool = True) -> dict:
    return {"epoch": 1, "step": step, "mid_epoch": mid_epoch}


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_round_trip_restores_every_part_exactly(tmp_path):
    parts = make_parts()
    save_checkpoint(tmp_path / "ckpt", parts, meta(1))
    expected_optimizer = parts["optimizer"].state_dict()
    expected_scheduler = parts["scheduler"].state_dict()
    expected_draws = draws()

    fresh = make_parts(seed=1)  # other weights, other moments
    restore_parts(fresh, *read_checkpoint(tmp_path / "ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(fresh["model"].state_dict().values(),
                                                 parts["model"].state_dict().values()))
    restored = fresh["optimizer"].state_dict()
    assert restored["param_groups"] == expected_optimizer["param_groups"]  # tuples (betas) stay tuples
    for i, state in expected_optimizer["state"].items():  # keyed by int parameter index, as torch keeps it
        assert all(torch.equal(v, restored["state"][i][k]) for k, v in state.items())
    assert fresh["scheduler"].state_dict() == expected_scheduler
    again = draws()
    assert again[:2] == expected_draws[:2] and torch.equal(again[2], expected_draws[2])
    assert not any(f.suffix in (".pt", ".bin", ".pkl") for f in (tmp_path / "ckpt").iterdir())


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "ckpt"
    save_checkpoint(path, make_parts(), meta(1))
    return path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=st.sampled_from(["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]),
       where=st.floats(0.0, 1.0, exclude_max=True), how=st.sampled_from(["truncate", "flip"]))
def test_truncated_or_corrupted_checkpoint_is_detected(good_checkpoint, tmp_path, file, where, how):
    damaged = tmp_path / "damaged"
    shutil.rmtree(damaged, ignore_errors=True)
    shutil.copytree(good_checkpoint, damaged)
    target = damaged / file
    data = bytearray(target.read_bytes())
    offset = int(where * len(data))
    if how == "truncate":
        del data[offset:]
    else:
        data[offset] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged|pickle"):  # a flip can forge pickle's first bytes
        read_checkpoint(damaged)


def test_resume_falls_back_past_damaged_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints = Checkpoints(root)
    assert checkpoints.newest_good() is None  # a run killed before its first checkpoint starts over
    for step in (1, 2, 3):
        checkpoints.save(make_parts(step), meta(step), best=step == 2)
    assert sorted(p.name for p in root.iterdir()) == ["best", "last", "previous"]
    assert checkpoints.newest_good()[1]["meta"]["step"] == 3

    (root / "unfinished.tmp").mkdir()  # a write a crash cut short: ignored
    path = root / "last" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    found, state = checkpoints.newest_good()
    assert found.name in ("previous", "best") and state["meta"]["step"] == 2  # both hold step 2
    assert (root / "last.damaged").is_dir()  # set aside, not deleted, never rotated into `previous`

    for name in ("previous", "best"):
        (root / name / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        checkpoints.newest_good()


def test_a_crash_between_renames_loses_nothing(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints = Checkpoints(root)
    checkpoints.save(make_parts(), meta(4))
    (root / "last").rename(root / "last.old")  # as if killed after moving the old `last` aside
    assert checkpoints.newest_good()[0].name == "last.old"


def test_epoch_end_checkpoint_outranks_mid_epoch_one_at_the_same_step(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints = Checkpoints(root)
    checkpoints.save(make_parts(), meta(8, mid_epoch=True))
    checkpoints.save(make_parts(), meta(8, mid_epoch=False))  # the same step, after evaluation
    shutil.copytree(root / "previous", root / "zz-copy")  # sorted after `last` by name
    assert json.loads((checkpoints.newest_good()[0] / "state.json").read_text())["meta"]["mid_epoch"] is False


def test_periodic_checkpoints_are_due_every_n_steps():
    assert [s for s in range(1, 10) if Checkpoints(None, every=3).due(s)] == [3, 6, 9]
    assert not any(Checkpoints(None).due(s) for s in range(1, 10))


class Noise(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(2)


def test_seeded_samples_depend_on_image_and_epoch_only():
    samples = SeededSamples(Noise(), seed=3)
    first = [samples[i] for i in range(4)]
    torch.rand(100)  # whatever else drew from the global stream does not matter
    assert all(torch.equal(a, samples[i]) for i, a in enumerate(first))
    before = torch.get_rng_state()
    samples[0]
    assert torch.equal(before, torch.get_rng_state())  # the model's random stream is left as it was
    samples.set_epoch(1)
    assert not torch.equal(first[0], samples[0])
    assert not torch.equal(SeededSamples(Noise(), seed=4)[0], first[0])
