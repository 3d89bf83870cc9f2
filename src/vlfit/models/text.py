"""The text tower of a CLIP/SigLIP model, used for class prompts: zero-shot heads and the contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlfit.errors import UserError, first_line

# Prompt templates in the style of CLIP's and WiSE-FT's zero-shot classifiers, worded for people doing things.
DEFAULT_TEMPLATES = (
    "a photo of a person {}.",
    "a photo of someone {}.",
    "a cropped photo of a person {}.",
    "a low resolution photo of a person {}.",
    "an image of people {}.",
)


def prompt_name(class_name: str) -> str:
    """'listening_to_music' -> 'listening to music'."""
    return class_name.replace("_", " ")


class TextTower(nn.Module):
    """Text encoder + projection + tokenizer, and the pretrained logit scale (and SigLIP's bias)."""

    def __init__(self, family: str, text_model: nn.Module, projection: nn.Module | None, tokenizer,
                 logit_scale: nn.Parameter, logit_bias: nn.Parameter | None):
        super().__init__()
        self.family = family
        self.text_model = text_model
        self.projection = projection if projection is not None else nn.Identity()
        self.tokenizer = tokenizer
        self.logit_scale = logit_scale  # log of the temperature's inverse, as pretrained
        self.logit_bias = logit_bias

    def forward(self, texts: list[str]) -> torch.Tensor:
        """(T,) strings -> (T, E) L2-normalised embeddings in the joint space."""
        # SigLIP was trained on prompts padded to a fixed length and pools the last position.
        padding = "max_length" if self.family == "siglip" else True
        max_length = self.text_model.config.max_position_embeddings
        batch = self.tokenizer(texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
        device = self.logit_scale.device
        out = self.text_model(input_ids=batch["input_ids"].to(device),
                              attention_mask=batch["attention_mask"].to(device) if self.family == "clip" else None)
        return F.normalize(self.projection(out.pooler_output), dim=-1)

    def class_embeddings(self, classes: list[str], templates: tuple[str, ...] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """(C, E): per class, the normalised mean of its normalised prompt embeddings (CLIP / WiSE-FT recipe)."""
        prompts = [t.format(prompt_name(c)) for c in classes for t in templates]
        emb = self(prompts).view(len(classes), len(templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)


# Libraries some tokenizers need beyond `tokenizers`, as transformers' messages name them, and the
# module each provides. SigLIP's SentencePiece tokenizer needs the first two (both come with vlfit).
_TOKENIZER_LIBRARIES = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf", "tiktoken": "tiktoken"}


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The checkpoint's own tokenizer, or a one-line UserError: naming the package to install when a
    library it needs is missing, or saying that the checkpoint has no usable tokenizer."""
    from transformers import AutoTokenizer

    # transformers reports a missing library as an ImportError or a ValueError (by version and class),
    # and a checkpoint without a vocabulary file as an OSError, a ValueError or (4.x) a TypeError.
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError, OSError, TypeError) as err:
        missing = _missing_library(err)
        if missing:
            raise UserError(f"model.backbone: the tokenizer of '{name}' needs the Python package '{missing}': "
                            f"pip install {missing}") from None
        raise UserError(f"model.backbone: '{name}' has no usable tokenizer for class prompts: "
                        f"{first_line(err)}") from None
    # transformers 5 builds a tokenizer of special tokens alone where the checkpoint has no tokenizer
    # files: every prompt would encode alike, so every class would get the same text embedding.
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise UserError(f"model.backbone: '{name}' has no tokenizer files (only special tokens): class prompts "
                        "need the checkpoint's tokenizer")
    return tokenizer


def _missing_library(err: Exception) -> str | None:
    """The package that `err` says is needed and that is indeed not importable, if any."""
    import importlib.util

    message = str(err).lower()
    for package, module in _TOKENIZER_LIBRARIES.items():
        if package not in message:
            continue
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing too, or the module is half there
            found = False
        if not found:
            return package
    return None


# The words the offline presets' tokenizer knows: class names and prompt templates.
_WORDS = """a an the of photo image cropped low resolution person someone people doing
calling clapping cycling dancing drinking eating fighting hugging laughing listening to music running sitting
sleeping texting using laptop phone hands bike cup food friends bed chair""".split()


def word_tokenizer():
    """A word-level tokenizer built in memory, for the offline presets (no vocabulary to download)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(_WORDS)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")
