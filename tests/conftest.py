"""Shared fixtures: tiny real models and tokenizers saved the way the hub stores them, so `from_pretrained`
runs offline."""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

# The image cache of `data.pipeline: cached` goes to this session's own directory, never the user's
# ~/.cache; CLI tests' subprocesses inherit it.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="vlfit-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8)


def class_prompts() -> list[str]:
    """Every prompt vlfit writes for the HAR classes: the corpus the test tokenizers are trained on."""
    from vlfit.data.synthetic import HAR_CLASSES
    from vlfit.models.text import DEFAULT_TEMPLATES, prompt_name

    return [t.format(prompt_name(c)) for c in HAR_CLASSES for t in DEFAULT_TEMPLATES]


def special_token(content: str, strip: bool) -> dict:
    """A special token as tokenizer_config.json and special_tokens_map.json write it (SigLIP's strip the
    spaces around them and are not normalised; CLIP's are)."""
    return {"content": content, "single_word": False, "lstrip": strip, "rstrip": strip, "normalized": not strip}


def write_clip_tokenizer(path: Path, vocab_size: int) -> dict[str, int]:
    """Byte-level BPE files as openai/clip-vit-* repos ship them (vocab.json, merges.txt and the two
    configs; no tokenizer.json), trained on class prompts. Returns the text config's special-token ids."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    # CLIP's BPE: lower-cased words (and runs of punctuation), bytes as characters, "</w>" ending each word.
    tok = Tokenizer(BPE(unk_token=eos, continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos], end_of_word_suffix="</w>",
                         show_progress=False)
    tok.train_from_iterator(class_prompts(), trainer)
    tok.model.save(str(path))  # vocab.json, merges.txt
    specials = {"bos_token": special_token(bos, False), "eos_token": special_token(eos, False),
                "unk_token": special_token(eos, False), "pad_token": eos}
    (path / "special_tokens_map.json").write_text(json.dumps(specials))
    (path / "tokenizer_config.json").write_text(json.dumps({
        **specials,
        "add_prefix_space": False, "errors": "replace", "do_lower_case": True, "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer"}))
    return dict(bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eos),
                pad_token_id=tok.token_to_id(eos))


def write_siglip_tokenizer(path: Path, vocab_size: int) -> dict[str, int | None]:
    """A SentencePiece model as google/siglip-* repos ship it (spiece.model and the two configs; no
    tokenizer.json), trained on class prompts. Returns the text config's special-token ids."""
    import sentencepiece as spm

    model = io.BytesIO()
    eos, unk = 1, 2  # SigLIP's vocabulary begins <pad>, </s>, <unk> and has no BOS; its tokenizer pads with </s>
    spm.SentencePieceTrainer.train(sentence_iterator=iter(class_prompts()), model_writer=model,
                                   vocab_size=vocab_size, model_type="bpe", pad_id=0, eos_id=eos, unk_id=unk,
                                   bos_id=-1, minloglevel=2)
    (path / "spiece.model").write_bytes(model.getvalue())
    eos_token, unk_token = special_token("</s>", True), special_token("<unk>", True)
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": eos_token, "pad_token": eos_token, "unk_token": unk_token}))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(eos): {**eos_token, "special": True}, str(unk): {**unk_token, "special": True}},
        "additional_special_tokens": [], "clean_up_tokenization_spaces": True, "do_lower_case": True,
        "eos_token": "</s>", "model_input_names": ["input_ids"], "model_max_length": 64, "pad_token": "</s>",
        "processor_class": "SiglipProcessor", "sp_model_kwargs": {}, "tokenizer_class": "SiglipTokenizer",
        "unk_token": "<unk>"}))
    return dict(bos_token_id=None, eos_token_id=eos, pad_token_id=eos)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A full CLIPModel (vision + text towers) with its tokenizer and processor config, as in
    openai/clip-vit-* repos."""
    path = tmp_path_factory.mktemp("tiny-clip-hub")
    # CLIP's text tower pools at the first EOS token: the config must know the tokenizer's id for it.
    text = dict(TINY_TEXT, **write_clip_tokenizer(path, TINY_TEXT["vocab_size"]))
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=16)).save_pretrained(path)
    # Non-default constants, so a test can tell that they were read from this file.
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory) -> Path:
    """A full SiglipModel with its SentencePiece tokenizer and processor config, as in google/siglip-* repos."""
    path = tmp_path_factory.mktemp("tiny-siglip-hub")
    text = dict(TINY_TEXT, **write_siglip_tokenizer(path, TINY_TEXT["vocab_size"]))
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(text_config=text, vision_config=TINY_VISION)).save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _run_vlfit(*args) -> tuple[int, str]:
    from vlfit.cli import main

    err = io.StringIO()
    with mock.patch.object(sys, "argv", ["vlfit", *map(str, args)]), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


@pytest.fixture(scope="session")
def run_vlfit():
    """`run_vlfit(*args)` runs `vlfit ARGS` in this process (fast, patchable) and returns (exit code, stderr)."""
    return _run_vlfit
