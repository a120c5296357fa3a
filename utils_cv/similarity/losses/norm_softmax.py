"""NormSoftmax: cross-entropy over cosine similarities to class weights (Zhai & Wu, 2019).

Copy this file alone into another project: it imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormSoftmaxLoss(nn.Module):
    """Normalized, temperature-scaled softmax ("Classification is a Strong Baseline for DML").

    The class weights belong to the loss, not to the model: at test time the classes are
    new, so only the embeddings before it are used for retrieval. For embeddings ``x``
    (N, D), class weights ``W`` (C, D) and labels ``y``:

        logits = normalize(x) @ normalize(W).T / temperature
        loss = mean over the batch of cross_entropy(logits, y)

    There is no bias, and both sides are L2-normalized, so a logit is the cosine between
    an embedding and a class weight divided by the temperature: only directions count, the
    same cosine that retrieval ranks by. A bias or a weight's length would let a class win
    by its size rather than by its direction, which nearest-neighbour search cannot use.

    The temperature (0.05 in the paper) sets how sharp the softmax is: cosines lie in
    [-1, 1], so at temperature 1 the logits differ by at most 2 and the loss can never get
    near 0; a low temperature spreads them to +-1/T and lets the true class take almost all
    the probability. It also scales the gradients: the gradient on each cosine is
    ``(softmax - onehot) / T``, 20x at 0.05. Logits and cross-entropy are computed in
    float32 even under mixed precision: bfloat16 keeps 8 significant bits, so logits near
    20 would be rounded by up to 0.06. Any embedding norm up to float32's largest gives the
    same loss (rows shorter than 1e-12, F.normalize's eps, count as zero); a NaN or infinite
    embedding gives a NaN loss.

    ``weight`` starts uniform in +-1/sqrt(D), as in the reference code
    (azgo14/classification_metric_learning, nn.Linear's old initialization). The loss
    normalizes each row, so the gradient on a raw row scales as 1 / its length: with
    another initialization (pytorch-metric-learning's is std 1: rows about sqrt(3 D) times
    longer) the weights' learning rate must be tuned again.

    Relation to ProxyNCA: for unit vectors ``||x - w||^2 = 2 - 2 cos``, so ProxyNCA's
    logit at scale s, ``-s ||x - w||^2 = 2 s cos - 2 s``, is NormSoftmax's ``cos / T`` at
    ``s = 1 / (2 T)`` plus a constant per row, which cross-entropy ignores. NormSoftmax at
    temperature T is ``ProxyNCALoss`` (softmax form, one proxy per class) at scale 1 / (2T)
    with the class weights as proxies: the same loss and gradients (T = 0.05 is scale 10).
    Only the defaults differ: initialization, and so the learning rate that suits them.

    pytorch-metric-learning: ``NormalizedSoftmaxLoss(num_classes, embedding_size,
    temperature)`` is the same loss (with its default mean reducer); its ``W`` is (D, C),
    our ``weight.T``.

    Args:
        num_classes: C; labels must lie in 0..C-1 (C >= 2).
        embedding_size: D, the size of the embeddings (D >= 1).
        temperature: T > 0 divides the cosines; 0.05 in the paper.

    Shapes: embeddings (N, D) float, labels (N,) int -> scalar loss (mean over the batch).

    After each call, ``stats`` holds floats about that batch:
        "mean_cosine_own": mean cosine between an embedding and its own class's weight.
        "mean_cosine_other": mean over the other C - 1 classes' cosines.
        "accuracy": share of the samples whose highest logit is their own class.
    """

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05):
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"num_classes={num_classes}: a classification loss needs at least 2 classes"
            )
        if embedding_size < 1:
            raise ValueError(
                f"embedding_size={embedding_size} must be at least 1; pass the model's "
                "embedding_size"
            )
        # Also refuses NaN and infinity, which fail every comparison or the upper bound.
        if not 0 < temperature < float("inf"):
            raise ValueError(
                f"temperature={temperature} must be > 0 and finite (0.05 in the paper)"
            )
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.temperature = temperature
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        bound = embedding_size**-0.5
        nn.init.uniform_(self.weight, -bound, bound)
        self.stats: dict[str, float] = {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = len(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size or n == 0:
            raise ValueError(
                f"embeddings have shape {tuple(embeddings.shape)} but the loss expects "
                f"(N, {self.embedding_size}) with N >= 1; create it with the model's "
                "embedding_size"
            )
        if labels.shape != (n,) or labels.is_floating_point():
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} and dtype {labels.dtype}; they must "
                f"be ({n},) integers, one class index per embedding"
            )
        labels = labels.to(embeddings.device)
        low, high = torch.stack([labels.min(), labels.max()]).tolist()
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"labels range from {low} to {high} but num_classes={self.num_classes}; "
                "relabel the classes to 0..C-1 (here: ImageData.relabel()) or create the "
                "loss with num_classes set to the number of classes"
            )
        # Under mixed precision the matmul would run in half precision; turn autocast off
        # and work in the inputs' precision, at least float32.
        with torch.autocast(embeddings.device.type, enabled=False):
            dtype = torch.promote_types(embeddings.dtype, self.weight.dtype)
            dtype = torch.promote_types(dtype, torch.float32)
            x = embeddings.to(dtype)
            # Rows with a coordinate of 2 or more are first scaled down by a power of two (exact,
            # so no value changes): the squared norm of a row as large as 1e20 overflows
            # float32, and F.normalize would return 0 instead of its direction.
            peak = x.detach().abs().amax(dim=1, keepdim=True)
            x = F.normalize(x / torch.exp2(torch.log2(peak).floor()).clamp(min=1), dim=1)
            w = F.normalize(self.weight.to(dtype), dim=1)
            cosines = x @ w.T  # (N, C)
            logits = cosines / self.temperature
            loss = F.cross_entropy(logits, labels)

        with torch.no_grad():
            is_own = F.one_hot(labels, self.num_classes).bool()
            values = torch.stack(
                [
                    cosines[is_own].mean(),
                    cosines[~is_own].mean(),
                    (logits.argmax(dim=1) == labels).to(dtype).mean(),
                ]
            ).tolist()
        self.stats = {
            "mean_cosine_own": values[0],
            "mean_cosine_other": values[1],
            "accuracy": values[2],
        }
        return loss
