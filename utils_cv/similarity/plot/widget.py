"""A retrieval browser: pick or upload a query, see its nearest catalogue images, click on::

    browser = plot.RetrievalBrowser({"flat": flat, "hnsw": hnsw}, embeddings, data.images,
                                    labels=names, model=model, examples=queries)
    fig = browser.figure()         # the current query and its results, a static figure
    display(browser.widget())      # live in JupyterLab: change the index or the query, upload

Every index holds the same catalogue in the same order: position i is embeddings[i], images[i]
and labels[i]. A catalogue query searches with its own embedding and is left out of its own
results; an uploaded image is embedded by the model at the index's image size and has no
label, so its results carry no match mark. The widget only calls the methods (``set_kind``,
``set_query``, ``upload``, ``click``), so code and clicks change the same state. Without a
frontend (papermill) the widget is still built, only not shown: the figure is what stays.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import numpy as np
import torch
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from PIL import Image

from utils_cv.similarity.plot._common import MATCH_COLOR, MISMATCH_COLOR, Array, _as_numpy, _to_hwc
from utils_cv.similarity.plot.ranks import plot_rank

TILE_PIXELS = 96  # width of an image tile in the widget; small images are scaled up


class RetrievalBrowser:
    """Browse the k nearest catalogue images of a query in one of several indexes.

    Args:
        indexes: name -> ``EmbeddingIndex`` (e.g. {"flat": ..., "hnsw": ...}), all built over
            the same catalogue in the same order.
        embeddings: (N, D) float embeddings of the catalogue; a catalogue query searches with
            its own.
        images: (N, 3, H, W) uint8 catalogue images, for the tiles.
        labels: (N,) label of each image (class names read best); None takes the first
            index's labels when it has some.
        k: results per query.
        model: the embedding model; needed only to upload images.
        query: position of the first query; examples: positions offered in a drop-down.

    State: ``kind`` (the index searched), ``query`` (the query's position, None for an upload),
    ``query_image``, and the results nearest first: ``distances`` (k,), ``positions`` (k,).
    """

    def __init__(
        self,
        indexes: Mapping,
        embeddings: Array,
        images: Array,
        labels: Sequence | Array | None = None,
        k: int = 8,
        model: torch.nn.Module | None = None,
        query: int = 0,
        examples: Sequence[int] = (),
    ):
        if not indexes:
            raise ValueError("indexes is empty; pass at least one, e.g. {'flat': index}")
        self.indexes = dict(indexes)
        self.embeddings, self.images = torch.as_tensor(embeddings), _as_numpy(images)
        first = next(iter(self.indexes.values()))
        if labels is None and any(label is not None for label in first.labels):
            labels = first.labels
        if labels is not None:  # a list, so that labels compare as Python values
            labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
        self.labels = labels
        count = len(self.embeddings)
        sizes = {f"index {name!r}": len(index) for name, index in self.indexes.items()}
        sizes["images"] = len(self.images)
        if self.labels is not None:
            sizes["labels"] = len(self.labels)
        wrong = [f"{name} holds {size}" for name, size in sizes.items() if size != count]
        if wrong:
            raise ValueError(
                f"the embeddings hold {count} images but {', '.join(wrong)}; build every index "
                "from these embeddings, in the same order as the images and labels"
            )
        if not 1 <= k < count:
            raise ValueError(f"k={k} must be between 1 and {count - 1} (the images but the query)")
        self.k, self.model, self.examples = k, model, [int(p) for p in examples]
        for position in [query, *self.examples]:
            self._check_position(position)
        self.kind, self._ui, self._drawing = next(iter(self.indexes)), None, False
        self.set_query(query)

    def set_query(self, position: int) -> None:
        """Make catalogue image ``position`` the query."""
        self._check_position(position)
        embedding = self.embeddings[position : position + 1]
        self._update(self.kind, int(position), self.images[position], embedding)

    def set_kind(self, kind: str) -> None:
        """Search the index named ``kind`` for the same query."""
        if kind not in self.indexes:
            raise ValueError(f"no index named {kind!r}; use one of {list(self.indexes)}")
        self._update(kind, self.query, self.query_image, self._embedding, self._identity)

    def upload(self, content: bytes) -> None:
        """Make an image file's bytes (JPEG, PNG, ...) the query, embedded by the model."""
        from utils_cv.similarity.catalogue import (
            load_query_images,
            query_embeddings,
            query_geometry,
        )

        if self.model is None:
            raise ValueError(
                "an uploaded image needs the embedding model: RetrievalBrowser(..., model=model)"
            )
        index = self.indexes[self.kind]
        size, crop_pct = query_geometry(index)
        try:
            image = load_query_images([io.BytesIO(bytes(content))], size, crop_pct)
        except ValueError:
            raise ValueError("the uploaded file is not an image; upload a JPEG or a PNG") from None
        embedding, identity = query_embeddings(self.model, index, image)
        self._update(self.kind, None, image[0].numpy(), embedding, identity)

    def click(self, rank: int) -> None:
        """Make the result at ``rank`` (0 = nearest) the query."""
        if not 0 <= rank < len(self.positions):
            raise ValueError(f"rank={rank} but there are {len(self.positions)} results")
        self.set_query(int(self.positions[rank]))

    def _update(self, kind, position, image, embedding, identity=None) -> None:
        """Search; only when that succeeds, take the new state and redraw the widget."""
        # A catalogue query finds itself first: ask for one more and drop it (or the last).
        k = self.k + (position is not None)
        distances, positions = self.indexes[kind]._search(embedding, k, identity)
        keep = positions[0] >= 0  # an approximate index may find fewer (-1)
        if position is not None:
            keep &= positions[0] != position
        self.distances, self.positions = distances[0][keep][: self.k], positions[0][keep][: self.k]
        self.kind, self.query, self.query_image = kind, position, image
        self._embedding, self._identity = embedding, identity
        self._redraw()

    def _check_position(self, position: int) -> None:
        if not 0 <= position < len(self.images):
            raise ValueError(f"query {position} is out of range: use 0 to {len(self.images) - 1}")

    def _matches(self) -> list[bool] | None:
        if self.labels is None or self.query is None:
            return None
        return [self.labels[p] == self.labels[self.query] for p in self.positions]

    def _name(self, position: int | None) -> str:
        if position is None:
            return "uploaded image"
        return f"#{position}" + ("" if self.labels is None else f" {self.labels[position]}")

    def figure(self, tile_size: float = 1.6) -> Figure:
        """The query and its results as a static figure, captioned and framed as ``plot_rank``."""
        fig = plot_rank(
            self.query_image,
            self.images[self.positions],
            self.distances,
            self._matches(),
            query_title=f"query\n{self._name(self.query)}",
            reference_titles=None
            if self.labels is None
            else [str(self.labels[p]) for p in self.positions],
            tile_size=tile_size,
        )
        fig.suptitle(f"{self.kind} index", fontsize=10)
        return fig

    def widget(self):
        """The live browser (an ipywidgets VBox): built without a frontend, shown by one."""
        import ipywidgets as w

        if self._ui is None:
            ui = self._ui = SimpleNamespace()
            ui.kind = w.Dropdown(options=list(self.indexes), description="index")
            ui.query = w.BoundedIntText(min=0, max=len(self.images) - 1, description="query #")
            options = [(self._name(p), p) for p in self.examples]
            ui.examples = w.Dropdown(options=options, value=None, description="examples")
            ui.examples.layout.display = None if self.examples else "none"
            ui.upload = w.FileUpload(accept="image/*", description="upload")
            ui.status, ui.query_caption = w.HTML(), w.HTML()
            ui.query_image = w.Image(format="png", width=TILE_PIXELS)
            ui.images = [w.Image(format="png", width=TILE_PIXELS) for _ in range(self.k)]
            ui.captions = [w.HTML() for _ in range(self.k)]
            ui.buttons = [w.Button(description="search this") for _ in range(self.k)]
            ui.tiles = [
                w.VBox(tile) for tile in zip(ui.images, ui.captions, ui.buttons, strict=True)
            ]
            for rank, button in enumerate(ui.buttons):
                button.on_click(lambda _, rank=rank: self._safely(self.click, rank))
            for control, action in [
                (ui.kind, self.set_kind),
                (ui.query, self.set_query),
                (ui.examples, self.set_query),
                (ui.upload, lambda files: self.upload(files[0]["content"])),
            ]:
                control.observe(lambda change, a=action: self._safely(a, change["new"]), "value")
            controls = w.HBox([ui.kind, ui.query, ui.examples, ui.upload])
            row = w.HBox([w.VBox([ui.query_image, ui.query_caption]), *ui.tiles])
            row.layout.flex_flow = "row wrap"
            ui.box = w.VBox([controls, ui.status, row])
            self._redraw()
        return self._ui.box

    def _safely(self, action, value) -> None:
        """Run a widget's action; show its error above the tiles, where the user looks, rather
        than in the widget log (ValueError: a bad request; anything else, e.g. out of memory)."""
        if self._drawing or value is None or value == ():
            return
        try:
            action(value)
        except Exception as error:  # a widget callback has no caller to raise to
            text = (
                str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
            )
            self._ui.status.value = f"<b style='color:red'>{html.escape(text)}</b>"
        finally:
            self._drawing = True
            self._ui.upload.value = ()  # empty, so that the same file can be uploaded again
            self._drawing = False

    def _redraw(self) -> None:
        """Show the state in the widget, its controls changed without calling back."""
        ui = self._ui
        if ui is None:
            return
        self._drawing = True
        try:
            ui.kind.value, ui.status.value = self.kind, ""
            if self.query is not None:
                ui.query.value = self.query
            ui.examples.value = self.query if self.query in self.examples else None
            ui.query_image.value = _png(self.query_image)
            ui.query_caption.value = f"<b>query</b><br>{html.escape(self._name(self.query))}"
            matches = self._matches()
            for rank, (tile, image, caption) in enumerate(
                zip(ui.tiles, ui.images, ui.captions, strict=True)
            ):
                tile.layout.visibility = "visible" if rank < len(self.positions) else "hidden"
                if rank >= len(self.positions):
                    continue
                position = self.positions[rank]
                image.value = _png(self.images[position])
                text = f"rank: {rank + 1}, dist: {self.distances[rank]:.2f}"
                image.layout.border = "1px solid lightgray"
                if matches is not None:
                    color = to_hex(MATCH_COLOR if matches[rank] else MISMATCH_COLOR)
                    image.layout.border = f"4px solid {color}"
                    text += "<br>match" if matches[rank] else "<br>no match"
                if self.labels is not None:
                    text += f"<br>{html.escape(str(self.labels[position]))}"
                caption.value = text
        finally:
            self._drawing = False


def _png(image: np.ndarray) -> bytes:
    """(3, H, W) or (1, H, W) uint8 or float in [0, 1] -> PNG file bytes."""
    pixels = _to_hwc(image)
    if pixels.dtype != np.uint8:
        pixels = np.round(pixels * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
