"""Draw docs/images/emoji_designs.png: three emoji classes in each of the eight designs.

python docs/images/emoji_designs.py      # reads data/emoji (built by `make data`)
"""

from __future__ import annotations

from pathlib import Path

import torch

from utils_cv.similarity.datasets import load_emoji
from utils_cv.similarity.datasets.emoji import DESIGNS
from utils_cv.similarity.plot import credit_designs, show_image_grid

CLASSES = ("red apple", "grinning face", "snowman")


def main() -> None:
    data = load_emoji(image_size=96)
    tiles, titles, shown = [], [], set()
    for name in CLASSES:
        label = data.class_names.index(name)
        for design in DESIGNS:
            found = [
                i
                for i, (lab, dom) in enumerate(zip(data.labels.tolist(), data.domains, strict=True))
                if lab == label and dom == design
            ]
            if not found:
                raise ValueError(f"{name!r} has no {design} image; pick a class every design draws")
            tiles.append(data.images[found[0]])
            titles.append(f"{name}\n{design}")
            shown.add(design)
    fig = credit_designs(show_image_grid(torch.stack(tiles), titles, ncols=len(DESIGNS)), shown)
    path = Path(__file__).with_suffix(".png")
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
