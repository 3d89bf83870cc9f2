"""Losses: cross-entropy on the head, and the contrastive term between images and class prompts.

The contrastive term compares each image with the prompt embedding of every class (not with one
caption per image), so two images of the same class are never pushed apart as each other's
negatives, the trap of naive FLYP-style fine-tuning on class captions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_contrastive_loss(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                           logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Contrastive loss between L2-normalised image embeddings (B, E) and class embeddings (C, E).

    With `logit_bias` (SigLIP), the sigmoid form: every (image, class) pair is a binary decision,
    positive exactly when the image is of that class; summed over classes, averaged over images.
    Without it (CLIP), the softmax (InfoNCE) form, symmetric: image -> classes is cross-entropy over
    all classes; class -> images, for each class present, treats all its images as positives.
    `logit_scale` is the pretrained log inverse temperature.
    """
    logits = logit_scale.exp() * image_emb.float() @ class_emb.float().t()  # (B, C)
    if logit_bias is not None:
        targets = 2.0 * F.one_hot(labels, class_emb.shape[0]).float() - 1.0
        return -F.logsigmoid(targets * (logits + logit_bias)).sum() / image_emb.shape[0]
    image_to_class = F.cross_entropy(logits, labels)
    present = labels.unique()
    per_class = logits.t()[present]  # (P, B): each present class scored against every image
    positive = labels[None, :] == present[:, None]  # (P, B)
    log_all = torch.logsumexp(per_class, dim=1)
    log_pos = torch.logsumexp(per_class.masked_fill(~positive, float("-inf")), dim=1)
    class_to_image = (log_all - log_pos).mean()
    return (image_to_class + class_to_image) / 2
