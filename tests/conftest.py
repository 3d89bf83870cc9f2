"""Shared fixtures: tiny real models saved the way the hub stores them, so `from_pretrained` runs offline."""

from __future__ import annotations

import atexit
import contextlib
import io
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


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A full CLIPModel (vision + text towers) with a processor config, as in openai/clip-vit-* repos."""
    path = tmp_path_factory.mktemp("tiny-clip-hub")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16)).save_pretrained(path)
    # Non-default constants, so a test can tell that they were read from this file.
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory) -> Path:
    """A full SiglipModel with its processor config, as in google/siglip-* repos."""
    path = tmp_path_factory.mktemp("tiny-siglip-hub")
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(text_config=TINY_TEXT, vision_config=TINY_VISION)).save_pretrained(path)
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
