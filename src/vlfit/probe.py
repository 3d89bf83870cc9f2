"""Linear probe: features of the frozen backbone computed once, then the head trains on them alone."""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from vlfit.config import Config
from vlfit.data import ImageSet, Split
from vlfit.data.gpu_transforms import on_device
from vlfit.data.loaders import make_loader
from vlfit.models import ImageClassifier


@torch.inference_mode()
def extract_features(cfg: Config, classifier: ImageClassifier, images: ImageSet, index: np.ndarray,
                     accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """(features the head reads (N, D) on the CPU, labels (N,)) of images[index], through the
    evaluation loader that validation uses, so a probe scores the same on features and on pixels."""
    loader = on_device(make_loader(cfg, images, index, classifier.backbone.preprocess, train=False),
                       accelerator.device)
    classifier.eval().to(accelerator.device)
    feats = []
    with accelerator.autocast():
        for pixels, _ in loader:
            feats.append(classifier.head_features(classifier.backbone(pixels.to(accelerator.device))).float().cpu())
    return torch.cat(feats), torch.as_tensor(images.labels[index], dtype=torch.long)


def feature_loaders(cfg: Config, classifier: ImageClassifier, images: ImageSet, split: Split,
                    accelerator: Accelerator) -> tuple[DataLoader, DataLoader]:
    """Loaders over cached features of the train and val split, batched like the image loaders."""
    sets = [TensorDataset(*extract_features(cfg, classifier, images, idx, accelerator))
            for idx in (split.train, split.val)]
    train = DataLoader(sets[0], batch_size=cfg.train.micro_batch, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(cfg.train.seed))
    val = DataLoader(sets[1], batch_size=cfg.train.eval_batch)
    return train, val
