"""Search a catalogue: faiss indexes behind one small class, saved with the model that made them.

`EmbeddingIndex` holds the references (their ids, labels and paths) and one of five kinds of
index (faiss: Johnson, Douze and Jégou, "Billion-scale similarity search with GPUs", 2017):

- "flat": exact search of the float embeddings. It searches with `search.nearest_neighbors`,
  so its neighbours, ties included, are exactly those of the evaluation.
- "ivf_flat": k-means splits the references into `nlist` cells; a query scans only the
  `nprobe` cells nearest to it. Approximate: a neighbour in an unscanned cell is missed.
- "ivf_pq": the same cells, each reference stored as `pq_bytes` bytes by product
  quantization (`pq_bytes` sub-vectors, each replaced by the nearest of 256 centroids), and
  distances estimated from those codes: far less memory, approximate distances.
- "hnsw": a graph of near neighbours in layers (Malkov and Yashunin, 2018), searched
  greedily with a candidate list of `ef_search`: no training, fast, memory above flat.
- "binary_flat": exact Hamming search of the sign codes of notebook 04 (`binary.binarize`),
  32 times smaller than float32, through `search.nearest_neighbors(metric="hamming")`.

The exact kinds search where `search.nearest_neighbors` does (CUDA when available, through
torch); the IVF kinds search on a GPU when faiss was built with GPU support (`faiss-gpu`), on
the CPU otherwise; HNSW has no GPU version in faiss. An index remembers what made its embeddings (`model_identity`: the model's name,
a fingerprint of its weights, its input size, crop and normalization, the library version) and
refuses queries of another width or, when the caller says which model made them, of
another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

import utils_cv
from utils_cv.similarity.binary import binarize
from utils_cv.similarity.search import _as_embeddings, nearest_neighbors

KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw", "binary_flat")
FLOAT_METRICS = ("cosine", "euclidean", "squared_euclidean")
FORMAT = 1  # of the saved folder; a change that older code cannot read increments it
# What must match between the model of the index and the model of the queries; its name is
# for people and the library version may change without changing any embedding.
IDENTITY_KEYS = ("weights_sha256", "image_size", "crop_pct", "mean", "std")
# Identities saved before a key existed: the value it had then (crop_pct: the whole side).
IDENTITY_DEFAULTS = {"crop_pct": 1.0}


def model_identity(
    model: torch.nn.Module, image_size: int, name: str | None = None, crop_pct: float = 1.0
) -> dict:
    """What an index needs to know about the model that embedded its references.

    Args:
        model: the embedding model; its weights are fingerprinted (SHA-256 of the state dict).
        image_size: the square size images are resized to before embedding.
        name: a name for people to read; the model's class name by default.
        crop_pct: how images were made square: shorter side resized to image_size /
            crop_pct, the centre cropped (``FileList.crop_pct``; 1.0 keeps the whole side).

    Returns:
        {"name", "weights_sha256" (first 16 hex digits), "image_size", "crop_pct", "mean",
        "std" (the input normalization inside the model, None when it has none), "utils_cv"
        (the version)}.
    """
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    return {
        "name": name or type(model).__name__,
        "weights_sha256": digest.hexdigest()[:16],
        "image_size": int(image_size),
        "crop_pct": float(crop_pct),
        "mean": None if mean is None else [round(v, 6) for v in mean.flatten().tolist()],
        "std": None if std is None else [round(v, 6) for v in std.flatten().tolist()],
        "utils_cv": utils_cv.__version__,
    }


def identity_values(identity: dict) -> dict:
    """The values of ``IDENTITY_KEYS`` in a model identity, ``IDENTITY_DEFAULTS`` for a key
    that an older identity lacks."""
    return {key: identity.get(key, IDENTITY_DEFAULTS.get(key)) for key in IDENTITY_KEYS}


class EmbeddingIndex:
    """A searchable set of reference embeddings with their ids, labels and paths.

    Args:
        dim: the embedding size D (for "binary_flat": D bits, stored as ceil(D / 8) bytes).
        kind: one of `KINDS` (see the module docstring).
        metric: "cosine", "euclidean" or "squared_euclidean" for the float kinds, the
            distances of `search.nearest_neighbors`; "binary_flat" always uses "hamming".
        nlist: cells of the IVF kinds; None picks about 4 sqrt(N) when references are first
            added (at most N / 39: faiss wants 39 training points per cell).
        nprobe: cells an IVF query scans (more: slower, nearer to exact).
        pq_bytes: bytes per reference for "ivf_pq"; must divide D. None: D / 8, at most 64.
        hnsw_m: graph neighbours per node for "hnsw"; ef_search: its candidate list.
        model: `model_identity` of the model that makes the embeddings, or None.
        seed: seed of the k-means of the IVF kinds.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        metric: str = "cosine",
        *,
        nlist: int | None = None,
        nprobe: int = 8,
        pq_bytes: int | None = None,
        hnsw_m: int = 32,
        ef_search: int = 64,
        model: dict | None = None,
        seed: int = 0,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not an index kind; use one of {KINDS}")
        if kind == "binary_flat":
            metric = "hamming"
        elif metric not in FLOAT_METRICS:
            raise ValueError(f"metric={metric!r} is not supported; use one of {FLOAT_METRICS}")
        if dim < 1:
            raise ValueError(f"dim={dim} must be the embedding size, at least 1")
        if kind == "ivf_pq":
            # Default: the largest divisor of dim up to dim / 8 (and 64): about 4 bits per dimension.
            pq_bytes = pq_bytes or max(
                b for b in range(1, min(64, max(1, dim // 8)) + 1) if dim % b == 0
            )
            if dim % pq_bytes:
                raise ValueError(
                    f"pq_bytes={pq_bytes} must divide the embedding size dim={dim}; pick a "
                    f"divisor such as {max(b for b in range(1, 65) if dim % b == 0)}"
                )
        self.dim, self.kind, self.metric, self.model = dim, kind, metric, model
        self.params = {"nlist": nlist, "nprobe": nprobe, "pq_bytes": pq_bytes}
        self.params |= {"hnsw_m": hnsw_m, "ef_search": ef_search, "seed": seed}
        self.ids = np.zeros(0, dtype=np.int64)
        self.labels: list = []
        self.paths: list[str | None] = []
        self._faiss = None  # built when references are first added

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"EmbeddingIndex(kind={self.kind!r}, metric={self.metric!r}, dim={self.dim}, references={len(self)})"

    def _vectors(self, x, name: str) -> np.ndarray:
        """Float rows as the index stores them (unit vectors for cosine, except "flat"), or
        packed codes for "binary_flat" (given as codes, or float embeddings to binarize)."""
        x = torch.as_tensor(x)
        if self.kind == "binary_flat" and x.dtype == torch.uint8:
            expected = -(-self.dim // 8)
            if x.ndim != 2 or x.shape[1] != expected:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)} but this index holds {self.dim}-bit "
                    f"codes ({expected} bytes per row): embed with the index's model"
                )
            return np.ascontiguousarray(x.numpy())
        if x.ndim != 2 or x.shape[1] != self.dim or not x.is_floating_point():
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} ({x.dtype}) but this index holds float "
                f"embeddings of size {self.dim}: embed with the index's model"
            )
        x = _as_embeddings(x, name)  # refuses NaN and inf rows, naming them
        if self.kind == "binary_flat":
            return binarize(x)
        x = x.float()
        # The flat kind searches with `nearest_neighbors`, which normalizes for cosine itself:
        # normalizing twice would round differently from the evaluation.
        if self.metric == "cosine" and self.kind != "flat":
            x = torch.nn.functional.normalize(x, dim=1)
        return np.ascontiguousarray(x.cpu().numpy())

    def _build(self, x: np.ndarray):
        import faiss

        p, n = self.params, len(x)
        if self.kind == "binary_flat":
            return faiss.IndexBinaryFlat(8 * x.shape[1])
        ip = self.metric == "cosine"
        faiss_metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim) if ip else faiss.IndexFlatL2(self.dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, p["hnsw_m"], faiss_metric)
            index.hnsw.efSearch = p["ef_search"]
            return index
        # Kept only once training succeeded: a failed first add must not fix nlist.
        nlist = p["nlist"] or max(1, min(int(4 * np.sqrt(n)), n // 39))
        if n < nlist or (self.kind == "ivf_pq" and n < 256):
            raise ValueError(
                f"{self.kind} trains on the first references added: got {n}, but it needs at "
                f"least nlist={nlist}"
                + (" and 256 for the PQ codebooks" if self.kind == "ivf_pq" else "")
                + "; add more references at once, lower nlist, or use kind='flat'"
            )
        quantizer = faiss.IndexFlatIP(self.dim) if ip else faiss.IndexFlatL2(self.dim)
        if self.kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss_metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, p["pq_bytes"], 8, faiss_metric)
        index.cp.seed = p["seed"]
        index.train(x)
        index.nprobe = p["nprobe"]
        self._quantizer = quantizer  # faiss holds a raw pointer: keep Python's reference
        p["nlist"] = nlist
        return index

    def add(self, embeddings, labels=None, paths=None, ids=None) -> EmbeddingIndex:
        """Add references: (N, D) float embeddings (or (N, D / 8) uint8 codes for "binary_flat").

        labels: (N,) class of each reference, paths: (N,) image files, ids: (N,) int64 ids to
        return from `search` (default: 0, 1, ... in the order added). The IVF kinds train
        their cells on the first references added.
        """
        x = self._vectors(embeddings, "embeddings")
        n = len(x)
        for name, values in (("labels", labels), ("paths", paths), ("ids", ids)):
            if values is not None and len(values) != n:
                raise ValueError(
                    f"{name} has {len(values)} entries for {n} embeddings; give one per row"
                )
        # Everything is checked before faiss takes the rows, so a refused add changes nothing.
        start = self.ids.max() + 1 if len(self.ids) else 0
        new_ids = np.arange(start, start + n) if ids is None else _as_ids(ids)
        if len(np.intersect1d(new_ids, self.ids)) or len(np.unique(new_ids)) < n:
            raise ValueError("ids must be unique, also against the ids already added")
        new_labels = [None] * n if labels is None else _as_json_values(labels, "labels")
        new_paths = [None] * n if paths is None else [None if p is None else str(p) for p in paths]
        if self._faiss is None:
            self._faiss = self._build(x)
        self._faiss.add(x)
        self.ids = np.concatenate([self.ids, new_ids])
        self.labels += new_labels
        self.paths += new_paths
        return self

    def search(
        self, queries, k: int = 10, model: dict | None = None, device=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest references of each query, nearest first.

        Args:
            queries: (Q, D) float embeddings (or uint8 codes for "binary_flat").
            k: neighbours per query, at most the number of references.
            model: `model_identity` of the model that made the queries; when given, it must
                be the index's own (checked, with a clear error otherwise).
            device: where the exact kinds search (see `search.nearest_neighbors`).

        Returns:
            distances (Q, k) float32 (int32 for "binary_flat") in the metric's units and ids
            (Q, k) int64. An approximate kind may find fewer than k: id -1, distance inf.
        """
        distances, positions = self._search(queries, k, model, device)
        return distances, np.where(positions >= 0, self.ids[positions], -1)

    def _search(
        self, queries, k: int, model: dict | None, device=None
    ) -> tuple[np.ndarray, np.ndarray]:
        if model is not None and self.model is not None:
            mine, theirs = identity_values(self.model), identity_values(model)
            changed = [key for key in IDENTITY_KEYS if theirs[key] != mine[key]]
            if changed:
                raise ValueError(
                    "the queries come from another model than the index: "
                    + "; ".join(
                        f"{key} {theirs[key]} against the index's {mine[key]}" for key in changed
                    )
                    + ". Embed the queries with the index's model, or build the index again with this one"
                )
        if not 1 <= k <= len(self):
            raise ValueError(
                f"k={k} but the index holds {len(self)} references; use 1 <= k <= {len(self)}"
            )
        q = self._vectors(queries, "queries")
        if self.kind in ("flat", "binary_flat"):
            metric = "hamming" if self.kind == "binary_flat" else self.metric
            distances, positions = nearest_neighbors(q, self._stored(), k, metric, device=device)
            return distances.numpy(), positions.numpy()
        scores, positions = self._approximate().search(q, k)
        found = positions >= 0
        if self.metric == "cosine":
            distances = np.clip(1 - scores, 0, 2)
        else:
            distances = np.maximum(scores, 0)
            distances = np.sqrt(distances) if self.metric == "euclidean" else distances
        return np.where(found, distances, np.inf).astype(np.float32), positions

    def _approximate(self):
        """The faiss index to search: a GPU copy of an IVF index where faiss-gpu has a GPU."""
        import faiss

        if not self.kind.startswith("ivf") or not hasattr(faiss, "index_cpu_to_gpu"):
            return self._faiss
        if faiss.get_num_gpus() == 0:
            return self._faiss
        if getattr(self, "_gpu", None) is None or self._gpu.ntotal != self._faiss.ntotal:
            options = faiss.GpuClonerOptions()
            options.useFloat16 = True  # IVF-PQ's lookup tables must fit the GPU's shared memory
            try:
                self._gpu_resources = faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._faiss, options)
            except RuntimeError:  # a setting faiss's GPU index refuses: search on the CPU
                return self._faiss
        self._gpu.nprobe = self.params["nprobe"]
        return self._gpu

    def _stored(self) -> np.ndarray:
        """The stored rows of the exact kinds (float: a view of faiss's memory; codes: a copy)."""
        import faiss

        index = self._faiss
        if self.kind == "binary_flat":
            return faiss.vector_to_array(index.xb).reshape(index.ntotal, index.code_size)
        return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * self.dim).reshape(
            index.ntotal, self.dim
        )

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Trade speed against recall after building: IVF `nprobe`, HNSW `ef_search`."""
        if nprobe is not None:
            self.params["nprobe"] = nprobe
            if self.kind.startswith("ivf") and self._faiss is not None:
                self._faiss.nprobe = nprobe
        if ef_search is not None:
            self.params["ef_search"] = ef_search
            if self.kind == "hnsw" and self._faiss is not None:
                self._faiss.hnsw.efSearch = ef_search

    def memory_bytes(self) -> int:
        """Bytes of the serialized faiss index: what it takes on disk and, about, in memory."""
        import faiss

        if self._faiss is None:
            return 0
        serialize = (
            faiss.serialize_index_binary if self.kind == "binary_flat" else faiss.serialize_index
        )
        return int(serialize(self._faiss).nbytes)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to the folder `path` (index.faiss and meta.json).

        The folder is written beside its final place and renamed into it; a previous index
        there is replaced (moved aside first, removed last). A folder that holds anything
        else is refused, never emptied.
        """
        import faiss

        if self._faiss is None:
            raise ValueError("the index is empty; add references before saving it")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT, "dim": self.dim, "kind": self.kind, "metric": self.metric,
            "params": self.params, "model": self.model, "ids": self.ids.tolist(),
            "labels": self.labels, "paths": self.paths, "faiss": faiss.__version__,
        }  # fmt: skip
        if path.exists() and sorted(p.name for p in path.iterdir()) != ["index.faiss", "meta.json"]:
            raise FileExistsError(
                f"{path} exists and is not a saved index; save to a new or empty folder "
                "(an index is only ever saved over an index)"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        old = path.parent / f"{tmp.name}.old"
        try:
            write = faiss.write_index_binary if self.kind == "binary_flat" else faiss.write_index
            write(self._faiss, str(tmp / "index.faiss"))
            (tmp / "meta.json").write_text(json.dumps(meta))
            if path.exists():
                path.rename(old)  # kept until the new folder is in place
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EmbeddingIndex:
        """Read an index written by `save`; ValueError naming the file if one is cut short."""
        import faiss

        path = Path(path)
        files = [path / "meta.json", path / "index.faiss"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a saved index: missing {missing}; write one with EmbeddingIndex.save"
            )
        fix = "probably cut short (a full disk, an interrupted copy); save the index again"
        try:
            meta = json.loads(files[0].read_text())
        except ValueError as error:  # also a file cut short
            raise ValueError(f"{files[0]} is not whole JSON ({error}): {fix}") from error
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path} was saved in index format {meta.get('format')}, this code reads {FORMAT}; "
                "build the index again with this version"
            )
        p = meta["params"]
        index = cls(meta["dim"], meta["kind"], meta["metric"], model=meta["model"], **{
            key: p[key] for key in ("nlist", "nprobe", "pq_bytes", "hnsw_m", "ef_search", "seed")})  # fmt: skip
        read = faiss.read_index_binary if meta["kind"] == "binary_flat" else faiss.read_index
        try:
            index._faiss = read(str(files[1]))
        except RuntimeError as error:  # faiss's error for a file shorter than it says
            raise ValueError(
                f"{files[1]} cannot be read whole ({files[1].stat().st_size} bytes): {fix}"
            ) from error
        index.ids = np.asarray(meta["ids"], dtype=np.int64)
        index.labels, index.paths = meta["labels"], meta["paths"]
        binary = meta["kind"] == "binary_flat"
        width = 8 * -(-meta["dim"] // 8) if binary else meta["dim"]  # bits or dimensions
        sizes = {len(index.ids), len(index.labels), len(index.paths), index._faiss.ntotal}
        if len(sizes) != 1 or index._faiss.d != width:
            raise ValueError(
                f"{path} is inconsistent: index.faiss and meta.json disagree on the number or "
                "width of the references; build the index and save it again"
            )
        index.set_search_params(p["nprobe"], p["ef_search"])
        return index


def _as_ids(ids) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
        raise ValueError("ids must be non-negative integers (-1 means 'not found' in results)")
    return ids.astype(np.int64)


def _as_json_values(values, name: str) -> list:
    """Python values (numpy scalars turned into numbers), refused unless JSON can save them."""
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    try:
        json.dumps(values)
    except TypeError as error:
        raise ValueError(
            f"{name} must be strings, numbers or None, to be saved ({error})"
        ) from None
    return values
