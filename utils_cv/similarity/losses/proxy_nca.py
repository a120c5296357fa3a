"""Proxy-NCA loss: each class is pulled to a learned proxy (Movshovitz-Attias et al., 2017).

Copy this file alone into another project: it imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProxyNCALoss(nn.Module):
    """NCA against learned class proxies ("No Fuss Distance Metric Learning using Proxies").

    The proxies belong to the loss, not the model, and are trained with it. Embeddings and
    proxies are L2-normalized; the distance is squared Euclidean between the unit vectors,
    ``d = ||x - p||^2`` (0 to 4), and a proxy's logit is ``-scale * d``. The reference code
    scales embeddings by a and proxies by b; on unit vectors that equals ``scale = a * b``
    (CUB and Cars: a = b = 3, so 9; SOP: a = 1, b = 8, so 8). The scale is an inverse
    temperature: ProxyNCA++ (Teh et al., 2020) counts a low temperature (a high scale) among
    the ingredients that matter most. Distances are computed in float32 even under mixed
    precision, without Python loops. Any embedding norm up to float32's largest gives the
    same loss (rows shorter than 1e-12, F.normalize's eps, count as zero); a NaN or infinite
    embedding gives a NaN loss.

    Initialization matters: ``proxies`` starts as ``randn / 8``, as in the reference code
    (dichotomies/proxy-nca, ProxyNCA++). The loss normalizes each proxy, so the gradient
    on a raw proxy scales as 1 / ||p||: pytorch-metric-learning's std-1 proxies get 8x
    smaller steps, and a step of a given length turns a longer proxy less. Adam's steps
    are about the learning rate whatever the gradient's size (while it is well above Adam's
    eps), so with another initialization the proxies' learning rate must be tuned again.

    Args:
        num_classes: C; labels must lie in 0..C-1 (C >= 2).
        embedding_size: D, the size of the embeddings.
        scale: the inverse temperature (> 0).
        include_positive: True: the softmax form, cross-entropy over all proxies (ProxyNCA++,
            pytorch-metric-learning). False: the paper's form, per sample
            ``scale * d(x, p_y) + logsumexp over z != y of (-scale * d(x, p_z))``; its
            denominator leaves out the positive, so the loss can go below zero.
        proxies_per_class: an integer k >= 1: k proxies per class (class c owns rows
            c*k .. c*k+k-1), and a class's distance is that of its nearest proxy. Or a
            fraction 0 < f < 1: ceil(C * f) >= 2 proxies shared by the paper's static assignment,
            class c -> proxy c % num_proxies (``proxy_of_class``); classes c and
            c + num_proxies are pulled to the same point. A fixed assignment keeps the target
            fixed and the loss deterministic. The loss is then over the proxies, with target
            proxy_of_class[y].
        label_smoothing: eps in [0, 1), softmax form only, as dichotomies/proxy-nca: the
            target is 1 - eps on the true class (or proxy) and eps / (K - 1) on each of the
            other K - 1 (torch's ``label_smoothing`` puts eps / K on all K: ours is
            torch's at eps * K / (K - 1)).

    Shapes: embeddings (N, D) float, labels (N,) int -> scalar loss (mean over the batch).

    After each call, ``stats`` holds floats about that batch (the K targets are the classes,
    or the proxies when classes share them):

        "mean_pos_distance": mean squared distance to the own class's (nearest) proxy.
        "mean_neg_distance": mean over the other K - 1 targets' distances.
        "proxy_accuracy": share of the samples whose nearest target is their own.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = 9.0,
        include_positive: bool = True,
        proxies_per_class: float = 1,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a proxy loss needs at least 2 classes")
        if not scale > 0:
            raise ValueError(f"scale={scale} must be > 0 (an inverse temperature, e.g. 9)")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if label_smoothing > 0 and not include_positive:
            raise ValueError(
                f"label_smoothing={label_smoothing} is defined for the softmax form only; "
                "use include_positive=True or label_smoothing=0"
            )
        per_class = proxies_per_class
        valid = isinstance(per_class, int | float) and not isinstance(per_class, bool)
        if valid and per_class >= 1 and float(per_class).is_integer():
            num_proxies, proxy_of_class = num_classes * int(per_class), None
        elif valid and 0 < per_class < 1:
            # The ceiling, rounded first: 25 * 0.28 = 7.000000000000001 gives 7 proxies, not 8.
            exact = round(num_classes * per_class, 6)
            num_proxies = int(exact) + (exact > int(exact))
            proxy_of_class = torch.arange(num_classes) % num_proxies
            valid = num_proxies >= 2
        else:
            valid = False
        if not valid:
            raise ValueError(
                f"proxies_per_class={proxies_per_class!r} is not allowed for "
                f"num_classes={num_classes}; use a whole number >= 1 (proxies per class) or "
                "a fraction 0 < f < 1 with ceil(num_classes * f) >= 2 (shared proxies)"
            )
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.scale = scale
        self.include_positive = include_positive
        self.proxies_per_class = proxies_per_class
        self.label_smoothing = label_smoothing
        self.num_proxies = num_proxies
        self.proxies = nn.Parameter(torch.randn(num_proxies, embedding_size) / 8)
        # Derived from the arguments, so not saved; None unless classes share proxies.
        self.register_buffer("proxy_of_class", proxy_of_class, persistent=False)
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
        shared = self.proxy_of_class is not None
        targets = self.proxy_of_class[labels] if shared else labels
        # Mixed precision would round distances near 0; compute in float32 or better.
        with torch.autocast(embeddings.device.type, enabled=False):
            dtype = torch.promote_types(embeddings.dtype, self.proxies.dtype)
            dtype = torch.promote_types(dtype, torch.float32)
            x = embeddings.to(dtype)
            # Rows with a coordinate of 2 or more are first scaled down by a power of two (exact,
            # so no value changes): the squared norm of a row as large as 1e20 overflows
            # float32, and F.normalize would return 0 instead of its direction.
            peak = x.detach().abs().amax(dim=1, keepdim=True)
            x = F.normalize(x / torch.exp2(torch.log2(peak).floor()).clamp(min=1), dim=1)
            p = F.normalize(self.proxies.to(dtype), dim=1)
            # ||x - p||^2 = 2 - 2 x.p for unit vectors: (N, num_proxies) without an N x P x D
            # difference. Clamped at 0 against rounding; finite gradients where x = p.
            distances = (2 - 2 * x @ p.T).clamp(min=0)
            if not shared:  # a class is as near as its nearest proxy: (N, C)
                distances = distances.view(n, self.num_classes, -1).amin(dim=2)
            logits = -self.scale * distances
            is_target = F.one_hot(targets, logits.shape[1]).bool()
            if not self.include_positive:
                negatives = torch.logsumexp(logits.masked_fill(is_target, -torch.inf), dim=1)
                loss = (negatives - logits[is_target]).mean()
            else:  # eps / (K - 1) on the others, 1 - eps on the target: one-hot at eps = 0
                eps = self.label_smoothing
                soft = torch.full_like(logits, eps / (logits.shape[1] - 1))
                loss = F.cross_entropy(logits, soft.masked_fill(is_target, 1 - eps))

        with torch.no_grad():
            values = torch.stack(
                [
                    distances[is_target].mean(),
                    distances[~is_target].mean(),
                    (distances.argmin(dim=1) == targets).to(dtype).mean(),
                ]
            ).tolist()
        self.stats = {
            "mean_pos_distance": values[0],
            "mean_neg_distance": values[1],
            "proxy_accuracy": values[2],
        }
        return loss
