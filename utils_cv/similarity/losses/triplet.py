"""Triplet loss with batch-all, semi-hard and batch-hard mining (FaceNet; Hermans et al.).

Copy this file alone into another project: it imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TripletLoss(nn.Module):
    """Triplet loss on the triplets of a batch, with three ways to pick them.

    A triplet (a, p, n) is an anchor, a positive of the same class (p != a) and a negative
    of another class. Its loss is ``relu(d(a, p) - d(a, n) + margin)``: the negative must be
    at least ``margin`` farther from the anchor than the positive.

    Distances are Euclidean between the embeddings *as given* (``squared=True``: squared
    Euclidean). The loss does not normalize them: for FaceNet's setting (unit vectors,
    margin 0.2) build the model with ``normalize=True``; Hermans et al. use unnormalized
    embeddings with the soft margin. The square root is clamped away from zero (distances
    below 1e-6 read as 1e-6), so the gradients stay finite when embeddings coincide (the
    collapse of batch-hard training). Distances are computed in float32 even under mixed
    precision, the same to the last bit in any batch order. A NaN or infinite embedding gives
    a NaN loss; distances too large for float32 (beyond 2.7e36 squared, about embeddings of
    norm 1e18; 1.3e30 unsquared) are a ValueError. No Python loops: batch_all and semi_hard
    hold one (pairs, N) matrix, about N * K * N numbers for a P x K batch; batch_hard only the
    (N, N) distances.

    Args:
        margin: the hinge margin (ignored with ``soft_margin``).
        mining: which triplets make the loss:

            - "batch_all": every valid triplet; the loss is the mean over the triplets with
              a non-zero loss (pytorch-metric-learning's ``AvgNonZeroReducer``), and exactly
              0 (still a tensor with gradients) when none is left late in training. With
              ``soft_margin`` no loss is zero, so it is the mean over all triplets.
            - "semi_hard" (FaceNet, TensorFlow's ``triplet_semihard_loss``): for each
              anchor-positive pair, the closest negative farther from the anchor than the
              positive; where there is none, the farthest negative (TensorFlow's fallback).
              The loss is the mean over *all* anchor-positive pairs, zeros included.
            - "batch_hard" (Hermans et al.): for each anchor, the farthest positive and the
              closest negative; the mean over all anchors that have a positive, zeros included.

        soft_margin: ``softplus(d(a, p) - d(a, n))`` instead of the hinge (Hermans et al.);
            it never reaches zero, so easy triplets keep pulling a little.
        squared: use squared Euclidean distances (and the margin is then in squared units).

    Shapes: embeddings (N, D) float, labels (N,) int -> scalar. A batch needs at least one
    positive pair and two classes: sample P classes x K images per batch with K >= 2.

    After each call, ``stats`` holds floats about that batch:
        "num_triplets": the triplets the loss considered (batch_all: all valid triplets;
            semi_hard: anchor-positive pairs; batch_hard: anchors with a positive).
        "active_fraction": the share of them with a non-zero loss; with ``soft_margin``,
            whose loss is never zero, the share that violates the order (d(a, p) > d(a, n));
            for semi_hard these are only the pairs that fell back to the farthest negative.
            Near 0 late in training; stuck at 1 with a loss stuck at the margin means collapse.
        "mean_pos_distance", "mean_neg_distance": mean distance over all same-class pairs
            (i != j) and all different-class pairs of the batch (squared if ``squared``).
    """

    MININGS = ("batch_all", "semi_hard", "batch_hard")

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "batch_hard",
        soft_margin: bool = False,
        squared: bool = False,
    ):
        super().__init__()
        if mining not in self.MININGS:
            raise ValueError(f"mining={mining!r} is unknown; use one of {self.MININGS}")
        if margin < 0:
            raise ValueError(f"margin={margin} must be >= 0")
        self.margin = margin
        self.mining = mining
        self.soft_margin = soft_margin
        self.squared = squared
        self.stats: dict[str, float] = {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2 or labels.shape != (len(embeddings),):
            raise ValueError(
                f"embeddings {tuple(embeddings.shape)} and labels {tuple(labels.shape)} must "
                "be (N, D) and (N,)"
            )
        labels = labels.to(embeddings.device)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        return self.from_distances(self.distances(embeddings), same & ~eye, ~same)

    def from_distances(
        self, dist: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor
    ) -> torch.Tensor:
        """The loss from a distance matrix: row i is anchor i, the columns are candidates.

        ``forward`` calls it with the (N, N) distances of the batch, ``pos_mask`` = same
        label and not the anchor itself, ``neg_mask`` = another label. A module that adds
        points (Embedding Expansion adds synthetic ones as extra columns) passes an (N, M)
        matrix with its own masks; nothing here assumes the matrix is square.
        """
        num_pos, num_neg = torch.stack([pos_mask.sum(), neg_mask.sum()]).tolist()
        if num_pos == 0:
            raise ValueError(
                f"no two of the {len(pos_mask)} embeddings share a label, so the batch has no "
                "positive pair; sample each batch as P classes x K images with K >= 2 "
                "(here: ClassBalancedBatchSampler with samples_per_class >= 2)"
            )
        if num_neg == 0:
            raise ValueError(
                f"all {len(pos_mask)} embeddings have the same label, so the batch has no "
                "negative; sample each batch as P classes x K images with P >= 2 "
                "(here: ClassBalancedBatchSampler with classes_per_batch >= 2)"
            )

        big = torch.finfo(dist.dtype).max
        if self.mining in ("batch_all", "semi_hard"):
            # One row per anchor-positive pair against all M candidates for the negative:
            # (pairs, M) instead of an (N, N, M) cube, much smaller when K << N.
            anchor, positive = pos_mask.nonzero(as_tuple=True)
            ap = dist[anchor, positive][:, None]
            an, is_neg = dist[anchor], neg_mask[anchor]
        if self.mining == "batch_all":
            diff = (ap - an)[is_neg]
            losses = self._hinge(diff)
            # Sum over the non-zero losses (the others add 0) divided by their count, at
            # least 1: a true zero with a gradient graph when all triplets are satisfied.
            # softplus is never zero, only rounds to it far from the margin: count them all.
            nonzero = len(losses) if self.soft_margin else (losses > 0).sum().clamp(min=1)
            loss = losses.sum() / nonzero
        elif self.mining == "semi_hard":
            farther = is_neg & (an > ap)
            semi_hard = torch.where(farther, an, big).min(dim=1, keepdim=True).values
            farthest = torch.where(is_neg, an, -big).max(dim=1, keepdim=True).values
            diff = (ap - torch.where(farther.any(dim=1, keepdim=True), semi_hard, farthest))[:, 0]
            losses = self._hinge(diff)
            loss = losses.mean()
        else:
            hardest_pos = torch.where(pos_mask, dist, -1.0).max(dim=1).values
            hardest_neg = torch.where(neg_mask, dist, big)
            has_pos = pos_mask.any(dim=1)
            diff = (hardest_pos - hardest_neg.min(dim=1).values)[has_pos]
            losses = self._hinge(diff)
            loss = losses.mean()

        limit = torch.finfo(dist.dtype).max * (2.0**-7 if self.squared else 2.0**-28)
        with torch.no_grad():
            active = diff > 0 if self.soft_margin else losses > 0
            values = torch.stack(
                [
                    active.float().mean(),
                    dist[pos_mask].mean().float(),
                    dist[neg_mask].mean().float(),
                    # Non-finite embeddings make NaN distances and a NaN loss, which stops a
                    # training run. Without a NaN, a loss that is not finite overflowed, and
                    # so would the gradient past `limit`: it passes through the scale in
                    # `distances`, at most about the largest distance (its root if squared).
                    (~dist.isnan().any() & (~torch.isfinite(loss) | (dist.amax() > limit))).float(),
                ]
            ).tolist()
        if values[3]:
            dtype = str(dist.dtype).removeprefix("torch.")
            raise ValueError(
                f"TripletLoss overflows {dtype}: {'squared ' if self.squared else ''}distances "
                f"reach {dist.detach().amax().item():.3g}, past {limit:.3g}, where the loss or its "
                "gradient no longer fits. L2-normalize the embeddings (as FaceNet), use "
                "squared=False, or compute the loss in float64; a model whose embeddings grew "
                "this large has diverged (lower the learning rate)"
            )
        self.stats = {
            "active_fraction": values[0],
            "mean_pos_distance": values[1],
            "mean_neg_distance": values[2],
            "num_triplets": float(len(diff)),
        }
        return loss

    def distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, N) Euclidean (or squared, with ``squared``) distances, in float32 at least."""
        # Mixed precision would compute the distances in 16 bits: use float32 or better.
        with torch.autocast(embeddings.device.type, enabled=False):
            x = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
            # Distances do not change under a shift; centring shrinks the norms and with them
            # the rounding of the gradient, which flows through |x|^2 + |y|^2 - 2 x.y (below)
            # and matters most when embeddings crowd together (collapse). The mean of the
            # sorted columns is the same to the last bit in any batch order.
            x = x - x.detach().sort(dim=0).values.mean(dim=0, keepdim=True)
            # Scaled by the power of two at or below the largest coordinate, which is exact: the
            # squares of embeddings as large as 1e20 would overflow float32 (inf - inf = NaN).
            # Rounding down keeps the scale finite up to float32's largest number. Scaled back
            # by `scale` twice, not by scale**2, which can overflow where the distance does
            # not: 0 * inf would be NaN, the mark of non-finite embeddings.
            peak = x.detach().abs().max()
            scale = torch.where(peak > 0, torch.exp2(torch.log2(peak).floor()), 1.0)
            x = x / scale
            # The values from the difference of each pair of embeddings, not from |x|^2 +
            # |y|^2 - 2 x.y: the rounding of a matrix product depends on where a pair sits in
            # it (on some BLAS builds), and its cancellation left coinciding points about 1e-4
            # apart. So equal points are exactly 0 apart, and every distance is the same to
            # the last bit in any batch order: semi-hard and batch-all mining break exact ties
            # (d_an = d_ap) the same way whatever the order. The gradient, 2 (x_i - x_j) for
            # a squared distance, flows through the product form (same value, plus exactly
            # 0): cdist's own backward would hold N x N x D numbers on a GPU.
            with torch.no_grad():
                exact = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
            norms = (x * x).sum(dim=1)
            product = norms[:, None] + norms[None, :] - 2 * x @ x.T
            squared = exact + (product - product.detach())
        if self.squared:
            return squared * scale * scale
        # sqrt has an infinite slope at 0; clamping keeps gradients finite where points meet.
        return squared.clamp(min=1e-12).sqrt() * scale

    def _hinge(self, diff: torch.Tensor) -> torch.Tensor:
        """Loss per triplet from d(a, p) - d(a, n)."""
        if self.soft_margin:
            return F.softplus(diff)
        return F.relu(diff + self.margin)
