"""Index speed against recall: every kind of `EmbeddingIndex`, measured against exact search.

For a set of references and a set of queries (unit vectors, cosine distance) this builds each
kind of index of `utils_cv.similarity.index` and, for each of its speed parameters, measures

    build seconds       EmbeddingIndex(...).add(references), k-means training included; once
                        per build (the search parameter is changed afterwards with
                        `set_search_params`, so the rows of one build share its time)
    memory              `memory_bytes()` (the serialized faiss index) and bytes per reference
    queries per second  all queries searched at once, the median of --repeats timed searches
                        (after one untimed search of a few queries: thread pools)
    k-recall@k          the share of the exact top k (the "flat" index: the ground truth) found
                        in the approximate top k, averaged over queries (k = --k, 10)
    1-recall@1          the share of queries whose exact nearest neighbour comes first

for "flat" (exact; always run, it is the ground truth), "ivf_flat" for each --nprobe (values
above nlist are lowered to nlist: every cell scanned), "ivf_pq" for each --pq-bytes and each
--nprobe, "hnsw" for each --ef-search, and "binary_flat" (exact Hamming search of the sign codes:
its own exact neighbours, which are not the float ones, hence its recall below 1).

IVF builds: nlist cells (default sqrt(N), at most N / 39; the index's own default is 4 sqrt(N),
but the k-means and the assignment of every reference cost N x nlist x D per build, four times
as much), the k-means trained on the first --train-per-cell x nlist references (64; faiss takes
256 x nlist), added first; the references are in random order, so that is a random sample.

Data (always normalized to unit length, float32):
- `--embeddings FILE.npy`: (N, D) float embeddings, e.g. the references notebook 08 saves from a
  trained model. Its rows are shuffled (--seed); the first --queries are the queries, the rest
  the "real" references. With --references larger than those, the reference set is grown to
  --references by repeating the real references with Gaussian noise: copy j is real reference
  j mod R plus N(0, sigma^2 I), re-normalized to unit length, where
  sigma = --copy-noise (1.0) x the typical nearest-neighbour distance / sqrt(D), the typical
  distance being the median Euclidean distance from up to 1,000 real references to their
  nearest other real reference. A copy thus lies about one typical neighbour distance from its
  original, so the grown set keeps the clusters of the real embeddings, only denser. The
  choice matters: at 0.5, each real reference of notebook 08's 4,607 became a tight cloud of
  about 217 near-copies at 10^6 references, whose exact top 10 is decided inside one cloud by
  the noise; there IVF-PQ found only 5 to 20 % of the exact top 10 and HNSW (ef 256) 85 %,
  against about 54 % and 98 % at 1.0 (200,000 references). Real references and copies are shuffled together. The JSON's
  "data" records the counts, the typical distance and sigma.
- by default, seeded synthetic clustered unit vectors: (--references + --queries) points in
  --dim (128) dimensions, each drawn around one of C cluster centres (C = SOP's share of
  classes per image, 11,316 / 60,502, of the total: clusters of about 5 points, each point's
  cluster picked uniformly at random): point = unit(centre + --noise (1.1) x N(0, I / D)).
  Learned embeddings are not isotropic (a few principal directions carry most of their
  variance) and approximate indexes rely on that, so the centres are too: centre =
  unit(rotation(g_i x i^-0.5)), g ~ N(0, I), i = 1..D, in a random orthonormal basis (about 18
  effective dimensions at D = 128). The first --queries points are the queries. At the
  defaults the exact nearest neighbour of a query lies in its own cluster for 85 % of the
  queries that have a cluster mate among the references (SOP's Recall@1 for a good model:
  about 0.8), and IVF-Flat's 10-recall@10 climbs from about 0.2 (nprobe 1) to 0.97 (64 of
  316 cells). With isotropic centres instead (an earlier version, noise 1.35), IVF-Flat found only 0.61 of
  the exact top 10 at nprobe 64, as slowly as exact search.

Prints one table row per kind and setting as it is measured; --json writes all rows with the
data description, the machine (CPU model, threads), the library versions and the seed.
`speed_recall(references, queries, k, settings)` is the measurement, for callers that import
this file by path.

    python benchmarks/index_speed.py --json outputs/benchmarks/index_speed.json
    python benchmarks/index_speed.py --embeddings outputs/08_fast_retrieval/references.npy \\
        --references 1000000 --queries 1000 --json outputs/benchmarks/index_speed_1m.json
    python benchmarks/index_speed.py --references 5000 --queries 200 --repeats 1   # quick check

Runtime on 2 cores: under a minute with the defaults (100,000 references, 1,000 queries, 128
dimensions); at 10^6 references grown from notebook 08's embeddings, 2 min 13 s measured on 2
idle cores (HNSW's build 54 s, the four IVF builds about 30 s).
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

import utils_cv
from utils_cv.common.device import cpu_model
from utils_cv.similarity.index import KINDS, EmbeddingIndex

NPROBES = (1, 2, 4, 8, 16, 32, 64)
PQ_BYTES = (8, 16, 32)
EF_SEARCHES = (16, 32, 64, 128, 256)
SOP_CLASS_SHARE = 11_316 / 60_502  # SOP's classes per image: clusters of the synthetic data
CENTRE_DECAY = 0.5  # synthetic centres: standard deviation i^-0.5 along the i-th direction
CHUNK = 65_536  # rows generated at once (memory)
NN_SAMPLE = 1000  # real references whose nearest-neighbour distance gives the typical one
WARMUP_QUERIES = 16
PQ_TRAIN = 39 * 256  # training points faiss asks for a PQ codebook of 256 centroids
SEARCH_PARAMS = ("nlist", "nprobe", "pq_bytes", "hnsw_m", "ef_search")


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in place (float32)."""
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
    return x


def synthetic(n: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, dict]:
    """(n, dim) float32 unit vectors in clusters (module docstring), and their description."""
    rng = np.random.default_rng(seed)
    clusters = max(1, round(n * SOP_CLASS_SHARE))
    scale = np.arange(1, dim + 1, dtype=np.float32) ** np.float32(-CENTRE_DECAY)
    rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    centres = normalize((rng.standard_normal((clusters, dim), dtype=np.float32) * scale) @ rotation)
    labels = rng.integers(clusters, size=n)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, CHUNK):
        block = rng.standard_normal((min(CHUNK, n - start), dim), dtype=np.float32)
        block *= np.float32(noise / np.sqrt(dim))
        block += centres[labels[start : start + len(block)]]
        x[start : start + len(block)] = normalize(block)
    effective = float(np.sum(scale**2) ** 2 / np.sum(scale**4))
    return x, {
        "clusters": clusters,
        "mean_cluster_size": n / clusters,
        "noise": noise,
        "centre_decay": CENTRE_DECAY,
        "centre_effective_dim": effective,
        "how": "point = unit(centre + noise / sqrt(D) N(0, I)), its cluster picked uniformly; "
        "centre = unit(rotation (g * i^-decay)), g ~ N(0, I), a random rotation",
    }


def typical_nn_distance(x: np.ndarray, seed: int) -> float:
    """The median Euclidean distance from up to NN_SAMPLE rows of x to their nearest other row."""
    rng = np.random.default_rng(seed)
    sample = x[rng.choice(len(x), size=min(NN_SAMPLE, len(x)), replace=False)]
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    similarity, _ = flat.search(sample, 2)  # the first is the row itself
    return float(np.median(np.sqrt(np.clip(2 - 2 * similarity[:, 1], 0, None))))


def grow(real: np.ndarray, n: int, copy_noise: float, seed: int) -> tuple[np.ndarray, dict]:
    """n references: the real ones and n - len(real) noisy copies of them, shuffled together
    (module docstring)."""
    r, dim = real.shape
    rng = np.random.default_rng(seed)
    distance = typical_nn_distance(real, seed)
    sigma = copy_noise * distance / np.sqrt(dim)
    position = rng.permutation(n)  # where each row goes: real ones first, then the copies
    x = np.empty((n, dim), dtype=np.float32)
    x[position[:r]] = real
    for start in range(r, n, CHUNK):
        rows = np.arange(start, min(start + CHUNK, n))
        block = rng.standard_normal((len(rows), dim), dtype=np.float32) * np.float32(sigma)
        block += real[(rows - r) % r]
        x[position[rows]] = normalize(block)
    return x, {
        "relative": copy_noise,
        "typical_nn_distance": distance,
        "sigma_per_coordinate": float(sigma),
        "how": "copy j = real reference (j mod R) + N(0, sigma^2 I), re-normalized; sigma = "
        "relative x typical nearest-neighbour distance (median over up to 1,000 real "
        "references) / sqrt(D)",
    }


def load_data(args) -> tuple[np.ndarray, np.ndarray, dict]:
    """(references, queries, description) from the command line's options."""
    if args.embeddings is None:
        n = args.references or 100_000
        x, how = synthetic(n + args.queries, args.dim, args.noise, args.seed)
        description = {"source": "synthetic", "synthetic": how}
        references, queries = x[args.queries :], x[: args.queries]
        description |= {"real_references": n, "noisy_copies": 0, "copy_noise": None}
    else:
        x = np.load(args.embeddings)
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
            raise SystemExit(
                f"{args.embeddings}: need an (N, D) float array, got {x.shape} {x.dtype}"
            )
        if not np.isfinite(x).all():
            raise SystemExit(f"{args.embeddings} has NaN or inf values")
        if len(x) <= args.queries:
            raise SystemExit(
                f"{args.embeddings} has {len(x)} rows: too few for --queries {args.queries} "
                "and at least one reference; lower --queries"
            )
        rows = len(x)
        x = normalize(x[np.random.default_rng(args.seed).permutation(rows)].astype(np.float32))
        queries, real = x[: args.queries], x[args.queries :]
        n = args.references or len(real)
        description = {"source": "file", "file": str(args.embeddings), "file_rows": rows}
        if n <= len(real):
            references = np.ascontiguousarray(real[:n])
            description |= {"real_references": n, "noisy_copies": 0, "copy_noise": None}
        else:
            if len(real) < 2:
                raise SystemExit(
                    "growing the references takes at least 2 real ones: lower --queries"
                )
            references, noise = grow(real, n, args.copy_noise, args.seed + 1)
            description |= {"real_references": len(real), "noisy_copies": n - len(real)}
            description["copy_noise"] = noise
        queries = np.ascontiguousarray(queries)
    description |= {"references": len(references), "queries": len(queries)}
    description["dim"] = references.shape[1]
    return references, queries, description


def default_nlist(n: int) -> int:
    """The benchmark's cells for n references: sqrt(n), at most n / 39 (module docstring)."""
    return max(1, min(round(np.sqrt(n)), n // 39))


def default_settings(
    kinds=KINDS, nprobes=NPROBES, pq_bytes=PQ_BYTES, ef_searches=EF_SEARCHES, hnsw_m=32, nlist=None
) -> list[dict]:
    """What `speed_recall` measures: one {"kind", "build": EmbeddingIndex options, "search":
    [set_search_params options, one per row]} per build. "flat" comes first whatever `kinds`."""
    settings = [{"kind": "flat", "build": {}, "search": [{}]}]
    if "ivf_flat" in kinds:
        settings.append(
            {
                "kind": "ivf_flat",
                "build": {"nlist": nlist},
                "search": [{"nprobe": p} for p in nprobes],
            }
        )
    if "ivf_pq" in kinds:
        settings += [
            {"kind": "ivf_pq", "build": {"nlist": nlist, "pq_bytes": b},
             "search": [{"nprobe": p} for p in nprobes]}
            for b in pq_bytes
        ]  # fmt: skip
    if "hnsw" in kinds:
        settings.append(
            {"kind": "hnsw", "build": {"hnsw_m": hnsw_m},
             "search": [{"ef_search": e} for e in ef_searches]}
        )  # fmt: skip
    if "binary_flat" in kinds:
        settings.append({"kind": "binary_flat", "build": {}, "search": [{}]})
    return settings


def label(kind: str, params: dict) -> str:
    """A short name of a row's setting, for tables and plots."""
    if kind == "ivf_flat":
        return f"nprobe {params['nprobe']}"
    if kind == "ivf_pq":
        return f"{params['pq_bytes']} B, nprobe {params['nprobe']}"
    if kind == "hnsw":
        return f"M {params['hnsw_m']}, ef {params['ef_search']}"
    return "exact Hamming" if kind == "binary_flat" else "exact"


def recalls(found: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """k-recall@k (share of the exact top k in the found top k) and 1-recall@1."""
    hits = (found[:, :, None] == exact[:, None, :]).any(axis=1).sum()
    return float(hits / exact.size), float(np.mean(found[:, 0] == exact[:, 0]))


def build(references: np.ndarray, kind: str, options: dict, train_per_cell: int, seed: int):
    """An EmbeddingIndex of `kind` holding the references, the seconds it took, and how many
    references its k-means trained on (None for the kinds without training).

    The IVF kinds train on the first references added: the first train_per_cell x nlist."""
    start = time.perf_counter()
    index = EmbeddingIndex(references.shape[1], kind, seed=seed, **options)
    first = len(references)  # what the index trains on: all for the kinds without training
    if kind.startswith("ivf"):
        # IVF-PQ: also 39 points per centroid of its 256-centroid codebooks (faiss's minimum)
        least = PQ_TRAIN if kind == "ivf_pq" else 1
        first = min(first, max(train_per_cell * options["nlist"], least))
    index.add(references[:first])
    if first < len(references):
        index.add(references[first:])
    return index, time.perf_counter() - start, first if kind.startswith("ivf") else None


def timed_search(
    index, queries: np.ndarray, k: int, repeats: int, device
) -> tuple[list, np.ndarray]:
    """Seconds of each of `repeats` searches of all queries, and the ids found."""
    index.search(queries[:WARMUP_QUERIES], k, device=device)
    seconds, ids = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        _, found = index.search(queries, k, device=device)
        seconds.append(time.perf_counter() - start)
        ids = found if ids is None else ids
    return seconds, ids


def speed_recall(
    references,
    queries,
    k: int = 10,
    settings: list[dict] | None = None,
    repeats: int = 3,
    train_per_cell: int = 64,
    device="cpu",
    seed: int = 0,
    report=None,
) -> list[dict]:
    """Build, memory, queries per second and recall against exact search of each setting.

    Args:
        references: (N, D) float embeddings; queries: (Q, D), searched with cosine distance.
        k: neighbours per query; k-recall@k compares the top k.
        settings: `default_settings()` by default; "flat" must come first (the ground truth).
            An IVF build without "nlist" gets `default_nlist(N)`; an nprobe above nlist is
            lowered to nlist, and a setting repeated that way is measured once.
        repeats: timed searches of all queries per row; the median counts.
        train_per_cell: IVF k-means training references per cell.
        device: where the exact kinds search (`search.nearest_neighbors`); faiss-cpu runs the
            others on the CPU.
        seed: seed of the IVF k-means.
        report: called with each row as soon as it is measured (printing progress).

    Returns:
        one dict per row: kind, setting (a short name), build (the number of the build it
        belongs to), nlist, nprobe, pq_bytes, hnsw_m, ef_search (None where they do not
        apply), train_size (references the IVF k-means trained on), build_seconds, memory_bytes, bytes_per_vector, search_seconds (the median),
        search_seconds_all, queries_per_second, k, "{k}-recall@{k}" and "1-recall@1".
    """
    references = np.ascontiguousarray(references, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    settings = default_settings() if settings is None else settings
    if not settings or settings[0]["kind"] != "flat":
        raise ValueError("settings must start with the 'flat' kind: it is the ground truth")
    rows, exact = [], None
    for number, setting in enumerate(settings):
        kind, options = setting["kind"], dict(setting.get("build", {}))
        if kind.startswith("ivf") and options.get("nlist") is None:
            options["nlist"] = default_nlist(len(references))
        index, build_seconds, trained_on = build(references, kind, options, train_per_cell, seed)
        memory = index.memory_bytes()
        done = set()
        for search in setting.get("search") or [{}]:
            search = dict(search)
            if "nprobe" in search:
                search["nprobe"] = min(search["nprobe"], index.params["nlist"])
            index.set_search_params(**search)
            params = {key: index.params[key] for key in SEARCH_PARAMS}
            if kind in ("flat", "binary_flat"):
                params = dict.fromkeys(SEARCH_PARAMS)
            elif kind == "hnsw":
                params |= {"nlist": None, "nprobe": None, "pq_bytes": None}
            else:
                params |= {"hnsw_m": None, "ef_search": None}
                params["pq_bytes"] = params["pq_bytes"] if kind == "ivf_pq" else None
            if tuple(params.values()) in done:
                continue
            done.add(tuple(params.values()))
            seconds, found = timed_search(index, queries, k, repeats, device)
            exact = found if exact is None else exact
            k_recall, r1 = recalls(found, exact)
            median = statistics.median(seconds)
            row = {"kind": kind, "setting": label(kind, params), "build": number} | params
            row |= {
                "train_size": trained_on,
                "build_seconds": build_seconds,
                "memory_bytes": memory,
                "bytes_per_vector": memory / len(references),
                "search_seconds": median,
                "search_seconds_all": seconds,
                "queries_per_second": len(queries) / median,
                "k": k,
                f"{k}-recall@{k}": k_recall,
                "1-recall@1": r1,
            }
            rows.append(row)
            if report is not None:
                report(row)
        del index
        gc.collect()
    return rows


def machine(device) -> dict:
    """The CPU model, its logical cores and the threads used (and the GPU, if any)."""
    about = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "platform": platform.platform()}
    about |= {
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    # faiss's OpenMP threads spin while they wait: on cores busy with other work, that slows
    # its small steps many times over (benchmarks/README.md); PASSIVE makes them sleep
    about["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    about["device"] = str(device)
    if str(device).startswith("cuda"):
        about["gpu"] = torch.cuda.get_device_name()
    return about


HEADER = (
    f"{'kind':<12} {'setting':<18} {'build s':>8} {'memory MB':>10} {'B/vector':>9} "
    f"{'queries/s':>10} {'k-recall@k':>10} {'1-recall@1':>10}"
)


def table_row(row: dict) -> str:
    recall = row[f"{row['k']}-recall@{row['k']}"]
    return (
        f"{row['kind']:<12} {row['setting']:<18} {row['build_seconds']:8.2f} "
        f"{row['memory_bytes'] / 2**20:10.1f} {row['bytes_per_vector']:9.1f} "
        f"{row['queries_per_second']:10.0f} {recall:10.3f} "
        f"{row['1-recall@1']:10.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embeddings", type=Path, help="(N, D) float .npy (default: synthetic)")
    parser.add_argument(
        "--references", type=int,
        help="reference count (default: 100,000 synthetic; with --embeddings all rows not taken "
        "as queries, grown with noisy copies when larger)",
    )  # fmt: skip
    parser.add_argument("--queries", type=int, default=1000, help="queries taken out of the data")
    parser.add_argument("--dim", type=int, default=128, help="synthetic embedding size")
    parser.add_argument("--noise", type=float, default=1.1, help="synthetic spread around centres")
    parser.add_argument(
        "--copy-noise", type=float, default=1.0,
        help="noise of the copies, relative to the typical nearest-neighbour distance",
    )  # fmt: skip
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (k-recall@k)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="kinds to measure ('flat' always runs: the ground truth)")  # fmt: skip
    parser.add_argument(
        "--nprobe", type=int, nargs="+", default=list(NPROBES), help="IVF cells scanned"
    )
    parser.add_argument(
        "--pq-bytes", type=int, nargs="+", default=list(PQ_BYTES), help="IVF-PQ code bytes"
    )
    parser.add_argument(
        "--ef-search", type=int, nargs="+", default=list(EF_SEARCHES), help="HNSW candidates"
    )
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph neighbours per node")
    parser.add_argument("--nlist", type=int, help="IVF cells (default: sqrt(N), at most N / 39)")
    parser.add_argument(
        "--train-per-cell", type=int, default=64, help="IVF k-means sample per cell"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed searches; the median counts")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for the exact kinds")
    parser.add_argument("--seed", type=int, default=0, help="data, shuffling and k-means seed")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args()
    if args.queries < 1 or args.k < 1 or args.repeats < 1:
        parser.error("--queries, --k and --repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(torch.get_num_threads())  # the same cores for both

    start = time.perf_counter()
    references, queries, data = load_data(args)
    dim, n = references.shape[1], len(references)
    if args.k > n:
        parser.error(f"--k {args.k} exceeds the {n} references")
    kinds = set(args.kinds)
    if "ivf_pq" in kinds:
        bad = [b for b in args.pq_bytes if dim % b]
        if bad:
            parser.error(f"--pq-bytes {bad} do not divide the embedding size {dim}")
        if n < 256:
            parser.error(f"ivf_pq needs at least 256 references for its codebooks, got {n}")
    settings = default_settings(
        kinds, args.nprobe, args.pq_bytes, args.ef_search, args.hnsw_m, args.nlist
    )
    about = machine(args.device)
    copies = f" ({data['noisy_copies']:,} noisy copies)" if data["noisy_copies"] else ""
    print(
        f"{data['source']} data: {len(queries):,} queries against {n:,} references{copies}, "
        f"{dim} dimensions, cosine, k={args.k}; {about['cpu']}, {about['torch_threads']} threads"
        f", faiss {faiss.__version__}, torch {torch.__version__}"
    )
    print(HEADER)
    rows = speed_recall(
        references, queries, args.k, settings, args.repeats, args.train_per_cell, args.device,
        args.seed, report=lambda row: print(table_row(row), flush=True),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    print(f"{seconds:.0f} s in all")
    if args.json:
        results = {
            "benchmark": "index_speed",
            "data": data,
            "k": args.k,
            "metric": "cosine",
            "repeats": args.repeats,
            "train_per_cell": args.train_per_cell,
            "seed": args.seed,
            "settings": settings,
            "machine": about,
            "versions": {
                "python": platform.python_version(),
                "numpy": np.__version__,
                "torch": torch.__version__,
                "faiss": faiss.__version__,
                "utils_cv": utils_cv.__version__,
            },  # fmt: skip
            "command": sys.argv[1:],
            "total_seconds": seconds,
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
