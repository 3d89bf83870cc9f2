"""`vlfit predict` decodes files as training does and resizes them as validation does."""

import csv
import json

import numpy as np
import pytest
from layouts import (BROKEN, CLASSES, CONVERTIBLE, Item, broken_items, clean_items, convertible_items, encode, picture,
                     write_imagefolder)
from PIL import Image

from vlfit.checkpoint import load_checkpoint
from vlfit.config import load_config
from vlfit.data import load_source
from vlfit.data.gpu_transforms import on_device
from vlfit.data.images import Limits, decode
from vlfit.data.loaders import make_loader
from vlfit.evaluate import predict_logits
from vlfit.predict import predict
from vlfit.train import make_accelerator, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny CLIP trained for one epoch on an image folder of three classes."""
    data = write_imagefolder(tmp_path_factory.mktemp("folder"), clean_items(per_class=10))
    run_dir = tmp_path_factory.mktemp("run")
    train(load_config(None, ["data.source=imagefolder", f"data.path={data}", "train.epochs=1",
                             "train.micro_batch=8"]), run_dir, show=False)
    return run_dir


def test_files_are_decoded_as_training_decodes_them(run, tmp_path):
    """Every stored form gives the prediction of its decoded RGB pixels; every unusable file its reason."""
    odd = tmp_path / "odd"
    write_imagefolder(odd, convertible_items() + broken_items())
    # The pixels training would see, as plain RGB PNGs: predict must treat both files alike.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in CONVERTIBLE:
        pixels = decode((odd / "sitting" / name).read_bytes(), Limits())
        (plain / f"{name}.png").write_bytes(encode(Image.fromarray(pixels), "PNG"))
    got = {p.path.name: p for p in predict(run, [odd])}
    want = {p.path.name.removesuffix(".png"): p for p in predict(run, [plain])}
    for name in CONVERTIBLE:
        assert got[name].problem is None
        assert [c for c, _ in got[name].top] == [c for c, _ in want[name].top], name
        assert np.allclose([p for _, p in got[name].top], [p for _, p in want[name].top], atol=1e-6), name
    for name, phrase in BROKEN.items():
        assert got[name].top == [] and phrase in got[name].problem, (name, got[name].problem)


def test_the_cli_lists_unusable_files_and_exits_2_only_when_none_is_usable(run, tmp_path, run_vlfit):
    folder = write_imagefolder(tmp_path / "mixed", clean_items(per_class=1) + broken_items())
    table = tmp_path / "predictions.csv"
    code, err = run_vlfit("predict", run, folder, "--csv", table)
    assert code == 0, err
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    problems = {r["path"].rsplit("/", 1)[-1]: r["problem"] for r in rows if r["problem"]}
    assert set(problems) == set(BROKEN) and "decompression bomb" in problems["bomb.png"]
    assert len([r for r in rows if not r["problem"]]) == 3 * 3  # three images, top 3 of three classes

    code, err = run_vlfit("predict", run, folder / "running" / "bomb.png")
    assert code == 2 and "too large" in err and "Traceback" not in err


def test_on_a_folder_training_never_saw_predict_scores_what_eval_scores(run, tmp_path, run_vlfit):
    # Pictures unlike the training ones in size and shape, so that any difference between the two
    # paths' decoding or resizing would show in their probabilities.
    sizes = [(72, 40), (40, 72), (90, 60), (30, 50)]  # (w, h)
    held_out = [Item(f"new_{k}.jpg", label, encode(picture(label, 100 + k).resize(sizes[k % 4]), quality=90))
                for k in range(8) for label in CLASSES]
    folder = write_imagefolder(tmp_path / "held-out", held_out)
    code, err = run_vlfit("eval", run, "--data", f"path={folder}")
    assert code == 0, err
    [written] = run.glob("eval-best-path=*.json")
    scored = json.loads(written.read_text())
    predictions = {(p.path.parent.name, p.path.name): p for p in predict(run, [folder], top_k=3)}
    hits = sum(predictions[it.label, it.filename].top[0][0] == it.label for it in held_out)
    assert scored["images"] == len(held_out)
    assert abs(hits / len(held_out) - scored["val_acc"]) <= 1 / len(held_out)  # to one image

    # Image by image: the probabilities of eval's own loader and model are predict's.
    cfg = load_config(run / "config.yaml", [f"data.path={folder}"])
    accelerator = make_accelerator(cfg.train)
    model, state = load_checkpoint(run / "checkpoints" / "best", accelerator.device)
    images = load_source(cfg.data)
    loader = make_loader(cfg, images, np.arange(len(images)), model.backbone.preprocess, train=False)
    logits, _ = predict_logits(model, on_device(loader, accelerator.device), accelerator)
    for name, probs in zip(images.names, logits.softmax(-1).tolist()):
        ours = dict(predictions[tuple(name.split("/")[-2:])].top)
        assert max(abs(ours[c] - probs[i]) for i, c in enumerate(state["classes"])) < 1e-5, name
