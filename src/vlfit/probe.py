"""Linear probe: features of the frozen backbone computed once, then the head trains on them alone."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from vlfit.config import Config
from vlfit.data import ImageSet, Split, eval_transform
from vlfit.data.sources import TransformedImages
from vlfit.models import ImageClassifier


@torch.inference_mode()
def extract_features(classifier: ImageClassifier, images: ImageSet, accelerator: Accelerator,
                     batch_size: int, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features the head reads (N, D) on the CPU, labels (N,)), with the deterministic eval transform."""
    loader = DataLoader(TransformedImages(images, eval_transform(classifier.backbone.preprocess)),
                        batch_size=batch_size, num_workers=num_workers)
    classifier.eval().to(accelerator.device)
    feats = []
    with accelerator.autocast():
        for pixels, _ in loader:
            pooled = classifier.backbone(pixels.to(accelerator.device))
            feats.append(classifier.head_features(pooled).float().cpu())
    return torch.cat(feats), torch.as_tensor(images.labels, dtype=torch.long)


def feature_loaders(cfg: Config, classifier: ImageClassifier, images: ImageSet, split: Split,
                    accelerator: Accelerator) -> tuple[DataLoader, DataLoader]:
    """Loaders over cached features of the train and val split, batched like the image loaders."""
    sets = [TensorDataset(*extract_features(classifier, images.subset(idx), accelerator, cfg.train.eval_batch,
                                            cfg.data.num_workers)) for idx in (split.train, split.val)]
    train = DataLoader(sets[0], batch_size=cfg.train.micro_batch, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(cfg.train.seed))
    val = DataLoader(sets[1], batch_size=cfg.train.eval_batch)
    return train, val
