"""Softmax classification loss whose classifier lives in the loss, not the model.

Copy this file alone into another project: it imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxLoss(nn.Module):
    """A plain linear classifier on the embeddings, trained with cross-entropy.

    The classifier (weight and bias) belongs to the loss, not to the model: at test time
    the classes are new, so only the embeddings before it are used for retrieval.

    Args:
        embedding_size: D, the size of the embeddings.
        num_classes: C; labels must lie in 0..C-1.

    Shapes: embeddings (N, D) float, labels (N,) int -> scalar loss (mean over the batch).
    Embeddings of another float dtype than the classifier (bfloat16, float64) are computed in
    the wider of the two.
    """

    def __init__(self, embedding_size: int, num_classes: int):
        super().__init__()
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.classifier = nn.Linear(embedding_size, num_classes)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings have shape {tuple(embeddings.shape)} but the loss expects "
                f"(N, {self.embedding_size}); create it with the model's embedding_size"
            )
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"labels range from {low} to {high} but num_classes={self.num_classes}; "
                "relabel the classes to 0..C-1 (here: ImageData.relabel()) or create the "
                "loss with num_classes set to the number of classes"
            )
        # In the wider of the two dtypes: bfloat16 embeddings meet a float32 classifier.
        dtype = torch.promote_types(embeddings.dtype, self.classifier.weight.dtype)
        weight, bias = self.classifier.weight.to(dtype), self.classifier.bias.to(dtype)
        return F.cross_entropy(F.linear(embeddings.to(dtype), weight, bias), labels)
