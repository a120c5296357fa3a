"""Multi-Similarity loss with its pair mining (Wang et al., CVPR 2019).

Copy this file alone into another project: it imports torch only.
"""

from __future__ import annotations

import torch
from torch import nn


class MultiSimilarityLoss(nn.Module):
    """Multi-Similarity loss: soft-weighted positive and negative pairs after pair mining.

    "Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning" (Wang et
    al., CVPR 2019). The similarity of two points is the **dot product of the embeddings as
    given**: S_ij = x_i . x_j. The loss does not normalize; for the paper's cosine
    similarity build the model with ``normalize=True`` (the models here output unit
    vectors, where the two coincide). Similarities are computed in float32 at least, with
    mixed precision turned off (exp(beta * S) overflows in 16 bits). A NaN or infinite
    embedding gives a NaN loss; similarities too large for float32 (beyond 2.7e36, about
    embeddings of norm 1.6e18) are a ValueError.

    For each anchor i, with P_i its positives (same label, not i) and N_i its negatives:

    1. **Mining** (skipped with ``epsilon=None``): keep a negative n if
       ``S_in + epsilon > min_{p in P_i} S_ip`` (it is at least nearly as similar as the
       least similar positive) and a positive p if ``S_ip - epsilon < max_{n in N_i} S_in``.
       Both inequalities are strict (ties are dropped); an anchor without positives keeps
       no negative and one without negatives keeps no positive. This is
       pytorch-metric-learning's ``MultiSimilarityMiner(epsilon)``.
    2. **Loss** over the kept pairs,
       ``(1/alpha) log(1 + sum_p exp(-alpha (S_ip - base)))
       + (1/beta) log(1 + sum_n exp(beta (S_in - base)))``,
       computed as a log-sum-exp with an extra zero term, so it is stable for any S. An
       anchor with nothing kept contributes exactly 0.
    3. **Reduction:** the mean over *all* anchors, zeros included, as
       pytorch-metric-learning's ``MultiSimilarityLoss`` with its default ``MeanReducer``.

    Args:
        alpha: > 0, the scale of the positive term (2 in the paper).
        beta: > 0, the scale of the negative term (50 in the paper).
        base: the similarity (lambda in the paper) that positives should exceed and
            negatives stay below (0.5 in the paper).
        epsilon: >= 0, the mining margin (0.1 in the paper); None keeps every pair.

    Shapes: embeddings (N, D) float, labels (N,) int -> scalar. A batch needs at least one
    positive pair and two classes: sample P classes x K images per batch with K >= 2.

    ``forward`` is ``from_similarities(similarities(embeddings), pos_mask, neg_mask)``, the
    same loss on a given (N, M) similarity matrix, public for callers that build their own
    candidates (Embedding Expansion adds synthetic points as extra columns).

    Differences from pytorch-metric-learning: a batch with no positive pair or no negative
    is an error here (PML returns 0). PML also returns 0 when mining keeps at most one
    positive and at most one negative pair in the whole batch; here those pairs still count.

    After each call, ``stats`` holds floats about that batch:
        "positive_kept", "negative_kept": the share of positive / negative pairs that
            survive mining (1 with ``epsilon=None``; 0 where there are no such pairs).
        "mean_pos_similarity", "mean_neg_similarity": the mean similarity over all positive
            / negative pairs, mined or not (0 where there are none).
        "active_fraction": the share of anchors whose loss is non-zero (in floating point:
            a pair far on the right side of ``base`` can round its term to 0).
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float | None = 0.1,
    ):
        super().__init__()
        if not alpha > 0:  # NaN fails too
            raise ValueError(f"alpha={alpha} must be > 0 (2 in the paper)")
        if not beta > 0:
            raise ValueError(f"beta={beta} must be > 0 (50 in the paper)")
        if epsilon is not None and not epsilon >= 0:
            raise ValueError(
                f"epsilon={epsilon} must be >= 0 (0.1 in the paper), or None for no mining"
            )
        self.alpha = alpha
        self.beta = beta
        self.base = base
        self.epsilon = epsilon
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
        pos_mask, neg_mask = same & ~eye, ~same
        num_pos, num_neg = torch.stack([pos_mask.sum(), neg_mask.sum()]).tolist()
        if num_pos == 0:
            raise ValueError(
                f"no two of the {len(labels)} embeddings share a label, so the batch has no "
                "positive pair; sample each batch as P classes x K images with K >= 2 "
                "(here: ClassBalancedBatchSampler with samples_per_class >= 2)"
            )
        if num_neg == 0:
            raise ValueError(
                f"all {len(labels)} embeddings have the same label, so the batch has no "
                "negative; sample each batch as P classes x K images with P >= 2 "
                "(here: ClassBalancedBatchSampler with classes_per_batch >= 2)"
            )
        return self.from_similarities(self.similarities(embeddings), pos_mask, neg_mask)

    def similarities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, N) dot products of the embeddings as given, in float32 at least."""
        # Mixed precision would round them to 16 bits, which exp(beta * S) magnifies.
        with torch.autocast(embeddings.device.type, enabled=False):
            x = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
            # At the power-of-two scale at or below the largest coordinate, which is exact:
            # products of coordinates of 1e20 overflow float32, and inf - inf is NaN, the mark
            # of non-finite embeddings. Scaled back by `scale` twice, so that a product too
            # large is +-inf and an exact 0 stays 0 (scale**2 itself can be inf).
            peak = x.detach().abs().max()
            scale = torch.where(peak > 0, torch.exp2(torch.log2(peak).floor()), 1.0)
            x = x / scale
            return x @ x.T * scale * scale

    def from_similarities(
        self, similarities: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor
    ) -> torch.Tensor:
        """The loss from an (N, M) similarity matrix: row i is anchor i, columns candidates.

        Mining, loss and reduction are those of the class docstring, with P_i and N_i the
        columns where ``pos_mask[i]`` and ``neg_mask[i]`` are True. M may differ from N and
        nothing is assumed about a diagonal: leave an anchor's own column out of both masks.
        The result is the mean over the N rows; rows with no kept pair add 0.

        Args:
            similarities: (N, M) float; computed in float32 at least.
            pos_mask: (N, M) bool, the anchor-positive pairs.
            neg_mask: (N, M) bool, the anchor-negative pairs; disjoint from ``pos_mask``.

        Returns a scalar and refreshes ``stats``.
        """
        if (
            similarities.ndim != 2
            or len(similarities) == 0
            or pos_mask.shape != similarities.shape
            or neg_mask.shape != similarities.shape
        ):
            raise ValueError(
                f"similarities {tuple(similarities.shape)}, pos_mask {tuple(pos_mask.shape)} "
                f"and neg_mask {tuple(neg_mask.shape)} must all be the same (N, M) with N >= 1"
            )
        if pos_mask.dtype != torch.bool or neg_mask.dtype != torch.bool:
            raise ValueError(
                f"pos_mask ({pos_mask.dtype}) and neg_mask ({neg_mask.dtype}) must be "
                "torch.bool; convert them with .bool()"
            )
        pos_mask = pos_mask.to(similarities.device)
        neg_mask = neg_mask.to(similarities.device)
        if (pos_mask & neg_mask).any():
            raise ValueError("pos_mask and neg_mask overlap; a pair is either positive or negative")

        with torch.autocast(similarities.device.type, enabled=False):
            s = similarities.to(torch.promote_types(similarities.dtype, torch.float32))
            with torch.no_grad():
                if self.epsilon is None:
                    keep_pos, keep_neg = pos_mask, neg_mask
                else:
                    # The least similar positive and the most similar negative per anchor.
                    hardest_pos = torch.where(pos_mask, s, torch.inf).amin(1, keepdim=True)
                    hardest_neg = torch.where(neg_mask, s, -torch.inf).amax(1, keepdim=True)
                    # "Not dropped" rather than "kept", so that a NaN similarity is kept: a
                    # comparison with NaN is False, and dropping those pairs would give a
                    # finite loss while the gradients (through the matrix product) are NaN.
                    keep_pos = pos_mask & ~(s - self.epsilon >= hardest_neg)
                    keep_neg = neg_mask & ~(s + self.epsilon <= hardest_pos)
            # log(1 + sum exp(z)) over the kept pairs: -inf elsewhere, plus a zero column.
            zero = s.new_zeros(len(s), 1)
            pos_z = torch.where(keep_pos, -self.alpha * (s - self.base), -torch.inf)
            neg_z = torch.where(keep_neg, self.beta * (s - self.base), -torch.inf)
            pos_loss = torch.logsumexp(torch.cat([pos_z, zero], dim=1), dim=1) / self.alpha
            neg_loss = torch.logsumexp(torch.cat([neg_z, zero], dim=1), dim=1) / self.beta
            losses = pos_loss + neg_loss
            loss = losses.mean()
            limit = torch.finfo(s.dtype).max * 2.0**-7

            with torch.no_grad():
                kept_pos, num_pos, kept_neg, num_neg, active, overflow = torch.stack(
                    [
                        keep_pos.sum(),
                        pos_mask.sum(),
                        keep_neg.sum(),
                        neg_mask.sum(),
                        (losses > 0).sum(),
                        # Non-finite embeddings make NaN similarities and a NaN loss, which
                        # stops a training run. Without a NaN, a loss that is not finite
                        # overflowed, and so would the gradient past `limit`: it passes through
                        # the square of the scale in `similarities`, at most twice max |x|^2.
                        (
                            ~s.isnan().any() & (~torch.isfinite(loss) | (s.abs().amax() > limit))
                        ).long(),
                    ]
                ).tolist()
                sum_pos, sum_neg = torch.stack([s[pos_mask].sum(), s[neg_mask].sum()]).tolist()
        if overflow:
            dtype = str(s.dtype).removeprefix("torch.")
            raise ValueError(
                f"MultiSimilarityLoss overflows {dtype}: similarities (|x|^2 of an embedding with "
                f"itself included) reach {s.detach().abs().amax().item():.3g}, past {limit:.3g}, "
                f"where the loss (exp(beta * similarity), beta={self.beta}) or its gradient no "
                "longer fits. L2-normalize the embeddings (the paper's cosine similarity) or "
                "compute the loss in float64; a model whose embeddings grew this large has "
                "diverged (lower the learning rate)"
            )
        self.stats = {
            "positive_kept": kept_pos / num_pos if num_pos else 0.0,
            "negative_kept": kept_neg / num_neg if num_neg else 0.0,
            "mean_pos_similarity": sum_pos / num_pos if num_pos else 0.0,
            "mean_neg_similarity": sum_neg / num_neg if num_neg else 0.0,
            "active_fraction": active / len(losses),
        }
        return loss
