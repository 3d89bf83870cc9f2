"""`vlfit compare`, `report`, `eval`, `predict` and the report files, on two tiny runs trained once."""

import base64
import csv
import io
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from matplotlib.colors import to_rgb
from matplotlib.legend import Legend
from PIL import Image

from vlfit.cli import cli, main
from vlfit.compare import plan, resume_or_restart, run_state
from vlfit.config import load_config
from vlfit.data import load_source, load_split
from vlfit.errors import UserError
from vlfit.evaluate import classification_metrics
from vlfit.metrics import MetricsLog
from vlfit.report import build_report, load_run, plots, write_mask_examples
from vlfit.report.plots import mask_overlay

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs" / "demo" / "tiny-clip.yaml", ROOT / "configs" / "demo" / "tiny-siglip.yaml"]
QUICK = ["data.num_images=150", "data.image_size=64", "train.epochs=2", "train.micro_batch=32"]
SETS = [a for q in QUICK for a in ("--set", q)]
PLOTS = ["accuracy.png", "loss.png", "time_memory.png", "accuracy_vs_time.png", "per_class.png"]


def vlfit(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlfit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """The `vlfit` entry point called in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    def call(*args):
        monkeypatch.setattr(sys, "argv", ["vlfit", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return call


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    result = vlfit("compare", *CONFIGS, *SETS, "--out", out)
    assert result.returncode == 0, result.stderr
    return out, result


def runs_of(out: Path) -> list[Path]:
    return [out / "tiny-clip", out / "tiny-siglip"]


def test_compare_writes_every_report_file(compared):
    out, result = compared
    report = out / "report"
    expected = {"report.md", "report.html", "summary.csv", "summary.json", *PLOTS,
                "confusion-tiny-clip.png", "confusion-tiny-siglip.png"}
    assert expected <= {p.name for p in report.iterdir()}
    for png in PLOTS:
        assert Image.open(report / png).size[0] > 300
    assert f"report: {report / 'report.html'}" in result.stdout
    for run in runs_of(out):
        assert (run / "eval.json").is_file() and list(run.glob("events.out.tfevents.*"))


def test_summary_equals_metrics_files(compared):
    out, _ = compared
    summary = json.loads((out / "report" / "summary.json").read_text())
    rows = summary["runs"]
    assert [r["model"] for r in rows] == ["tiny-clip", "tiny-siglip"] and summary["reference"] == "tiny-clip"
    for row, run in zip(rows, runs_of(out)):
        epochs = MetricsLog.read(run / "metrics.jsonl")
        own = json.loads((run / "summary.json").read_text())
        ev = json.loads((run / "eval.json").read_text())
        assert row["best_val_acc"] == own["best_val_acc"] == max(r["val_acc"] for r in epochs)
        assert row["best_epoch"] == own["best_epoch"]
        assert row["final_val_acc"] == epochs[-1]["val_acc"]
        assert row["mean_epoch_time_s"] == pytest.approx(own["mean_epoch_time_s"], rel=1e-12)
        assert row["total_train_time_s"] == pytest.approx(sum(r["epoch_time_s"] for r in epochs), rel=1e-12)
        assert row["peak_mem_mb"] == own["peak_mem_mb"] == max(r["peak_mem_mb"] for r in epochs)
        assert row["trainable_params"] == own["trainable_params"]
        assert (row["top5_acc"], row["macro_f1"]) == (ev["top5_acc"], ev["macro_f1"])
    first, second = rows
    assert first["speed_vs_first"] == 1.0 and first["memory_vs_first"] == 1.0
    assert second["speed_vs_first"] == pytest.approx(second["train_images_per_s"] / first["train_images_per_s"])
    assert "kept_token_fraction" not in first  # no masking columns for unmasked runs
    with (out / "report" / "summary.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    for row, csv_row in zip(rows, csv_rows):
        for key in ("best_val_acc", "mean_epoch_time_s", "peak_mem_mb", "speed_vs_first"):
            assert float(csv_row[key]) == row[key]
        assert csv_row["model"] == row["model"] and int(csv_row["best_epoch"]) == row["best_epoch"]


def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """Each '### name' section's table as rows of cells, header first."""
    tables = {}
    for name, body in re.findall(r"^### (.+?)\n\n((?:\|.*\n)+)", text, flags=re.M):
        lines = [line for line in body.strip().splitlines() if not line.startswith("|---")]
        tables[name] = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return tables


def test_epoch_tables_equal_metrics_and_mark_the_best_epoch(compared):
    out, _ = compared
    tables = markdown_tables((out / "report" / "report.md").read_text())
    assert set(tables) == {"tiny-clip", "tiny-siglip"}
    for run in runs_of(out):
        header, *rows = tables[run.name]
        assert header[:5] == ["epoch", "train loss", "train acc", "val loss", "val acc"]
        assert "kept tokens" not in header  # unmasked runs have no masking columns
        epochs = MetricsLog.read(run / "metrics.jsonl")
        best = json.loads((run / "summary.json").read_text())["best_epoch"]
        assert len(rows) == len(epochs)
        for cells, r in zip(rows, epochs):
            assert cells[0] == (f"{r['epoch']} (best)" if r["epoch"] == best else str(r["epoch"]))
            assert cells[2] == f"{r['train_acc']:.3f}" and cells[4] == f"{r['val_acc']:.3f}"
            assert cells[5] == f"{r['epoch_time_s']:.1f}" and cells[7] == f"{r['peak_mem_mb']:.0f}"


def test_html_is_well_formed_and_self_contained(compared):
    out, _ = compared
    page = (out / "report" / "report.html").read_text()
    root = ET.fromstring(page.split("\n", 1)[1])  # after <!DOCTYPE html>: XML-well-formed
    outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"[a-z]+://|url\(|<link|<script|@import", outside, flags=re.I), "the page needs something outside itself"
    assert all(e.get("href") is None for e in root.iter())
    images = list(root.iter("img"))
    pngs = {p.name for p in (out / "report").glob("*.png")}
    assert len(images) == len(pngs)
    for img in images:
        src = img.get("src")
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    text = "".join(root.itertext())
    for heading in ("Findings", "Summary", "Per-class results", "Confusion matrices", "Training per epoch", "Setup"):
        assert heading in text
    assert len(list(root.iter("table"))) == 2 + 1 + 2 + 2  # summary x2, per-class, epoch tables, setup + config diff


def test_confusion_matrix_sums_to_the_validation_split(compared):
    out, _ = compared
    for run in runs_of(out):
        ev = json.loads((run / "eval.json").read_text())
        cm = np.array(ev["confusion_matrix"])
        val = json.loads((run / "split.json").read_text())["val"]
        assert cm.shape == (15, 15) and cm.sum() == len(val) == ev["images"]
        assert np.trace(cm) / cm.sum() == pytest.approx(ev["val_acc"])
        assert ev["val_acc"] == json.loads((run / "summary.json").read_text())["best_val_acc"] == ev["recorded_val_acc"]
        assert [c["support"] for c in ev["per_class"]] == cm.sum(axis=1).tolist()
        assert ev["val_acc"] <= ev["top5_acc"] <= 1


def test_tensorboard_logs_every_step_and_epoch(compared):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = compared
    run = runs_of(out)[0]
    events = EventAccumulator(str(run))
    events.Reload()
    epochs = MetricsLog.read(run / "metrics.jsonl")
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, epochs[-1]["step"] + 1))
    assert len(events.Scalars("train/lr")) == len(steps)
    val_acc = events.Scalars("epoch/val_acc")
    assert [e.step for e in val_acc] == [r["step"] for r in epochs]
    assert [e.value for e in val_acc] == pytest.approx([r["val_acc"] for r in epochs], rel=1e-6)


def test_compare_again_skips_finished_runs(compared, run_cli):
    out, _ = compared
    before = {run: (run / "metrics.jsonl").stat().st_mtime_ns for run in runs_of(out)}
    result = run_cli("compare", *CONFIGS, *SETS, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("skipped") == 2
    assert {run: (run / "metrics.jsonl").stat().st_mtime_ns for run in runs_of(out)} == before


def test_report_rebuilds_an_identical_summary_from_runs_alone(compared, run_cli, tmp_path):
    out, _ = compared
    result = run_cli("report", *runs_of(out), "--out", tmp_path / "again")
    assert result.returncode == 0, result.stderr
    for name in ("summary.json", "summary.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (out / "report" / name).read_bytes()
    # a folder of runs stands for its runs, in the order compare ran them
    result = run_cli("report", out, "--out", tmp_path / "folder")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "folder" / "summary.json").read_bytes() == (out / "report" / "summary.json").read_bytes()


def test_report_never_replaces_a_foreign_folder(compared, run_cli, tmp_path):
    out, _ = compared
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli("report", *runs_of(out), "--out", tmp_path)
    assert result.returncode == 2 and "not a vlfit report" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def val_images_as_files(run: Path, folder: Path) -> list[tuple[Path, str]]:
    cfg = load_config(run / "config.yaml")
    images = load_source(cfg.data)
    split = load_split(run / "split.json", images)
    files = []
    for i in split.val:
        path = folder / f"{i:04d}.png"
        Image.fromarray(images.images[i]).save(path)  # PNG is lossless: the same pixels as in training
        files.append((path, images.classes[images.labels[i]]))
    return files


def test_predict_on_image_files_agrees_with_eval(compared, run_cli, tmp_path):
    out, _ = compared
    run = runs_of(out)[0]
    files = val_images_as_files(run, tmp_path)
    result = run_cli("predict", run, tmp_path, "--top-k", "15", "--csv", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15 * len(files)
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["path"], []).append(row)
    hits = 0
    for path, label in files:
        ranked = by_image[str(path)]
        probs = [float(r["probability"]) for r in ranked]
        assert all(0 <= p <= 1 for p in probs) and probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1, abs=1e-4)
        hits += ranked[0]["class"] == label
    assert hits / len(files) == pytest.approx(json.loads((run / "eval.json").read_text())["val_acc"])

    result = run_cli("predict", run, files[0][0], files[1][0], "--top-k", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(files[0][0])) and lines[0].count(",") == 2


def test_predict_errors_are_clear(compared, run_cli, tmp_path):
    out, _ = compared
    run = runs_of(out)[0]
    (tmp_path / "notes.png").write_text("not an image")
    for args, message in [([tmp_path / "missing.jpg"], "no such file"), ([tmp_path / "notes.png"], "not an image"),
                          ([tmp_path / "notes.png", "--top-k", "0"], "top-k")]:
        result = run_cli("predict", run, *args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_eval_prints_and_writes_metrics_on_other_data(compared, run_cli):
    out, _ = compared
    run = runs_of(out)[0]
    result = run_cli("eval", run, "--data", "seed=7")
    assert result.returncode == 0, result.stderr
    ev = json.loads((run / "eval-best-seed=7.json").read_text())
    assert ev["images"] == 150 and np.array(ev["confusion_matrix"]).sum() == 150 and ev["split"] == "all"
    assert "macro F1" in result.stdout and "using_laptop" in result.stdout
    # the same images the run trained on are refused, not scored
    result = run_cli("eval", run, "--data", "val_fraction=0.5")
    assert result.returncode == 2 and "used to train this run" in result.stderr


# ----------------------------------------------------------------------------- without training


def test_classification_metrics_by_hand():
    # 3 classes; labels 0,0,1,2; predictions 0,1,1,1
    logits = torch.tensor([[3.0, 1, 0], [1, 2, 0], [0, 2, 1], [1, 2, 0]])
    labels = torch.tensor([0, 0, 1, 2])
    m = classification_metrics(logits, labels, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert m["val_acc"] == 0.5 and m["top_k"] == 3 and m["top5_acc"] == 1.0
    # F1: a = 2*1/(2+1), b = 2*1/(1+3), c = 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert [c["accuracy"] for c in m["per_class"]] == [0.5, 1.0, 0.0]
    assert m["per_class"][2]["precision"] is None  # never predicted
    assert m["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


def fake_run(path: Path, name: str, acc: list[float], masked: bool, rng: np.random.Generator,
             unmasked: int = 0) -> Path:
    """A run directory written by hand, as a masked run (kept_token_fraction, saliency_time_s) would write it;
    with `unmasked`, as one whose last epochs trained on every token, before that it wrote no "masked" key."""
    path.mkdir(parents=True)
    config = yaml.safe_load(load_config(None, ["name=" + name]).to_yaml())
    if masked:  # as the masking methods' configs name them
        config["model"] |= {"finetune": "lora", "mask": {"kind": "attentive", "keep_ratio": 0.5,
                                                         "unmasked_epochs": unmasked}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    classes = ["a", "b", "c"]
    for i, a in enumerate(acc, 1):
        record = {"epoch": i, "train_loss": 1.0 / i, "train_acc": a + 0.1, "val_loss": 1.2 / i, "val_acc": a,
                  "epoch_time_s": 2.0 + i, "train_images_per_s": 50.0 - i, "peak_mem_mb": 900.0 + 10 * i,
                  "mem_kind": "cuda_max_allocated", "lr": 1e-3, "step": 4 * i}
        if masked:
            record |= {"kept_token_fraction": 0.5, "saliency_time_s": 0.3 * i}
        if unmasked:
            on = i <= len(acc) - unmasked
            record |= {"masked": on, "kept_token_fraction": 0.5 if on else 1.0, "saliency_time_s": 0.3 if on else 0.0}
        MetricsLog(path / "metrics.jsonl").append(record)
    (path / "summary.json").write_text(json.dumps({"name": name, "backbone": "tiny-clip", "trainable_params": 1000,
                                                   "total_params": 1000}))
    (path / "split.json").write_text(json.dumps({"train": ["x"] * 12, "val": ["y"] * 9}))
    logits, labels = torch.tensor(rng.normal(size=(9, 3))), torch.arange(9) % 3
    (path / "eval.json").write_text(json.dumps({"epoch": 1, **classification_metrics(logits, labels, classes)}))
    return path


def test_masking_columns_and_figures_appear_only_for_masked_runs(tmp_path):
    rng = np.random.default_rng(0)
    plain = fake_run(tmp_path / "plain", "plain", [0.3, 0.5], False, rng)
    masked = fake_run(tmp_path / "masked", "masked", [0.4, 0.6, 0.5], True, rng)
    write_mask_examples(masked, rng.integers(0, 255, (3, 32, 32, 3)), rng.random((3, 4, 4)) > 0.5, ["a", "b", "c"])
    build_report([plain, masked], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    tables = markdown_tables(text)
    assert "kept tokens" in tables["masked"][0] and "kept tokens" not in tables["plain"][0]
    assert tables["masked"][1][-2:] == ["0.50", "0.3"]
    assert tables["masked"][2][0] == "2 (best)"
    assert (tmp_path / "report" / "masking.png").is_file() and (tmp_path / "report" / "mask-masked.png").is_file()
    rows = json.loads((tmp_path / "report" / "summary.json").read_text())["runs"]
    assert rows[1]["kept_token_fraction"] == 0.5 and rows[1]["saliency_time_s"] == pytest.approx(1.8)
    assert "kept_token_fraction" not in rows[0] and rows[0]["method"] == "full fine-tune"
    assert rows[1]["method"] == "LoRA, attentive masking, keep 0.5"

    build_report([plain], tmp_path / "plain-report")
    assert "kept tokens" not in (tmp_path / "plain-report" / "report.md").read_text()
    assert not (tmp_path / "plain-report" / "masking.png").exists()


def test_report_marks_the_unmasked_final_epochs(tmp_path):
    rng = np.random.default_rng(0)
    old = fake_run(tmp_path / "old", "old", [0.3, 0.5, 0.4], True, rng)  # written before the phase existed
    flip = fake_run(tmp_path / "flip", "flip", [0.4, 0.6, 0.5, 0.7], True, rng, unmasked=2)
    build_report([old, flip], tmp_path / "report")
    rows = json.loads((tmp_path / "report" / "summary.json").read_text())["runs"]
    assert rows[1]["method"] == "LoRA, attentive masking, keep 0.5, last 2 epochs unmasked"
    assert (rows[0]["method"], rows[0]["unmasked_epochs"], rows[1]["unmasked_epochs"]) == \
           ("LoRA, attentive masking, keep 0.5", 0, 2)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "flip keeps 75% of tokens on average" in text and "its last 2 epochs trained on every token" in text
    assert "_Epochs 3-4 trained on every token (unmasked phase)" in text  # under flip's epoch table, only there
    assert text.count("trained on every token (unmasked phase)") == 1
    assert markdown_tables(text)["flip"][3][-2:] == ["1.00", "0.0"]
    # Both curve figures say what their shading is, in alt text and caption.
    assert text.count("Shaded, in a run's colour: the final epochs it trained on every token") == 2 * 2
    # The curves shade the span the unmasked epochs trained over (from the end of epoch 2 to the end
    # of epoch 4), in the run's colour, and only for that run.
    for figure in (plots.accuracy_curves, plots.loss_curves):
        ax = figure([load_run(old), load_run(flip)], ["old", "flip"]).axes[0]
        [span] = ax.patches
        assert (span.get_bbox().x0, span.get_bbox().x1) == (2.0, 3.0 + 1.0)
        assert span.get_facecolor()[:3] == to_rgb(plots.color(1))
        assert "unmasked epochs" in [t.get_text() for legend in ax.findobj(Legend) for t in legend.get_texts()]


def test_mask_overlay_dims_dropped_tokens():
    images = np.full((2, 16, 16, 3), 200, np.uint8)
    keep = np.zeros((2, 2, 2), bool)
    keep[:, 0, 0] = True
    fig = mask_overlay(images, keep, ["x", "y"])
    assert len(fig.axes) == 2
    shown = fig.axes[0].images[0].get_array()
    assert shown[0, 0, 0] == 200 and shown[15, 15, 0] < 60  # kept token as is, dropped token dimmed
    assert fig.axes[0].get_title() == "x\nkept 25%"
    with pytest.raises(ValueError):
        mask_overlay(images, keep[0])


def test_run_state_skips_finished_restarts_unfinished_and_protects_the_rest(tmp_path):
    cfg = load_config(CONFIGS[0], QUICK)
    run = tmp_path / "run"
    assert run_state(run, cfg) == "absent"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    assert run_state(run, cfg) == "unfinished" and resume_or_restart(run) == ["--resume", str(run)]
    (run / "summary.json").write_text("{}")
    assert run_state(run, cfg) == "finished"
    with pytest.raises(UserError, match="different config"):
        run_state(run, load_config(CONFIGS[0], [*QUICK, "train.lr=0.5"]))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not a vlfit run"):
        run_state(tmp_path / "other", cfg)


def test_compare_refuses_configs_on_different_splits(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("name: other\ndata:\n  split_seed: 7\n")
    with pytest.raises(UserError, match="data.split_seed"):
        plan([CONFIGS[0], other], QUICK, tmp_path)
    augmented = tmp_path / "augmented.yaml"
    augmented.write_text("name: augmented\ndata:\n  hflip: 0.0\n")
    assert [p.cfg.name for p in plan([CONFIGS[0], augmented], QUICK, tmp_path)] == ["tiny-clip", "augmented"]
    with pytest.raises(UserError, match="distinct"):
        plan([CONFIGS[0], CONFIGS[0]], QUICK, tmp_path)


def test_demo_compares_every_demo_config(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("vlfit.compare.compare", lambda configs, overrides, out, say: calls.append(
        (configs, overrides, out)) or out / "report" / "report.html")
    monkeypatch.setattr("vlfit.cli.print_summary", lambda report: None)
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    [(configs, overrides, out)] = calls
    assert sorted(p.name for p in configs) == sorted(p.name for p in (ROOT / "configs" / "demo").glob("*.yaml"))
    assert overrides == ["train.epochs=1"] and out == tmp_path


@pytest.mark.skipif(not __import__("shutil").which("chromium"), reason="needs Chromium (Debian package chromium)")
def test_report_renders_in_headless_chromium(compared, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from screenshot_report import screenshot

    shot = screenshot(compared[0] / "report", tmp_path / "shot.png", width=1280, height=9000)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape[1] == 1280 and pixels.shape[0] > 2000  # tables and figures, cut below the page's end
    assert (pixels < 128).mean() > 0.01  # text and plots were drawn, not an empty page
