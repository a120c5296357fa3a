"""Pack the built-in data small enough for a GPU machine's 64 MiB carry, and unpack it there.

    python .ci/gpu_data.py pack .gpu      # here, from the project's environment
    python .ci/gpu_data.py wheels DIR .gpu/wheels.tar.xz   # here: DIR's wheels in one archive
    python .ci/gpu_data.py unpack .gpu    # there, before the notebooks run (by .gpu/run)

Developer tool for .ci/gpu-bundle; see that script for what travels and why.
"""

from __future__ import annotations

import csv
import gzip
import json
import lzma
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 64  # the GPU presets' image size


def pack(target: Path) -> None:
    from utils_cv.similarity.datasets import by_name
    from utils_cv.similarity.datasets.emoji import build_emoji
    from utils_cv.similarity.datasets.fashion_mnist import FASHION_MNIST_DEBIAN

    out = target / "emoji"
    if not (out / "pixels.xz").exists():
        with tempfile.TemporaryDirectory() as tmp:
            built = Path(tmp) / "emoji"
            build_emoji(built, image_size=SIZE, packages=ROOT / "data" / "npm")
            out.mkdir(parents=True, exist_ok=True)
            for name in ("manifest.csv", "fingerprint.json"):
                shutil.copy(built / name, out / name)
            with open(built / "manifest.csv", newline="", encoding="utf-8") as file:
                paths = [row["path"] for row in csv.DictReader(file)]
            pixels = np.stack([np.asarray(Image.open(built / p).convert("RGB")) for p in paths])
            (out / "pixels.xz").write_bytes(lzma.compress(pixels.tobytes(), preset=6))
    # Fashion-MNIST with the images the built-in view does not pick set to zero.
    fashion = target / "fashion_mnist"
    fashion.mkdir(parents=True, exist_ok=True)
    full = by_name.load_fashion_mnist()
    picked = np.zeros(len(full.labels), dtype=bool)
    picked[by_name.fashion_mnist_picks(full)[0]] = True
    official = np.array(full.splits)
    for prefix, split in (("train", "train"), ("t10k", "test")):
        for kind, dim in (("images", 3), ("labels", 1)):
            name = f"{prefix}-{kind}-idx{dim}-ubyte"
            raw = gzip.decompress((FASHION_MNIST_DEBIAN / f"{name}.gz").read_bytes())
            if kind == "images":  # a 16-byte header, then 28 x 28 bytes per image
                images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28 * 28).copy()
                images[~picked[official == split]] = 0
                raw = raw[:16] + images.tobytes()
            (fashion / f"{name}.gz").write_bytes(gzip.compress(raw, mtime=0))
    # The check: the view of the zeroed copy equals the view of the full one.
    original = by_name._fashion_mnist_view(Path(tempfile.gettempdir()), SIZE)
    saved = by_name.FASHION_MNIST_DEBIAN
    try:
        by_name.FASHION_MNIST_DEBIAN = Path("/nonexistent")
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(fashion, Path(tmp) / "fashion_mnist")
            copy = by_name._fashion_mnist_view(Path(tmp), SIZE)
    finally:
        by_name.FASHION_MNIST_DEBIAN = saved
    assert (original.images == copy.images).all() and (original.labels == copy.labels).all()
    assert original.splits == copy.splits
    print(f"packed {out} and {fashion}; the Fashion-MNIST view is unchanged")


def pack_wheels(source: Path, target: Path) -> None:
    """Every wheel in ``source``, re-zipped without compression, in one xz-compressed tar:
    xz packs the binaries about twice as tight as the wheels' own deflate (faiss-cpu's 18.8
    MB wheel becomes 9.4 MB), which makes room for the ImageNet weights within 64 MiB. The
    wheels stay valid: their RECORD hashes are of the files, not of the compressed bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        for wheel in sorted(source.glob("*.whl")):
            with (
                zipfile.ZipFile(wheel) as zin,
                zipfile.ZipFile(Path(tmp) / wheel.name, "w") as zout,
            ):
                for info in zin.infolist():
                    zout.writestr(info, zin.read(info), compress_type=zipfile.ZIP_STORED)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(target, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
            for wheel in sorted(Path(tmp).glob("*.whl")):
                tar.add(wheel, arcname=wheel.name)
    print(
        f"packed {len(list(source.glob('*.whl')))} wheels into {target}: {target.stat().st_size / 1e6:.1f} MB"
    )


def unpack(source: Path) -> None:
    from utils_cv.similarity.datasets.emoji import fingerprint

    data = ROOT / "data"
    emoji = data / "emoji"
    if not (emoji / "manifest.csv").exists():
        with open(source / "emoji" / "manifest.csv", newline="", encoding="utf-8") as file:
            paths = [row["path"] for row in csv.DictReader(file)]
        pixels = np.frombuffer(
            lzma.decompress((source / "emoji" / "pixels.xz").read_bytes()), dtype=np.uint8
        ).reshape(len(paths), SIZE, SIZE, 3)
        for path, image in zip(paths, pixels, strict=True):
            (emoji / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(emoji / path)
        shutil.copy(source / "emoji" / "manifest.csv", emoji / "manifest.csv")
        record = json.loads((source / "emoji" / "fingerprint.json").read_text())
        record["sha256"] = fingerprint(emoji)  # same pixels, this machine's PNG encoder
        (emoji / "fingerprint.json").write_text(json.dumps(record, indent=2))
    if not (data / "fashion_mnist").exists():
        shutil.copytree(source / "fashion_mnist", data / "fashion_mnist")
    print(f"data ready in {data}")


if __name__ == "__main__":
    if sys.argv[1] == "wheels":
        pack_wheels(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        {"pack": pack, "unpack": unpack}[sys.argv[1]](Path(sys.argv[2]))
