"""Binary codes and exact Hamming search.

Binarization keeps one bit per dimension: the sign of the final embedding (bit = value > 0).
The bits are packed eight to a byte, so 2048 bits take 256 bytes, the memory of 64 float32
values: 32 times less than the float embedding. The distance between two codes is the Hamming
distance, the number of bits in which they differ. Between {0, 1} vectors the squared Euclidean
distance is exactly that number, so a float search on the unpacked bits ranks like a Hamming
search; both break ties by reference index (see `search._smallest`), so they agree exactly.

Bit order: bit j of a row is bit j % 8 of byte j // 8, counted from the least significant bit
(numpy's `packbits(..., bitorder="little")`). faiss's `fvecs2bitvecs` packs in the same order,
though it sets a bit for values >= 0 where this module takes > 0. The order does not change any
distance, as long as every code is packed the same way: XOR and popcount work bit by bit.

Hamming distances and the k nearest codes (`hamming_distances`, `hamming_neighbors`, importable
from here) are computed in `search.py`, which says how and why, with its measurements.
"""

import numpy as np
import torch

from utils_cv.similarity.search import _as_codes, _unpack, hamming_distances, hamming_neighbors

__all__ = ["binarize", "hamming_distances", "hamming_neighbors", "unpack_bits"]


def binarize(embeddings) -> np.ndarray:
    """Pack the signs of embeddings into bits: bit j of a row is 1 when its value j is > 0.

    Args:
        embeddings: (N, D) float, torch tensor (on any device) or numpy array.

    Returns:
        codes: (N, ceil(D / 8)) uint8 numpy array. Bit j of a row is bit j % 8 of byte j // 8,
        least significant first (see the module docstring); the unused bits of the last byte
        are 0, so they add nothing to any Hamming distance.

    A value of exactly 0 gives bit 0, like a negative one. The codes are numpy arrays because
    they are what gets stored and what faiss's binary indexes take; to search them on a GPU,
    `torch.from_numpy(codes).cuda()`.
    """
    x = torch.as_tensor(embeddings)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"embeddings must be a non-empty (N, D) array; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"embeddings must be float to binarize; got {x.dtype}")
    bad_rows = (~torch.isfinite(x).all(dim=1)).nonzero().flatten()
    if len(bad_rows) > 0:
        raise ValueError(
            f"embeddings has {len(bad_rows)} of {len(x)} rows with NaN or inf values "
            f"(first rows: {bad_rows[:5].tolist()}); a NaN would silently become bit 0: "
            "check the training loss and learning rate"
        )
    return np.packbits((x > 0).cpu().numpy(), axis=1, bitorder="little")


def unpack_bits(codes, dim: int):
    """The bits of packed codes as (N, dim) uint8 0s and 1s: the inverse of `binarize`'s packing.

    Args:
        codes: (N, ceil(dim / 8)) uint8, numpy array or torch tensor.
        dim: bits per code, the D of the embeddings the codes were made from.

    Returns:
        (N, dim) uint8 of the same kind as `codes` (a tensor stays on its device). The padding
        bits of the last byte are dropped.
    """
    x = _as_codes(codes, "codes")
    if dim < 1 or x.shape[1] != -(-dim // 8):
        raise ValueError(
            f"codes have {x.shape[1]} bytes per row, which hold {8 * x.shape[1] - 7} to "
            f"{8 * x.shape[1]} bits, but dim={dim}; pass the size of the embeddings they come from"
        )
    bits = _unpack(x)[:, :dim]
    return bits if isinstance(codes, torch.Tensor) else bits.numpy()
