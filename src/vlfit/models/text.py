"""The text tower of a CLIP/SigLIP model, used for class prompts: zero-shot heads and the contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlfit.errors import UserError

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


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model.backbone: '{name}' has no usable tokenizer for class prompts: {err}") from None


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
