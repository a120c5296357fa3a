"""Binary search speed: exact k-NN by Hamming distance on packed bits against float32 search.

For each code size in --bits (512, 1024, 2048) this builds seeded synthetic unit embeddings of
SOP's test size (60,502 references in 11,316 classes; the queries are --queries further items of
those classes), binarizes them (`binary.binarize`), and times exact k nearest neighbours for each
k in --ks (1, 10, 100) with

    hamming       `binary.hamming_neighbors` on the codes (bits / 8 bytes per vector)
    float         `metrics.nearest_neighbors` on float32 embeddings of the same dimension
                  (bits * 4 bytes per vector)
    float16       `metrics.nearest_neighbors` on the same embeddings stored in float16 (bits * 2
                  bytes per vector); our search converts them to float32 first
    float_bytes   `metrics.nearest_neighbors` on float32 embeddings of the same memory:
                  bits / 32 dimensions
    faiss_binary  faiss IndexBinaryFlat on the same codes
    faiss_float   faiss IndexFlatIP on the same-dimension float32 embeddings

It prints memory per vector, queries per second, and the speed-up of `hamming` over `float`.
Target: on the CPU, Hamming search at least 3x faster than float search of equal dimension, in
32x less memory (METHODS "Binarization"). faiss's indexes run on the CPU (faiss-cpu) even
with --device cuda.

    python benchmarks/binary_search.py --json outputs/benchmarks/binary_search_cpu.json
    python benchmarks/binary_search.py --device cuda
    python benchmarks/binary_search.py --n 2000 --queries 200 --repeats 1   # quick check
"""

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_speed import make_data  # noqa: E402

from utils_cv.similarity.binary import binarize, hamming_neighbors  # noqa: E402
from utils_cv.similarity.metrics import nearest_neighbors  # noqa: E402

METHODS = ("hamming", "float", "float16", "float_bytes", "faiss_binary", "faiss_float")
TARGET = 3.0  # hamming over float at equal dimension, on the CPU
SOP_CLASS_SHARE = 11_316 / 60_502  # SOP's classes per image, for the synthetic data


def timed(search, device: torch.device) -> tuple[float, object]:
    """Seconds of one call to search(), and its result."""
    start = time.perf_counter()
    result = search()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def searches(bits: int, args, device: torch.device) -> dict:
    """For one code size: method -> (search(queries, k) -> (distances, indices), its queries,
    bytes per stored vector)."""
    total = args.n + args.queries
    classes = max(1, round(total * SOP_CLASS_SHARE))
    x, _ = make_data(total, bits, classes, args.noise, seed=bits)
    small, _ = make_data(total, bits // 32, classes, args.noise, seed=bits + 1)
    codes = binarize(x)
    on = {  # reference sets where "ours" searches them: on the device, as after embedding there
        "hamming": torch.from_numpy(codes[: args.n]).to(device),
        "float": torch.from_numpy(x[: args.n]).to(device),
        "float16": torch.from_numpy(x[: args.n]).to(device, torch.float16),
        "float_bytes": torch.from_numpy(small[: args.n]).to(device),
    }
    queries = {"hamming": codes[args.n :], "float": x[args.n :], "float_bytes": small[args.n :]}
    queries["float16"] = x[args.n :].astype(np.float16)
    queries = {name: torch.from_numpy(q).to(device) for name, q in queries.items()}
    binary_index = faiss.IndexBinaryFlat(bits)
    binary_index.add(codes[: args.n])
    float_index = faiss.IndexFlatIP(bits)
    float_index.add(x[: args.n])

    def hamming(query, k):
        return hamming_neighbors(query, on["hamming"], k=k, device=device)

    def float_search(name, query, k):
        return nearest_neighbors(query, on[name], k=k, device=device)

    return {
        "hamming": (hamming, queries["hamming"], bits // 8),
        "float": (partial(float_search, "float"), queries["float"], bits * 4),
        "float16": (partial(float_search, "float16"), queries["float16"], bits * 2),
        "float_bytes": (partial(float_search, "float_bytes"), queries["float_bytes"], bits // 8),
        "faiss_binary": (binary_index.search, codes[args.n :], bits // 8),
        "faiss_float": (float_index.search, x[args.n :], bits * 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (for ours; faiss: CPU)")
    parser.add_argument("--n", type=int, default=60_502, help="reference vectors (SOP test)")
    parser.add_argument("--queries", type=int, default=2000, help="query vectors")
    parser.add_argument("--bits", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--noise", type=float, default=2.2, help="spread around class centres")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median counts")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args()
    if any(b % 32 for b in args.bits):
        parser.error(f"--bits {args.bits}: each must be a multiple of 32 (float_bytes: bits / 32)")
    if max(args.ks) > args.n:
        parser.error(f"--ks {args.ks}: k cannot exceed --n {args.n}")
    device = torch.device(args.device)
    faiss.omp_set_num_threads(torch.get_num_threads())  # the same cores for both
    print(
        f"{args.queries} queries against {args.n} references; device {args.device} "
        f"({torch.cuda.get_device_name() + ', ' if device.type == 'cuda' else ''}"
        f"{torch.get_num_threads()} CPU threads), torch {torch.__version__}, "
        f"faiss {faiss.__version__}"
    )
    results = {"n": args.n, "queries": args.queries, "device": args.device, "ks": args.ks}
    results |= {"cpu_threads": torch.get_num_threads(), "rows": [], "speedup": {}}
    results["faiss_agrees"] = {}
    for bits in args.bits:
        methods = searches(bits, args, device)
        print(f"\n{bits} bits = {bits // 8} bytes per code; queries per second:")
        print(f"{'method':>13} {'bytes/vector':>12}" + "".join(f"{f'k={k}':>10}" for k in args.ks))
        distances, qps = {}, {}
        for method in METHODS:
            search, queries, _ = methods[method]
            search(queries[:8], 1)  # warm up: thread pools, CUDA kernels
        # Round-robin over the methods, so that a slow spell of a shared machine slows them
        # all alike instead of one method's every repeat.
        runs = {(method, k): [] for method in METHODS for k in args.ks}
        for _ in range(args.repeats):
            for method, k in runs:
                search, queries, _ = methods[method]
                seconds, (distances[method, k], _) = timed(partial(search, queries, k), device)
                runs[method, k].append(seconds)
        for method in METHODS:
            nbytes = methods[method][2]
            for k in args.ks:
                seconds = statistics.median(runs[method, k])
                qps[method, k] = args.queries / seconds
                results["rows"].append(
                    {"bits": bits, "method": method, "k": k, "bytes_per_vector": nbytes,
                     "seconds": seconds, "seconds_all": runs[method, k],
                     "queries_per_second": qps[method, k]}
                )  # fmt: skip
            print(
                f"{method:>13} {nbytes:>12}" + "".join(f"{qps[method, k]:10.0f}" for k in args.ks)
            )
        speedup = {str(k): qps["hamming", k] / qps["float", k] for k in args.ks}
        # the same k smallest distances (the order of ties is not compared)
        agrees = all(
            np.array_equal(np.asarray(distances["hamming", k]), distances["faiss_binary", k])
            for k in args.ks
        )
        results["speedup"][str(bits)], results["faiss_agrees"][str(bits)] = speedup, agrees
        print(
            "hamming / float: "
            + ", ".join(f"k={k} {s:.1f}x faster" for k, s in speedup.items())
            + f", 32x less memory; faiss's Hamming distances {'agree' if agrees else 'DIFFER'}"
        )
    slowest = min(s for by_k in results["speedup"].values() for s in by_k.values())
    results["target"], results["meets_target"] = TARGET, slowest >= TARGET
    print(
        f"\ntarget: hamming at least {TARGET:g}x faster than float at equal dimension: "
        f"{'met' if results['meets_target'] else 'NOT met'} (slowest {slowest:.1f}x)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
