"""A backbone plus a linear head: the model every run trains."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlfit.models.backbones import Backbone, Preprocess, backbone_from_config


class ImageClassifier(nn.Module):
    """pixels (B, 3, H, W) -> logits (B, num_classes)."""

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        # A small head init keeps the first steps from wrecking pretrained features with large gradients.
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(pixels)))

    def architecture(self) -> dict[str, Any]:
        """Everything needed to rebuild this model without the hub: see `classifier_from_architecture`."""
        return {
            "family": self.backbone.family,
            "backbone_config": self.backbone.hf_config.to_dict(),
            "attn_implementation": self.backbone.hf_config._attn_implementation,
            "preprocess": self.backbone.preprocess.to_dict(),
            "num_classes": self.head.out_features,
            "dropout": self.dropout.p,
        }


def classifier_from_architecture(arch: dict[str, Any]) -> ImageClassifier:
    """An ImageClassifier shaped by `ImageClassifier.architecture()`, weights freshly initialised."""
    backbone = backbone_from_config(
        arch["family"], arch["backbone_config"], arch.get("attn_implementation") or "sdpa",
        Preprocess.from_dict(arch["preprocess"]),
    )
    return ImageClassifier(backbone, arch["num_classes"], arch.get("dropout", 0.0))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
