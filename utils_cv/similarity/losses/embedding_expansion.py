"""Embedding Expansion (Ko & Gu, CVPR 2020): synthetic points and hard negative pair mining.

Copy this file alone into another project: it imports torch only, and wraps any base loss
that exposes its pair matrix (here ``TripletLoss`` and ``MultiSimilarityLoss``; see ``base_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingExpansion(nn.Module):
    """Wrap a pair-based loss: add synthetic points between same-class pairs, mine the
    hardest negative among original and synthetic points, then apply the base loss.

    1. **Pairs.** The images of each class are paired in the order they appear in the
       batch: (1st, 2nd), (3rd, 4th), ... A class with K images gives K / 2 pairs, not every
       same-class pair: this is the released code's pairing of neighbouring batch slots
       (2k, 2k + 1) when batches are laid out class by class, as ``ClassBalancedBatchSampler``
       does. Every class needs an even number of images in the batch.
    2. **Synthetic points.** For a pair (x_i, x_j), ``n_points`` points at equal divisions of
       the segment, ``(k x_j + (n + 1 - k) x_i) / (n + 1)`` for k = 1..n, each L2-normalized
       back onto the unit sphere when ``normalize`` (the paper's "L2 projection"), labelled
       with the pair's class. They are not detached: the loss's gradient flows through them
       to both endpoints.
    3. **Hard negative pair mining.** Only original points are anchors, and only original
       points are positives (synthetic points never anchor a term of their own and are never
       positives). For anchor i, the distance to a candidate negative m (any point of another
       class, original or synthetic) is the smallest distance between m and any point of
       i's *group*: x_i itself and the synthetic points of i's pair. (For a similarity, the
       largest.) A negative pair is thus "hard" if any point of the anchor's segment comes
       close to it; with batch-hard mining the hardest negative is the closest such point.
    4. **Base loss** on that matrix: each anchor's positives as in the batch (distances from
       x_i itself), its negatives through the group.

    How the synthetic points enter each base loss, and why:

    - ``TripletLoss`` (any mining; the released code has batch-hard, the paper's "HPHN"
      triplet): as negatives only. Its positives are the original same-class points, its
      negatives every other-class point, original or synthetic, at the group distance.
      As positives the synthetic points would add nothing hard: they lie on the segment
      between the anchor and its partner, so no farther than the partner. As negatives
      they are new, harder negatives than the batch holds, which is the method's point.
    - ``MultiSimilarityLoss``: the same, with similarities (the largest over the group). Its
      pair mining (keep negatives more similar than the least similar positive, minus
      epsilon) then runs on these group similarities, so synthetic negatives are kept or
      dropped exactly like original ones.

    With ``n_points=0`` the group is the anchor alone, no point is added and the result is
    exactly the base loss (an odd number of images per class is then fine too).

    The reduction is the base loss's: ``TripletLoss`` averages over anchors (the released
    code sums them; a sum is the mean times the number of anchors, i.e. a larger learning
    rate). The released code's margin default is tiny (1e-5): set the base loss's margin.

    Args:
        base_loss: a loss with ``distances(embeddings) -> (M, M)`` and ``from_distances(dist,
            pos_mask, neg_mask)`` (``TripletLoss``), or ``similarities`` and
            ``from_similarities`` (``MultiSimilarityLoss``). Row i of the matrix it receives
            is anchor i; the columns are the N originals, then the synthetic points.
        n_points: synthetic points per pair (the paper: 2 by default, 2 to 8 work).
        normalize: L2-normalize the synthetic points (the paper's L2 projection). Keep it
            on for a model that outputs unit vectors: between two unit vectors the segment
            runs inside the sphere, closer to everything than the sphere's points.

    Shapes: embeddings (N, D) float, labels (N,) int -> scalar. Batches of P classes x K
    images with K even.

    After each call, ``stats`` holds the base loss's own stats, computed on the expanded
    matrix (so its negative-pair means, e.g. "mean_neg_distance", include the synthetic
    points through the group and do not compare with a run of the base loss alone), and:

    - "selection_ratio": the share of anchors whose hardest negative (the one the base
      loss treats as hardest: smallest group distance, or largest group similarity) is a
      synthetic point; the paper shows it falling as training goes on.
    - "hardest_negative_distance": mean over anchors of the Euclidean distance between the
      anchor's group and its closest negative, original or synthetic.
    - "hardest_original_negative_distance": the same, anchor to original negatives only
      (what the base loss alone would see); equal to the above when n_points = 0.
    - "num_synthetic": synthetic points in the batch.
    """

    def __init__(self, base_loss: nn.Module, n_points: int = 2, normalize: bool = True):
        super().__init__()
        if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 0:
            raise ValueError(f"n_points={n_points!r} must be an integer >= 0 (the paper: 2 to 8)")
        if hasattr(base_loss, "from_distances") and hasattr(base_loss, "distances"):
            self.relation = "distance"
        elif hasattr(base_loss, "from_similarities") and hasattr(base_loss, "similarities"):
            self.relation = "similarity"
        else:
            raise TypeError(
                f"{type(base_loss).__name__} cannot be expanded: the base loss needs methods "
                "distances() and from_distances() (like TripletLoss) or similarities() and "
                "from_similarities() (like MultiSimilarityLoss)"
            )
        self.base_loss = base_loss
        self.n_points = n_points
        self.normalize = normalize
        self.stats: dict[str, float] = {}

    @staticmethod
    def pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (first, second) of the pairs: each class's images by order of appearance,
        (1st, 2nd), (3rd, 4th), ...; pairs come class by class, in increasing label order."""
        order = torch.sort(labels, stable=True).indices  # classes contiguous, batch order kept
        classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
        odd = (counts % 2 == 1).nonzero().flatten()
        if len(odd):
            c = int(odd[0])
            raise ValueError(
                f"class {classes[c].item()} has {counts[c].item()} images in this batch (and "
                f"{len(odd)} class(es) in all have an odd count); Embedding Expansion pairs "
                "the images of each class, so each class needs an even number: sample P "
                "classes x K images with K even (ClassBalancedBatchSampler with "
                "samples_per_class = 2, 4, ...), or use n_points=0"
            )
        # Each class's block has an even length and starts at an even offset, so the even
        # and odd slots of the sorted order pair (1st, 2nd), (3rd, 4th) within every class.
        return order[0::2], order[1::2]

    def synthetic_points(
        self, embeddings: torch.Tensor, first: torch.Tensor, second: torch.Tensor
    ) -> torch.Tensor:
        """(P, n, D): n points on each pair's segment, k = 1..n from x_first towards x_second."""
        n = self.n_points
        k = torch.arange(1, n + 1, device=embeddings.device, dtype=embeddings.dtype)
        x_i, x_j = embeddings[first][:, None, :], embeddings[second][:, None, :]
        points = (k[:, None] * x_j + (n + 1 - k)[:, None] * x_i) / (n + 1)
        return F.normalize(points, dim=-1) if self.normalize else points

    def mine(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the loss uses, for inspection (the notebook draws it).

        Returns a dict: "points" (M, D): the N originals then the synthetic points, pair by
        pair; "labels" (M,); "group" (N, 1 + n): indices into points of each anchor's group;
        "matrix" (N, M): the base loss's input (distances or similarities; negatives through
        the group); "pos_mask", "neg_mask" (N, M); "hardest_negative" (N,): index into points
        of each anchor's hardest negative (-1 where it has none).
        """
        if embeddings.ndim != 2 or labels.shape != (len(embeddings),):
            raise ValueError(
                f"embeddings {tuple(embeddings.shape)} and labels {tuple(labels.shape)} must "
                "be (N, D) and (N,)"
            )
        labels = labels.to(embeddings.device)
        num, n = len(labels), self.n_points
        classes, counts = torch.unique(labels, return_counts=True)
        if len(classes) < 2 or counts.max() < 2:
            raise ValueError(
                f"a batch of {num} embeddings in {len(classes)} class(es) has no "
                f"{'negative' if len(classes) < 2 else 'positive pair'}; sample each batch as "
                "P classes x K images with P >= 2 and K >= 2 (ClassBalancedBatchSampler)"
            )
        index = torch.arange(num, device=labels.device)
        points, point_labels, group = embeddings, labels, index[:, None]
        if n > 0:
            first, second = self.pairs(labels)
            synthetic = self.synthetic_points(embeddings, first, second)  # (P, n, D)
            points = torch.cat([embeddings, synthetic.flatten(0, 1)])
            point_labels = torch.cat([labels, labels[first].repeat_interleave(n)])
            pair_of = torch.empty_like(index)
            pair_of[first] = pair_of[second] = torch.arange(len(first), device=labels.device)
            own = num + pair_of[:, None] * n + torch.arange(n, device=labels.device)
            group = torch.cat([index[:, None], own], dim=1)

        same = labels[:, None] == point_labels[None, :]  # (N, M)
        column = torch.arange(len(points), device=labels.device)[None, :]
        pos_mask = same & (column < num) & (column != index[:, None])  # originals, not itself
        neg_mask = ~same
        if self.relation == "distance":
            full = self.base_loss.distances(points)
            grouped = full[group].min(dim=1).values  # (N, 1 + n, M) -> (N, M)
        else:
            full = self.base_loss.similarities(points)
            grouped = full[group].max(dim=1).values
        matrix = torch.where(neg_mask, grouped, full[:num])
        with torch.no_grad():
            sign = 1.0 if self.relation == "distance" else -1.0
            hardness = torch.where(neg_mask, sign * matrix, torch.inf)
            hardest = hardness.argmin(dim=1)
            hardest = torch.where(neg_mask.any(dim=1), hardest, -1)
        return {
            "points": points,
            "labels": point_labels,
            "group": group,
            "matrix": matrix,
            "pos_mask": pos_mask,
            "neg_mask": neg_mask,
            "hardest_negative": hardest,
        }

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mined = self.mine(embeddings, labels)
        matrix, pos_mask, neg_mask = mined["matrix"], mined["pos_mask"], mined["neg_mask"]
        if self.relation == "distance":
            loss = self.base_loss.from_distances(matrix, pos_mask, neg_mask)
        else:
            loss = self.base_loss.from_similarities(matrix, pos_mask, neg_mask)
        self.stats = dict(self.base_loss.stats) | self._mining_stats(mined)
        return loss

    def _mining_stats(self, mined: dict[str, torch.Tensor]) -> dict[str, float]:
        num = len(mined["group"])
        with torch.no_grad():
            points = mined["points"].detach().float()
            euclidean = torch.cdist(points, points)
            neg_mask = mined["neg_mask"]
            scored = neg_mask.any(dim=1) & mined["pos_mask"].any(dim=1)
            grouped = euclidean[mined["group"]].min(dim=1).values
            closest = torch.where(neg_mask, grouped, torch.inf).min(dim=1).values
            original = torch.where(neg_mask[:, :num], euclidean[:num, :num], torch.inf)
            synthetic = mined["hardest_negative"] >= num
            values = torch.stack(
                [
                    synthetic[scored].float().mean(),
                    closest[scored].mean(),
                    original.min(dim=1).values[scored].mean(),
                ]
            ).tolist()
        return {
            "selection_ratio": values[0],
            "hardest_negative_distance": values[1],
            "hardest_original_negative_distance": values[2],
            "num_synthetic": float(len(points) - num),
        }
