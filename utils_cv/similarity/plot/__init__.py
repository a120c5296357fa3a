"""Plots for retrieval: rank lists, distances, embedding maps, recall and training curves,
class representatives. One module per kind of picture:

- ``images``: image grids, a first look at a dataset (class examples), the designs' credits.
- ``ranks``: a query beside its nearest references; the fixed example queries.
- ``distances``: the distance grid of a few images, same- against different-class histograms.
- ``embeddings``: t-SNE and PCA maps, what triplet mining picks, Embedding Expansion.
- ``curves``: training curves and histories, Recall@K curves, results over seeds as bars.
- ``proxies``: class representatives: ProxyNCA's proxies, NormSoftmax's weights.
- ``widget``: ``RetrievalBrowser``, a query and its results to click through (ipywidgets), and
  the same as a static figure.
- ``_common``: the image type, colours and sizes, and drawing one tile, shared by the others.

Every function returns its matplotlib Figure and never calls ``plt.show()``. Figures are made
with pyplot so that notebooks show them inline; write ``fig = plot_...(...)`` to avoid showing a
figure twice. Images are ``(N, 3, H, W)`` uint8 (or float in [0, 1]) torch tensors or NumPy
arrays, as stored in ``ImageData.images``. Import from the package:
``from utils_cv.similarity import plot`` and ``plot.plot_rank(...)``.
"""

from utils_cv.similarity.plot._common import (
    CAPTION_WIDTH,
    MATCH_COLOR,
    MISMATCH_COLOR,
    TILE_EDGE_COLOR,
    TITLE_SIZE,
    Array,
)
from utils_cv.similarity.plot.curves import (
    plot_histories,
    plot_recall_curves,
    plot_seed_bars,
    plot_training_curves,
)
from utils_cv.similarity.plot.distances import (
    plot_distance_grid,
    plot_distance_histograms,
    plot_distance_panels,
)
from utils_cv.similarity.plot.embeddings import (
    plot_embedding_expansion,
    plot_embedding_map,
    plot_mining_choices,
)
from utils_cv.similarity.plot.images import credit_designs, show_class_examples, show_image_grid
from utils_cv.similarity.plot.proxies import (
    plot_point_snapshots,
    plot_proxy_map,
    plot_softmax_over_proxies,
    plot_temperatures,
)
from utils_cv.similarity.plot.ranks import plot_example_queries, plot_rank, plot_rank_examples
from utils_cv.similarity.plot.widget import RetrievalBrowser

__all__ = [
    "CAPTION_WIDTH",
    "MATCH_COLOR",
    "MISMATCH_COLOR",
    "TILE_EDGE_COLOR",
    "TITLE_SIZE",
    "Array",
    "RetrievalBrowser",
    "credit_designs",
    "plot_distance_grid",
    "plot_distance_histograms",
    "plot_distance_panels",
    "plot_embedding_expansion",
    "plot_embedding_map",
    "plot_example_queries",
    "plot_histories",
    "plot_mining_choices",
    "plot_point_snapshots",
    "plot_proxy_map",
    "plot_rank",
    "plot_rank_examples",
    "plot_recall_curves",
    "plot_seed_bars",
    "plot_softmax_over_proxies",
    "plot_temperatures",
    "plot_training_curves",
    "show_class_examples",
    "show_image_grid",
]
