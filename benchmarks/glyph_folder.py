"""A folder of "your own images" made from packages: characters drawn by several fonts.

docs/results.md's "From scratch or from weights" numbers need a folder that is not one of the
built-in datasets and that anyone can rebuild offline. This script draws characters (the
classes) with fonts that matplotlib ships (the domains: DejaVu Sans, Serif and Mono in
several styles, and STIX; all under free licences, see matplotlib's
``mpl-data/fonts/ttf/LICENSE_*``) into the layout ``load_image_folder`` reads::

    OUT/<U+0041 LATIN CAPITAL LETTER A>/<font>/<font>.png

Characters come from Latin, Latin-1, Latin Extended-A, lowercase Greek, arrows and math
operators (no Greek or Cyrillic capitals: they look like Latin ones). A character is kept
only when at least ``--min-fonts`` fonts have a glyph for it that draws something, and when
its drawing in the first font differs from every earlier character's; ``--max-classes``
then keeps an evenly spaced selection. Glyphs are black on white (RGB) or on a transparent
background (RGBA, every other font), centred on ``--size`` pixels at one font size.

    python benchmarks/glyph_folder.py /tmp/glyphs
    .venv/bin/papermill --cwd notebooks notebooks/00_quickstart.ipynb outputs/glyphs.ipynb \\
        -p DATASET /tmp/glyphs -p OUTPUT_DIR ../outputs/glyphs
"""

from __future__ import annotations

import argparse
import json
import unicodedata
from pathlib import Path

import matplotlib
import numpy as np
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONTS = {
    "dejavu_sans": "DejaVuSans.ttf",
    "dejavu_sans_bold_oblique": "DejaVuSans-BoldOblique.ttf",
    "dejavu_serif": "DejaVuSerif.ttf",
    "dejavu_serif_italic": "DejaVuSerif-Italic.ttf",
    "dejavu_mono": "DejaVuSansMono.ttf",
    "stix": "STIXGeneral.ttf",
}
RANGES = [
    (0x21, 0x7E),  # Basic Latin
    (0xA1, 0xFF),  # Latin-1 Supplement
    (0x100, 0x17F),  # Latin Extended-A
    (0x3B1, 0x3C9),  # Greek lowercase
    (0x2190, 0x21FF),  # Arrows
    (0x2200, 0x22FF),  # Mathematical Operators
]


def draw(font: ImageFont.FreeTypeFont, char: str, size: int) -> np.ndarray | None:
    """The glyph as a (size, size) uint8 ink mask (255 = ink), centred; None if blank.

    The font is drawn at 60 % of ``size``, so glyphs keep their relative sizes (a full stop
    stays small); only a glyph larger than 90 % of the image is scaled down to fit.
    """
    canvas = Image.new("L", (4 * size, 4 * size), 0)
    ImageDraw.Draw(canvas).text((size, size), char, font=font, fill=255)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    scale = min(1.0, 0.9 * size / max(glyph.size))
    glyph = glyph.resize(
        (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
        Image.Resampling.LANCZOS,
    )
    out = Image.new("L", (size, size), 0)
    out.paste(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
    mask = np.asarray(out)
    return mask if mask.max() > 64 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the folder to create (must not exist)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-classes", type=int, default=400)
    parser.add_argument("--min-fonts", type=int, default=4)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder")

    fonts = {}
    for name, file in FONTS.items():
        cmap = TTFont(FONT_DIR / file, lazy=True).getBestCmap()
        fonts[name] = (ImageFont.truetype(str(FONT_DIR / file), round(0.6 * args.size)), cmap)
    candidates = [chr(c) for lo, hi in RANGES for c in range(lo, hi + 1)]
    kept, seen = [], set()
    for char in candidates:
        drawings = {
            name: mask
            for name, (font, cmap) in fonts.items()
            if ord(char) in cmap and (mask := draw(font, char, args.size)) is not None
        }
        if len(drawings) < args.min_fonts:
            continue
        key = next(iter(drawings.values())).tobytes()
        if key in seen:
            continue
        seen.add(key)
        kept.append((char, drawings))
    if len(kept) > args.max_classes:
        pick = np.linspace(0, len(kept) - 1, args.max_classes).round().astype(int)
        kept = [kept[i] for i in pick]

    images = 0
    for char, drawings in kept:
        name = unicodedata.name(char, "").replace("/", " ") or "UNNAMED"
        class_dir = args.out / f"U+{ord(char):04X} {name}"
        for i, (font, mask) in enumerate(drawings.items()):
            (class_dir / font).mkdir(parents=True)
            if i % 2:  # RGBA: black ink on a transparent background
                rgba = np.zeros((*mask.shape, 4), np.uint8)
                rgba[..., 3] = mask
                image = Image.fromarray(rgba, "RGBA")
            else:
                image = Image.fromarray(255 - mask, "L").convert("RGB")
            image.save(class_dir / font / f"{font}.png")
            images += 1
    summary = {"folder": str(args.out), "classes": len(kept), "images": images,
               "fonts": list(FONTS), "size": args.size}  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
