"""Every layout of a dataset gives the same images, classes, ids and split; unusable evaluation data is refused."""

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from layouts import (CLASSES, Item, clean_items, encode, hf_cache, picture, write_csv, write_disk,  # noqa: F401
                     write_hub_parquet, write_imagefolder, write_kaggle)
from rich.console import Console
from safetensors.torch import load_file
from test_train import TIMING

from vlfit.config import DataConfig, load_config
from vlfit.data import load_source, prepare_data
from vlfit.data.inspect import inspect_data
from vlfit.data.synthetic import HAR_CLASSES
from vlfit.errors import ConfigError, UserError
from vlfit.evaluate import evaluate_run
from vlfit.metrics import MetricsLog
from vlfit.train import train


def every_layout(root, items):
    """data.source -> data.path of `items` written in each layout, all holding the same bytes."""
    return {
        "hub": str(write_hub_parquet(root / "hub-clone", {"train": items})),  # a local clone of a hub repo
        "parquet": str(write_hub_parquet(root / "parquet", {"train": items}) / "data" / "train-00000-of-00001.parquet"),
        "disk": str(write_disk(root / "disk", {"train": items})),
        "kaggle": str(write_kaggle(root / "kaggle", items)),
        "imagefolder": str(write_imagefolder(root / "folder", items)),
        "csv": str(write_csv(root / "manifest", items)),
    }


def test_every_layout_gives_same_classes_ids_labels_and_split(tmp_path):
    items = clean_items(per_class=8)
    seen = {}
    for source, path in every_layout(tmp_path, items).items():
        run_dir = tmp_path / f"run-{source}"
        run_dir.mkdir()
        images, split = prepare_data(DataConfig(source=source, path=path), run_dir)
        record = json.loads((run_dir / "split.json").read_text())
        by_id = dict(zip(images.ids, images.labels.tolist()))
        seen[source] = (images.classes, by_id, record["train"], record["val"], images.images[0].tobytes())
        assert (run_dir / "classes.txt").read_text().split() == CLASSES
        assert len(record["train"]) + len(record["val"]) == len(items) and len(record["val"]) == 3 * round(8 * 0.2)
    first = seen.pop("hub")
    assert all(other == first for other in seen.values()), "a layout disagrees with the hub copy"


def test_same_dataset_in_four_layouts_trains_to_the_same_result(tmp_path):
    items = clean_items(per_class=8)
    layouts = every_layout(tmp_path, items)
    results = {}
    for source in ("parquet", "kaggle", "imagefolder", "csv"):
        run_dir = tmp_path / f"train-{source}"
        run_dir.mkdir()
        cfg = load_config(None, [f"data.source={source}", f"data.path={layouts[source]}", "train.epochs=1",
                                 "train.micro_batch=6", "train.eval_batch=32"])
        train(cfg, run_dir, show=False)
        metrics = [{k: v for k, v in r.items() if k not in TIMING} for r in MetricsLog.read(run_dir / "metrics.jsonl")]
        weights = load_file(run_dir / "checkpoints" / "last" / "model.safetensors")
        results[source] = (metrics, (run_dir / "split.json").read_text().split('"train"')[1], weights)
    reference_metrics, reference_split, reference_weights = results.pop("parquet")
    # `vlfit eval` finds the run's validation images again from the split's ids.
    assert evaluate_run(tmp_path / "train-kaggle")["val_acc"] == reference_metrics[-1]["val_acc"]
    for source, (metrics, split, weights) in results.items():
        assert metrics == reference_metrics, source
        assert split == reference_split, source
        assert all(np.array_equal(weights[k].numpy(), reference_weights[k].numpy()) for k in weights), source


def test_class_order_is_the_classlabel_order_for_tables_and_sorted_names_otherwise(tmp_path):
    items = clean_items(per_class=4)
    declared = ["sitting", "clapping", "running"]  # deliberately not alphabetical
    hub = write_hub_parquet(tmp_path / "hub", {"train": items}, classes=declared)
    images = load_source(DataConfig(source="parquet", path=str(hub)))
    assert images.classes == declared
    assert [images.classes[c] for c in images.labels] == [_label_of(items, n) for n in images.names]
    kaggle = load_source(DataConfig(source="kaggle", path=str(write_kaggle(tmp_path / "k", items))))
    assert kaggle.classes == sorted(declared)


def _label_of(items, name):
    return next(it.label for it in items if it.filename == name)


def test_classes_key_fixes_order_and_skips_other_labels(tmp_path):
    items = clean_items(per_class=4)
    kaggle = str(write_kaggle(tmp_path / "k", items))
    images = load_source(DataConfig(source="kaggle", path=kaggle, classes=["sitting", "running"]))
    assert images.classes == ["sitting", "running"]
    assert sorted(np.bincount(images.labels).tolist()) == [4, 4]  # the clapping rows are unknown labels now


@pytest.fixture
def placeholder_hub(tmp_path):
    """The HAR hub copy in miniature: a labelled train split and a test split whose labels are all 0."""
    items = clean_items(per_class=6)
    test = [Item(f"test_{i}.jpg", CLASSES[0], it.data) for i, it in enumerate(clean_items(per_class=2, size=36))]
    return write_hub_parquet(tmp_path / "hub", {"train": items, "test": test})


def test_placeholder_test_labels_are_refused_for_evaluation(placeholder_hub, tmp_path):
    cfg = DataConfig(source="parquet", path=str(placeholder_hub), val_split="test")
    with pytest.raises(UserError) as info:
        prepare_data(cfg, tmp_path)
    message = str(info.value)
    assert "data.val_split: 'test' cannot be used for evaluation" in message
    assert "all 6 labels are 'clapping' (label 0)" in message and "placeholder" in message
    assert "\n" not in message
    # The same data with a hold-out from train is fine.
    images, split = prepare_data(DataConfig(source="parquet", path=str(placeholder_hub)), tmp_path)
    assert len(split.val) == 3 * round(6 * 0.2)


def test_train_command_refuses_placeholder_labels_in_one_line(placeholder_hub, tmp_path):
    config = tmp_path / "har.yaml"
    config.write_text(yaml.safe_dump({"data": {"source": "hub", "path": str(placeholder_hub), "val_split": "test"},
                                      "train": {"epochs": 1, "micro_batch": 4}}))
    result = subprocess.run([sys.executable, "-m", "vlfit", "train", str(config), "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "placeholder" in errors[0] and "Traceback" not in result.stderr


def test_eval_on_placeholder_labels_is_refused_for_the_reason_training_gives(placeholder_hub, tmp_path, run_vlfit):
    with pytest.raises(UserError) as info:
        prepare_data(DataConfig(source="parquet", path=str(placeholder_hub), val_split="test"), tmp_path)
    reason = str(info.value).split("cannot be used for evaluation: ")[1].split("; it can still")[0]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(load_config(None, ["data.source=parquet", f"data.path={placeholder_hub}", "train.epochs=1",
                             "train.micro_batch=6", "train.eval_batch=32"]), run_dir, show=False)
    for override in ("train_split=test", "val_split=test"):
        code, err = run_vlfit("eval", run_dir, "--data", override)
        assert code == 2, err
        assert err.strip() == f"error: --data {override}: 'test' cannot be used for evaluation: {reason}"
    assert not list(run_dir.glob("eval-*.json"))


def test_inspect_of_refused_data_counts_each_source_split_as_itself(placeholder_hub, tmp_path):
    out = io.StringIO()
    cfg = DataConfig(source="parquet", path=str(placeholder_hub), val_split="test")
    problems = inspect_data(cfg, tmp_path / "report", console=Console(file=out, width=200))
    assert len(problems) == 1 and "placeholder" in problems[0]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in out.getvalue().splitlines() if "│" in line]
    counts = {row[1]: row[2:] for row in cells if len(row) == 5}  # class: train, val, total
    assert counts == {"clapping": ["6", "6", "12"], "running": ["6", "0", "6"], "sitting": ["6", "0", "6"],
                      "all": ["18", "6", "24"]}


def test_unlabelled_kaggle_test_split_is_refused_for_evaluation(tmp_path):
    items = clean_items(per_class=4)
    kaggle = write_kaggle(tmp_path / "k", items, test=[Item("Image_900.jpg", None, items[0].data)])
    with pytest.raises(UserError, match="'test' cannot be used for evaluation: it has no labels"):
        prepare_data(DataConfig(source="kaggle", path=str(kaggle), val_split="test"), tmp_path)


def test_labelled_val_split_is_used_whole_and_training_copies_of_it_are_dropped(tmp_path):
    items = clean_items(per_class=6)
    val = clean_items(per_class=2, size=40)
    leaked = Item("leaked.jpg", val[0].label, val[0].data)  # a validation image also in train
    hub = write_hub_parquet(tmp_path / "hub", {"train": [*items, leaked], "validation": val})
    images, split = prepare_data(DataConfig(source="parquet", path=str(hub), val_split="validation"), tmp_path)
    assert sorted(images.names[i] for i in split.val) == sorted(it.filename for it in val)
    assert sorted(images.names[i] for i in split.train) == sorted(it.filename for it in items)
    dropped = json.loads((tmp_path / "duplicates.json").read_text())["groups"][0]["members"]
    assert {m["name"]: m.get("dropped") for m in dropped} == {
        "leaked.jpg": "exact duplicate of a 'validation' image", val[0].filename: None}


@pytest.mark.parametrize("overrides,expected", [
    (["data.source=kaggle"], "data.path: source kaggle needs a path"),
    (["data.val_split=test"], "data.val_split: not used by source synthetic-har"),
    (["data.source=csv", "data.path=x.csv", "data.val_split=train"], "data.val_split: must differ"),
    (["data.classes=[a, a]"], "data.classes: must name at least two classes, each once"),
])
def test_inconsistent_data_config_is_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    [problem] = info.value.problems
    assert problem.startswith(expected)


@pytest.mark.parametrize("source,path,expected", [
    ("kaggle", "missing", "holds no Training_set.csv"),
    ("imagefolder", "missing", "is not a folder"),
    ("csv", "missing.csv", "not found"),
    ("parquet", "missing.parquet", "data.path: cannot load parquet dataset"),
    ("disk", "missing", "data.path: cannot load disk dataset"),
    ("hub", "./missing", "data.path: cannot load hub dataset"),
])
def test_missing_data_is_a_clear_error(tmp_path, source, path, expected):
    with pytest.raises(UserError, match=expected):
        load_source(DataConfig(source=source, path=str(tmp_path / path)))


def test_csv_with_a_header_and_no_rows_says_so(tmp_path):
    (tmp_path / "labels.csv").write_text("path,label\n")
    with pytest.raises(UserError, match=r"^data.path: .*labels.csv has a header but no rows$"):
        load_source(DataConfig(source="csv", path=str(tmp_path / "labels.csv")))


def test_one_class_folder_is_refused_as_one_class_not_as_placeholders(tmp_path):
    folder = write_imagefolder(tmp_path / "f", [it for it in clean_items(per_class=6) if it.label == "running"])
    with pytest.raises(UserError) as info:
        prepare_data(DataConfig(source="imagefolder", path=str(folder)), tmp_path)
    assert str(info.value) == ("data.train_split: 'train' cannot be trained on: the data has only one class, "
                               "'running'; a classifier needs at least two")


@pytest.fixture
def mistyped(tmp_path):
    """A CSV manifest of HAR's 15 classes, 5 images each, and one row whose label is a typo: 'juggling'."""
    items = clean_items(per_class=5, classes=HAR_CLASSES)
    return write_csv(tmp_path / "har", [*items, Item("typo.jpg", "juggling", encode(picture("juggling", 0)))])


def test_a_class_too_small_to_learn_or_score_is_refused_naming_it(mistyped, tmp_path, run_vlfit):
    config = tmp_path / "har.yaml"
    config.write_text(yaml.safe_dump({"data": {"source": "csv", "path": str(mistyped)}}))
    code, err = run_vlfit("data", "inspect", config, "--out", tmp_path / "report")
    assert code == 2, err
    assert err.startswith("error: data.min_class_images: 1 of 16 classes has fewer than 5 images or none to "
                          "validate on: 'juggling' (1 train, 0 val). A mistyped label")
    assert "data.classes" in err and "data.allow_small_classes" in err
    assert not (tmp_path / "report" / "split.json").exists()


TYPO_ROW = ("images/typo.jpg", "unknown label 'juggling' (not one of the 15 classes)")


@pytest.mark.parametrize("key,classes,bad", [
    (f"data.classes={list(HAR_CLASSES)}", list(HAR_CLASSES), [TYPO_ROW]),  # the typo is a bad row
    ("data.allow_small_classes=true", sorted([*HAR_CLASSES, "juggling"]), []),  # the typo is a class
], ids=["classes", "allow"])
def test_listed_classes_or_the_allow_key_train_despite_a_small_class(mistyped, tmp_path, key, classes, bad):
    cfg = load_config(None, ["data.source=csv", f"data.path={mistyped}", key, "train.epochs=1",
                             "train.micro_batch=8", "train.eval_batch=64"])
    train(cfg, tmp_path, show=False)
    assert (tmp_path / "summary.json").is_file()
    assert (tmp_path / "classes.txt").read_text().split() == classes
    with (tmp_path / "bad_files.csv").open(newline="") as f:
        assert [(row["name"], row["reason"]) for row in csv.DictReader(f)] == bad
    # Allowed, the small class is still reported.
    assert ("'juggling' (1 train, 0 val)" in (tmp_path / "train.log").read_text()) == (not bad)


def test_unknown_split_names_the_splits_there_are(tmp_path):
    hub = write_hub_parquet(tmp_path / "hub", {"train": clean_items(per_class=2)})
    with pytest.raises(UserError, match=r"data.train_split: no split 'trian' in .* \(it has: train\)"):
        load_source(DataConfig(source="parquet", path=str(hub), train_split="trian"))


def test_manifest_split_column_and_imagefolder_split_folders(tmp_path):
    items, val = clean_items(per_class=4), clean_items(per_class=2, size=40)
    manifest = write_csv(tmp_path / "m", items)
    write_csv(tmp_path / "v", val)
    rows = manifest.read_text().splitlines()
    rows = [rows[0] + ",split"] + [r + ",train" for r in rows[1:]]
    rows += [f"../v/images/{it.filename},{it.label},val" for it in val]
    manifest.write_text("\n".join(rows) + "\n")
    write_imagefolder(tmp_path / "f" / "train", items)
    write_imagefolder(tmp_path / "f" / "val", val)
    for source, path in (("csv", manifest), ("imagefolder", tmp_path / "f")):
        run_dir = tmp_path / source
        run_dir.mkdir()
        images, split = prepare_data(DataConfig(source=source, path=str(path), val_split="val"), run_dir)
        assert (len(split.train), len(split.val)) == (len(items), len(val)), source
