"""The tokenizers real checkpoints ship: SigLIP's SentencePiece model, CLIP's byte-level BPE, and a
clear exit when a library a tokenizer needs is missing."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from vlfit.errors import UserError
from vlfit.models import load_backbone

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "tiny-clip.yaml"
CLASSES = ["calling", "texting", "listening_to_music", "using_laptop"]
PROMPT = "a photo of a person listening to music."
# 15 classes, 60 images of 32x32 (48 train, 12 val), one epoch: a run takes a few seconds.
TINY = ["data.num_images=75", "data.image_size=32", "train.epochs=1", "train.micro_batch=16", "train.eval_batch=16"]


def as_set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def assert_classes_differ(class_emb: torch.Tensor) -> None:
    """Rows of a (C, E) class-embedding matrix are pairwise distinct: the tokenizer told the prompts apart."""
    distance = torch.cdist(class_emb, class_emb) + torch.eye(len(class_emb))
    assert distance.min() > 1e-3


def test_siglip_checkpoint_tokenizes_with_its_sentencepiece_model(siglip_dir):
    import sentencepiece as spm

    assert not (siglip_dir / "tokenizer.json").exists()  # as on the hub: spiece.model alone
    text = load_backbone(str(siglip_dir), with_text=True).text
    tok = text.tokenizer
    assert type(tok).__name__ == "SiglipTokenizer" and not tok.is_fast  # the slow, SentencePiece-backed class
    sp = spm.SentencePieceProcessor(model_file=str(siglip_dir / "spiece.model"))
    # SiglipTokenizer lower-cases, drops punctuation, encodes with the SentencePiece model and ends with </s>.
    expected = sp.encode("a photo of a person listening to music") + [sp.piece_to_id("</s>")]
    assert tok(PROMPT)["input_ids"] == expected
    assert tok.pad_token_id == sp.piece_to_id("</s>") == text.text_model.config.pad_token_id
    with torch.no_grad():
        assert_classes_differ(text.class_embeddings(CLASSES))


def test_clip_checkpoint_tokenizes_with_its_byte_level_bpe(clip_dir):
    assert not (clip_dir / "tokenizer.json").exists()  # vocab.json + merges.txt, converted on loading
    text = load_backbone(str(clip_dir), with_text=True).text
    tok = text.tokenizer
    # transformers 4.x converts the files to CLIPTokenizerFast; in 5.x CLIPTokenizer is the fast one.
    assert type(tok).__name__ in ("CLIPTokenizer", "CLIPTokenizerFast") and tok.is_fast
    ids = tok(PROMPT)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    vocab = json.loads((clip_dir / "vocab.json").read_text())
    assert ids == [vocab[t] for t in tokens]
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert "".join(tokens[1:-1]).replace("</w>", " ").split() == ["a", "photo", "of", "a", "person", "listening",
                                                                  "to", "music", "."]
    assert {"photo</w>", "person</w>"} <= set(tokens)  # whole words: merges.txt was applied
    assert ids.index(tok.eos_token_id) == len(ids) - 1 and tok.eos_token_id == text.text_model.config.eos_token_id
    with torch.no_grad():
        assert_classes_differ(text.class_embeddings(CLASSES))


@pytest.mark.parametrize("fixture", ["clip_dir", "siglip_dir"])
def test_zero_shot_dual_loss_and_wise_ft_run_on_real_tokenizers(fixture, request, run_vlfit, tmp_path):
    overrides = [f"model.backbone={request.getfixturevalue(fixture)}", *TINY]
    with mock.patch("vlfit.cli.echo") as echo:
        code, stderr = run_vlfit("zeroshot", DEMO, *as_set_args(overrides))
    assert code == 0, stderr
    zs_acc = float(re.search(r"val_acc (\d\.\d{4})", echo.call_args.args[0]).group(1))
    run_dir = tmp_path / "run"
    # One run with every part that reads class prompts: the zero-shot head, the contrastive term, WiSE-FT.
    code, stderr = run_vlfit("train", DEMO, *as_set_args([*overrides, "model.head=zeroshot",
                                                          "loss.contrastive_weight=0.5", "wise_ft.alphas=[0.0,1.0]"]),
                             "--run-dir", run_dir)
    assert code == 0, stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["best_val_acc"] <= 1.0
    sweep = json.loads((run_dir / "wise_ft.json").read_text())
    assert [r["alpha"] for r in sweep] == [0.0, 1.0]
    assert round(sweep[0]["val_acc"], 4) == zs_acc  # alpha 0 is the zero-shot classifier `vlfit zeroshot` scored


def test_missing_tokenizer_library_is_one_line_and_exit_2(siglip_dir):
    # Fresh interpreters in which the module cannot be imported, as on an install that lacks it; started
    # together, as most of each run is importing torch and transformers.
    path = [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]  # this checkout first
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    args = ["zeroshot", str(DEMO), *as_set_args([f"model.backbone={siglip_dir}", *TINY])]
    runs = {package: subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.modules[{module!r}] = None; from vlfit.cli import main; main()",
         *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        for module, package in [("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")]}
    for package, proc in runs.items():
        stderr = proc.communicate(timeout=300)[1]
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in stderr, stderr
        assert len(lines) == 1 and f"'{package}'" in lines[0] and f"pip install {package}" in lines[0], stderr


def test_checkpoint_without_tokenizer_files_is_a_user_error(clip_dir, tmp_path):
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(clip_dir / name, tmp_path / name)
    load_backbone(str(tmp_path))  # the vision tower alone needs no tokenizer
    with pytest.raises(UserError, match="tokenizer"):
        load_backbone(str(tmp_path), with_text=True)
