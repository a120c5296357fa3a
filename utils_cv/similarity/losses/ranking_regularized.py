"""Softmax cross-entropy regularized by a triplet loss on a second head (Taha et al., 2020).

Copy this file alone into another project: it imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RankingRegularizedLoss(nn.Module):
    """Cross-entropy on class logits plus ``weight`` times a triplet loss on embeddings.

    "Boosting Standard Classification Architectures Through a Ranking Regularizer" (Taha
    et al., WACV 2020): a classifier gets a second head whose embeddings a triplet loss
    ranks, and the sum trains the shared backbone:

        loss = mean cross-entropy(logits, labels) + weight * triplet(embeddings, labels)

    The paper uses weight (its lambda) = 1 and a triplet loss with margin 0.2 on squared
    distances, semi-hard or batch-hard (``TripletLoss(0.2, mining="batch_hard",
    squared=True)`` in this package), on batches of P classes x K images.

    With ``weight=0`` the loss *is* ``F.cross_entropy(logits, labels)``: the triplet is not
    computed at all, so the softmax baseline trains on any batches, shuffled ones included.

    Args:
        num_classes: C, the width of the logits; labels must lie in 0..C-1.
        triplet: the ranking loss, a module called as ``triplet(embeddings, labels)``; its
            ``stats`` dict, when it has one, is copied into this loss's ``stats``.
        weight: lambda, the weight of the triplet term; >= 0 and finite.

    Call: ``loss(outputs, labels)`` with ``outputs = {"logits": (N, C) float,
    "embeddings": (N, D) float}`` (a two-head model's ``training_outputs``) and
    ``labels: (N,) int`` -> scalar.

    After each call, ``stats`` holds floats about that batch: "cross_entropy",
    "accuracy" (top-1 of the logits), and unless ``weight=0``: "triplet" (the triplet
    term before weighting) and the triplet's own statistics under their own names
    ("active_fraction", ...), so tools that read a triplet loss's statistics read them here.
    """

    def __init__(self, num_classes: int, triplet: nn.Module, weight: float = 1.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be at least 1")
        if not 0 <= weight < float("inf"):  # NaN fails too
            raise ValueError(f"weight={weight} must be a finite number >= 0 (1 in the paper)")
        if not callable(triplet):
            raise TypeError(f"triplet must be a loss module, got {type(triplet).__name__}")
        self.num_classes = num_classes
        self.triplet = triplet
        self.weight = weight
        self.stats: dict[str, float] = {}

    def forward(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, dict) or not {"logits", "embeddings"} <= set(outputs):
            got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
            raise ValueError(
                f"the loss takes a dict with 'logits' and 'embeddings', got {got}; give it the "
                "outputs of a model with a classification head and an embedding head"
            )
        logits, embeddings = outputs["logits"], outputs["embeddings"]
        n = len(labels)
        if n == 0 or labels.ndim != 1 or logits.shape != (n, self.num_classes):
            raise ValueError(
                f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be "
                f"(N, {self.num_classes}) and (N,) with N > 0; create the loss with num_classes "
                "equal to the classifier's number of outputs"
            )
        if embeddings.shape[:1] != (n,) or embeddings.ndim != 2:
            raise ValueError(
                f"embeddings {tuple(embeddings.shape)} must be (N, D) with N={n}, one row per "
                "label, from the same batch as the logits"
            )
        labels = labels.to(logits.device)
        low, high = torch.stack([labels.min(), labels.max()]).tolist()
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"labels range from {low} to {high} but num_classes={self.num_classes}; "
                "relabel the classes to 0..C-1 or create the loss with their number"
            )
        cross_entropy = F.cross_entropy(logits, labels)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        if self.weight == 0:
            # Exactly the softmax baseline: no triplet in the graph, and no P x K batch needed.
            self.stats = dict(
                zip(("cross_entropy", "accuracy"), _floats(cross_entropy, accuracy), strict=True)
            )
            return cross_entropy
        triplet = self.triplet(embeddings, labels)
        values = _floats(cross_entropy, accuracy, triplet)
        self.stats = {
            **getattr(self.triplet, "stats", {}),
            **dict(zip(("cross_entropy", "accuracy", "triplet"), values, strict=True)),
        }
        return cross_entropy + self.weight * triplet


def _floats(*scalars: torch.Tensor) -> list[float]:
    """Scalars as Python floats, copied off the device in one step."""
    return torch.stack([s.detach().float() for s in scalars]).tolist()
