"""Losses for metric learning: one file per loss, each importing ``torch`` only.

Copy any one file (``softmax.py``, ``triplet.py``, ...) into another project and it works
alone. Every loss follows one contract:

- **Call:** ``loss(embeddings, labels) -> scalar`` with ``embeddings: (N, D) float`` and
  ``labels: (N,) int``. A loss for a model with several outputs (see
  ``utils_cv.similarity.models``, "The model contract") takes that model's
  ``training_outputs`` dict in place of ``embeddings``.
- **Own parameters (optional):** class weights or proxies are ``nn.Parameter`` s of the
  loss. The training code optimizes the model and the loss together, with the loss in its
  own parameter group so it can have its own learning rate.
- **Diagnostics (optional):** a ``stats`` dict of plain floats about the last batch (for
  example ``active_fraction``), refreshed by every call. A loss made of other losses may
  nest their dicts (``{"triplet": {...}}``); ``LossStatsCallback`` averages every number
  per epoch, nested ones under joined names (``triplet_active_fraction``).
- **Errors** say what to change in words that make sense in any project.
"""

from utils_cv.similarity.losses.embedding_expansion import EmbeddingExpansion
from utils_cv.similarity.losses.multi_similarity import MultiSimilarityLoss
from utils_cv.similarity.losses.norm_softmax import NormSoftmaxLoss
from utils_cv.similarity.losses.proxy_nca import ProxyNCALoss
from utils_cv.similarity.losses.ranking_regularized import RankingRegularizedLoss
from utils_cv.similarity.losses.softmax import SoftmaxLoss
from utils_cv.similarity.losses.triplet import TripletLoss

__all__ = [
    "EmbeddingExpansion",
    "MultiSimilarityLoss",
    "NormSoftmaxLoss",
    "ProxyNCALoss",
    "RankingRegularizedLoss",
    "SoftmaxLoss",
    "TripletLoss",
]
