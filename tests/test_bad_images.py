"""Bad inputs never crash a run and never pass silently: converted to RGB, or skipped and listed with a reason."""

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from layouts import (BROKEN, CLASSES, CONVERTIBLE, broken_items, clean_items, convertible_items,  # noqa: F401
                     duplicate_items, encode, hf_cache, picture, png_header_only, write_csv)
from PIL import Image
from rich.console import Console

from vlfit.config import DataConfig, load_config
from vlfit.data import load_source, prepare_data, survey_data
from vlfit.data.images import BadImage, Limits, decode
from vlfit.data.inspect import inspect_data
from vlfit.data.loaders import make_loader
from vlfit.errors import UserError
from vlfit.train import train

# Rows a CSV manifest can get wrong without any image being at fault: name -> reason phrase.
BAD_ROWS = {"images/absent.jpg": "file not found", "images/Image_1.jpg": "unknown label 'sittting'",
            "images/Image_2.jpg": "no label"}


@pytest.fixture
def faulty(tmp_path):
    """A CSV manifest over clean images plus every kind of broken, convertible and duplicate file, and bad rows."""
    items = clean_items(per_class=10)
    manifest = write_csv(tmp_path / "faulty", items + broken_items() + convertible_items() + duplicate_items(items))
    with manifest.open("a") as f:
        f.write("images/absent.jpg,running\nimages/Image_1.jpg,sittting\nimages/Image_2.jpg,\n")
    return manifest


def faulty_config(manifest, **changes) -> DataConfig:
    defaults = {"source": "csv", "path": str(manifest), "classes": CLASSES, "max_bad_fraction": 0.5}
    return DataConfig(**{**defaults, **changes})


def bad_rows(run_dir) -> list[dict]:
    with (run_dir / "bad_files.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_every_bad_file_and_row_is_listed_with_its_reason(faulty, tmp_path):
    images, split = prepare_data(faulty_config(faulty), tmp_path)
    listed = {row["name"]: row["reason"] for row in bad_rows(tmp_path)}
    expected = {f"images/{name}": phrase for name, phrase in BROKEN.items()} | BAD_ROWS
    assert set(listed) == set(expected)
    for name, phrase in expected.items():
        assert phrase in listed[name], (name, listed[name])
    converted = {f"images/{name}" for name in CONVERTIBLE}
    assert converted <= set(images.names)  # converted, not skipped
    assert len(images) == 30 + len(CONVERTIBLE) + 4  # clean + convertible + the four duplicate copies
    assert all(images.images[i].shape[2] == 3 for i in range(len(images)))


@pytest.mark.parametrize("item", convertible_items(), ids=lambda it: it.filename)
def test_convertible_images_become_rgb_uint8(item):
    stored = Image.open(io.BytesIO(item.data))
    assert stored.mode == CONVERTIBLE[item.filename]
    pixels = decode(item.data, Limits())
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    grey = np.asarray(picture(item.label, 98, size=40).convert("L"), dtype=np.int64)
    if item.filename in ("grey.png", "grey16.png"):
        assert np.array_equal(pixels[:, :, 0], pixels[:, :, 2])
        assert np.abs(pixels[:, :, 0] - grey).max() <= 1  # 16-bit values scaled, not clipped to white
    if item.filename == "alpha.png":
        assert pixels.mean() > np.asarray(picture(item.label, 98, size=40)).mean() + 40  # half-transparent over white
    if item.filename == "rotated.jpg":
        assert pixels.shape[:2] == (48, 24)  # stored 48 wide, 24 high; EXIF says turn it upright


def test_decompression_bombs_are_refused_without_decoding():
    with pytest.raises(BadImage, match="too large"):
        decode(png_header_only(60_000, 60_000), Limits())
    with pytest.raises(BadImage, match="over data.max_image_pixels"):
        decode(encode(Image.new("RGB", (300, 300)), "PNG"), Limits(max_pixels=200 * 200))


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(0, 2000), flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), max_size=6))
def test_damaged_files_raise_bad_image_and_nothing_else(cut, flips):
    data = bytearray(encode(picture("running", 1), "JPEG"))[: max(cut, 1)]
    for at, xor in flips:
        if at < len(data):
            data[at] ^= xor
    try:
        pixels = decode(bytes(data), Limits())
    except BadImage as err:
        assert str(err)
    else:
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3


def test_strict_turns_any_skip_into_an_error(faulty, tmp_path):
    with pytest.raises(UserError, match=r"data.strict: 11 unusable images or rows, e.g. images/truncated.jpg"):
        prepare_data(faulty_config(faulty, strict=True), tmp_path)
    assert len(bad_rows(tmp_path)) == 11  # the list is written before stopping


def test_data_mostly_bad_stops_with_the_fraction(faulty, tmp_path):
    with pytest.raises(UserError, match=r"data.max_bad_fraction: 11 of 51 images \(21.6%\) are unusable, more than"):
        prepare_data(faulty_config(faulty, max_bad_fraction=0.2), tmp_path)


def test_image_changed_after_the_check_is_a_user_error(tmp_path):
    manifest = write_csv(tmp_path / "m", clean_items(per_class=2))
    images = load_source(DataConfig(source="csv", path=str(manifest)))
    (manifest.parent / images.names[0]).write_bytes(b"overwritten")
    with pytest.raises(UserError, match="changed after the data check"):
        images.images[0]


def test_training_on_faulty_data_completes_and_lists_what_it_skipped(faulty, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(None, ["data.source=csv", f"data.path={faulty}", f"data.classes={CLASSES}",
                             "data.max_bad_fraction=0.5", "data.num_workers=2", "train.epochs=1",
                             "train.micro_batch=8", "train.eval_batch=64"])
    summary = train(cfg, run_dir, show=False)
    assert summary["epochs"] == 1 and (run_dir / "checkpoints" / "best" / "model.safetensors").is_file()
    assert len(bad_rows(run_dir)) == 11
    assert "skipped 11 unusable images or rows" in (run_dir / "train.log").read_text()


def test_eval_scores_exactly_the_val_split_of_a_run_whose_data_had_bad_files(tmp_path, run_vlfit, monkeypatch):
    planted = [it for it in broken_items() if it.filename in ("truncated.jpg", "tiny.png")]
    manifest = write_csv(tmp_path / "data", clean_items(per_class=8) + planted)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(None, ["data.source=csv", f"data.path={manifest}", "data.max_bad_fraction=0.1",
                             "train.epochs=1", "train.micro_batch=6", "train.eval_batch=32"])
    train(cfg, run_dir, show=False)
    assert {row["name"] for row in bad_rows(run_dir)} == {"images/truncated.jpg", "images/tiny.png"}
    at_training = json.loads((run_dir / "eval.json").read_text())
    scored = []

    def recording_loader(cfg, images, index, pre, train):
        scored.extend(images.ids[i] for i in index)
        return make_loader(cfg, images, index, pre, train)

    monkeypatch.setattr("vlfit.evaluate.make_loader", recording_loader)
    code, err = run_vlfit("eval", run_dir)
    assert code == 0, err
    assert sorted(scored) == json.loads((run_dir / "split.json").read_text())["val"]
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["val_acc"] == at_training["val_acc"] and again["images"] == at_training["images"] == len(scored)
    assert again["confusion_matrix"] == at_training["confusion_matrix"]
    assert again["val_loss"] == pytest.approx(at_training["val_loss"], rel=1e-6)


def vlfit(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlfit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def check_grid(png, classes, per_class):
    """samples.png has one row per class, and each row's first tile holds an image."""
    grid = np.asarray(Image.open(png).convert("RGB"))
    tile, pad = 72, 4
    assert grid.shape[0] == len(classes) * (tile + pad) + pad
    tiles_start = grid.shape[1] - pad - per_class * (tile + pad)
    for row in range(len(classes)):
        y = pad + row * (tile + pad)
        first = grid[y:y + tile, tiles_start:tiles_start + tile]
        assert first.std() > 10, f"row {row} ({classes[row]}) shows no image"


def test_data_inspect_reports_planted_faults(faulty, tmp_path):
    config = tmp_path / "faulty.yaml"
    config.write_text(yaml.safe_dump({"data": {"source": "csv", "path": str(faulty), "classes": CLASSES,
                                               "max_bad_fraction": 0.5}}))
    result = vlfit("data", "inspect", config, "--out", tmp_path / "report", "--per-class", 4)
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())  # rich wraps long lines
    assert "unusable: 11 of 51 images or rows" in out
    assert "1 exact and 2 near groups" in out and "copy_of_first.jpg" in out
    assert "truncated.jpg" in out and "decompression bomb" in out
    assert "CMYK 1" in out and "1 turned upright by their EXIF orientation" in out
    for name in CLASSES:
        assert name in out
    check_grid(tmp_path / "report" / "samples.png", CLASSES, per_class=4)
    split = json.loads((tmp_path / "report" / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 40


def test_data_inspect_on_synthetic_har(tmp_path):
    config = tmp_path / "synthetic.yaml"
    config.write_text(yaml.safe_dump({"data": {"num_images": 60, "image_size": 32}}))
    result = vlfit("data", "inspect", config, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = tmp_path / "runs" / "synthetic-data"
    classes = (report / "classes.txt").read_text().split()
    assert len(classes) == 15 and "using_laptop" in result.stdout
    check_grid(report / "samples.png", classes, per_class=8)


def test_data_inspect_reports_what_training_would_refuse(tmp_path):
    cfg = DataConfig(num_images=60, image_size=32, min_image_size=64, max_bad_fraction=0)
    problems = inspect_data(cfg, tmp_path / "report", console=Console(file=io.StringIO()))
    assert problems[0].startswith("data.max_bad_fraction: 60 of 60 images")
    assert len(bad_rows(tmp_path / "report")) == 60 and not (tmp_path / "report" / "split.json").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="holds other files"):
        inspect_data(cfg, tmp_path / "mine")


def test_parallel_check_finds_what_the_serial_one_finds(tmp_path):
    items = clean_items(per_class=90, size=16) + broken_items()  # enough images for worker processes
    manifest = write_csv(tmp_path / "many", items)
    serial, parallel = (survey_data(DataConfig(source="csv", path=str(manifest), num_workers=w)) for w in (0, 2))
    assert [e.problem for e in parallel.entries] == [e.problem for e in serial.entries]
    assert parallel.facts == serial.facts and len(parallel.bad) == len(BROKEN)
