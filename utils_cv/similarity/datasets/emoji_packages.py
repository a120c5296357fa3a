"""The emoji designs that come as image files in npm packages: Twemoji and Fluent Emoji.

- ``twemoji``: Twemoji's 64-px PNGs from npm ``emoji-datasource-twitter`` (package MIT; the
  graphics CC-BY 4.0), named by code points and listed in the package's ``emoji.json``;
- ``fluent``, ``fluent_flat``, ``fluent_high_contrast``: Microsoft's Fluent Emoji in its
  colour ("modern"), flat and high-contrast (black) styles, SVGs from npm ``fluentui-emoji``
  (MIT), named by the emoji's CLDR short name (``1st-place-medal.svg``).

Each package archive is fetched once into a cache folder by ``npm pack`` (straight from the
npm registry where npm is missing) and checked against a pinned sha256 before it is used.
Members are read from the archive in memory, by names this module builds and checks:
nothing from an archive is written to disk, so no member name can escape a folder.
An emoji gets an image of a design only when that design's file for it exists and draws
something: no fallback picture is ever put in its place.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import unicodedata as py_unicodedata
import urllib.error
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from utils_cv.common.download import check_member_name, download, sha256_file
from utils_cv.similarity.datasets.emoji_fonts import EmojiClass, fit_on_white

_VS16 = 0xFE0F


@dataclass(frozen=True)
class NpmPackage:
    """One npm package archive, pinned by version and checksum.

    sha256: of the ``.tgz`` file; integrity: npm's ``dist.integrity`` of the same file, as
    ``npm view NAME@VERSION dist.integrity`` prints it (kept to compare with the registry).
    """

    name: str
    version: str
    sha256: str
    integrity: str

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.tgz"

    @property
    def tarball_url(self) -> str:
        return f"https://registry.npmjs.org/{self.name}/-/{self.filename}"


TWEMOJI = NpmPackage(
    "emoji-datasource-twitter",
    "16.0.0",
    "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
    "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
)
FLUENT = NpmPackage(
    "fluentui-emoji",
    "1.3.0",
    "ec892e607e854859b812c7d827801756adc19955b0ef56d4ae8afcddd19492c5",
    "sha512-JTXXwqIie2rWTgOkIJDJxr0WtwTz2WU4kdOq8buLVThYwQ264aFR2jdTyuon2oEbLqqGMT64zI4btyn1saB2xw==",
)
# Design -> (package, folder of its images inside the archive).
IMAGE_DESIGNS: dict[str, tuple[NpmPackage, str]] = {
    "twemoji": (TWEMOJI, "package/img/twitter/64/"),
    "fluent": (FLUENT, "package/icons/modern/"),
    "fluent_flat": (FLUENT, "package/icons/flat/"),
    "fluent_high_contrast": (FLUENT, "package/icons/high-contrast/"),
}
TWEMOJI_INDEX = "package/emoji.json"


class PackageFetchError(RuntimeError):
    """An npm package archive the emoji build needs could not be fetched."""


def fetch_package(package: NpmPackage, folder: str | os.PathLike) -> Path:
    """The package's archive in ``folder`` (``folder/NAME-VERSION.tgz``), fetched when missing.

    A file already there is used when its sha256 matches. Otherwise ``npm pack`` fetches it
    (through your npm configuration, a registry mirror included); where npm is missing or
    fails, it is downloaded from the npm registry. The archive is moved into place only
    after its sha256 matched. Raises PackageFetchError naming the fix when neither works,
    and ValueError on a checksum mismatch (the bytes are then not used at all).
    """
    folder = Path(folder)
    path = folder / package.filename
    if path.is_file() and sha256_file(path) == package.sha256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    npm = shutil.which("npm")
    failures = [_npm_pack(npm, package, path) if npm else "npm is not installed"]
    if failures[0] is None:
        return path
    try:
        return download(package.tarball_url, path, package.sha256, timeout=120)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        failures.append(f"downloading {package.tarball_url} failed ({error})")
    raise PackageFetchError(
        f"cannot fetch {package.filename}: {'; '.join(failures)}. Check the connection to the "
        f"npm registry, or put {package.filename} (sha256 {package.sha256}, from `npm pack "
        f"{package.name}@{package.version}`) into {folder}; or build without these designs, "
        "e.g. load_emoji(designs=FONT_DESIGNS)"
    )


def _npm_pack(npm: str, package: NpmPackage, path: Path) -> str | None:
    """``npm pack`` into ``path`` (checksum verified); None when done, else what failed."""
    spec = f"{package.name}@{package.version}"
    with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=path.parent) as tmp:
        # Short network timeouts: a stalled registry or proxy fails in minutes, not in 15.
        command = [npm, "pack", spec, "--pack-destination", tmp, "--fetch-timeout=60000",
                   "--fetch-retries=1"]  # fmt: skip
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return f"`npm pack {spec}` timed out after 300 s"
        packed = Path(tmp) / package.filename
        if result.returncode != 0 or not packed.is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            return f"`npm pack {spec}` failed ({' / '.join(detail)})"
        digest = sha256_file(packed)
        if digest != package.sha256:
            raise ValueError(
                f"checksum mismatch for {package.filename}: sha256 {digest}, expected "
                f"{package.sha256}; it was not saved to {path}. The registry served other "
                "bytes for this version: do not use them."
            )
        os.replace(packed, path)
    return None


def read_members(archive: str | os.PathLike, prefixes: Iterable[str]) -> dict[str, bytes]:
    """The regular files of a .tgz whose names start with one of ``prefixes``, in memory.

    Names are checked as for an extraction (no absolute path, no ``..``); links, devices
    and folders are skipped. Returns {member name: bytes}.
    """
    archive, prefixes = Path(archive), tuple(prefixes)
    members = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.startswith(prefixes):
                name = check_member_name(member.name, archive)
                members[name] = tar.extractfile(member).read()
    return members


def _codepoints(hex_sequence: str) -> tuple[int, ...]:
    return tuple(c for c in (int(h, 16) for h in hex_sequence.split("-")) if c != _VS16)


def twemoji_files(index: bytes, include_skin_tones: bool = False) -> dict[tuple[int, ...], str]:
    """Code points (without U+FE0F) -> Twemoji image file name, from the package's emoji.json.

    Only emoji the index marks as drawn by Twitter (``has_img_twitter``); the fully
    qualified and the unqualified forms both map to the one file.
    """
    files: dict[tuple[int, ...], str] = {}
    entries = json.loads(index)
    variations = [
        variation
        for entry in entries
        if include_skin_tones
        for variation in (entry.get("skin_variations") or {}).values()
    ]
    for entry in [*entries, *variations]:
        if not entry.get("has_img_twitter"):
            continue
        for key in (entry.get("unified"), entry.get("non_qualified")):
            if key:
                files.setdefault(_codepoints(key), entry["image"])
    return files


def slug(name: str) -> str:
    """A CLDR short name as Fluent Emoji's file names spell it.

    ":A_button_(blood_type):" -> "a-button-blood-type", "rescue worker's helmet" ->
    "rescue-workers-helmet", "piñata" -> "pinata", ":keycap_#:" -> "keycap-hashtag".
    """
    name = name.strip(":").lower().replace("’", "").replace("'", "")
    name = name.replace("#", " hashtag ").replace("*", " asterisk ")
    name = py_unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


@functools.cache
def _cldr_names() -> tuple[dict[tuple[int, ...], str], dict[tuple[int, ...], list[str]]]:
    """(CLDR short name, other aliases) by code points, from the PyPI package ``emoji``.

    Cached: the three Fluent styles of one build all match against it.
    """
    import emoji

    names: dict[tuple[int, ...], str] = {}
    aliases: dict[tuple[int, ...], list[str]] = {}
    for text, data in emoji.EMOJI_DATA.items():
        codepoints = tuple(ord(c) for c in text if ord(c) != _VS16)
        names.setdefault(codepoints, data["en"])
        aliases.setdefault(codepoints, []).extend(data.get("alias", []))
    return names, aliases


def fluent_files(
    classes: Sequence[EmojiClass], stems: Iterable[str]
) -> tuple[dict[tuple[int, ...], str], int]:
    """Code points -> Fluent Emoji file stem, for the classes one of ``stems`` names.

    A class matches the file named by its CLDR short name (``slug``), or that name plus
    "-default" (the yellow one of an emoji with skin tones), each also with "person-"
    before it (Fluent's name for the gender-neutral form: "mage" is ``person-mage``);
    failing these, by one of its other aliases in the ``emoji`` package. A "person-" name
    or an alias that is some other emoji's CLDR name is never used. A file two classes
    would share is given to neither. Skin-tone variants find no file (Fluent names them by
    tone, not by code point). Returns (matches, number of classes left out because their
    file was shared).
    """
    stems = set(stems)
    names, aliases = _cldr_names()
    cldr_slugs = {slug(name) for name in names.values()}
    wanted: dict[tuple[int, ...], str] = {}
    for cls in classes:
        name = names.get(cls.codepoints)
        if name is None:
            continue
        own = slug(name)
        person = f"person-{own}"
        candidates = [own] + [person] * (person not in cldr_slugs)
        candidates += [slug(a) for a in aliases[cls.codepoints] if slug(a) not in cldr_slugs]
        for candidate in candidates:
            stem = next((s for s in (candidate, f"{candidate}-default") if s in stems), None)
            if stem is not None:
                wanted[cls.codepoints] = stem
                break
    uses = Counter(wanted.values())
    shared = sum(uses[stem] > 1 for stem in wanted.values())
    return {cp: stem for cp, stem in wanted.items() if uses[stem] == 1}, shared


def render_svg(data: bytes, image_size: int) -> Image.Image | None:
    """An SVG drawn at twice ``image_size`` (resvg), fitted on white as the fonts are.

    System fonts are not loaded, so the drawing does not depend on the machine.
    """
    import resvg_py

    png = resvg_py.svg_to_bytes(
        svg_string=data.decode("utf-8"), width=2 * image_size, skip_system_fonts=True
    )
    with Image.open(io.BytesIO(bytes(png))) as image:
        return fit_on_white(image, image_size)


def render_png(data: bytes, image_size: int) -> Image.Image | None:
    """A PNG fitted on white (transparency composited) as the fonts are."""
    with Image.open(io.BytesIO(data)) as image:
        return fit_on_white(image, image_size)


def package_sources(
    designs: Sequence[str],
    classes: Sequence[EmojiClass],
    folder: str | os.PathLike,
    include_skin_tones: bool = False,
) -> tuple[dict[str, dict[tuple[int, ...], bytes]], dict[str, int]]:
    """The file of every class in each of ``designs`` (keys of IMAGE_DESIGNS), as bytes.

    folder: where the package archives are cached (fetched there when missing).
    Returns ({design: {code points: file bytes}}, skipped counts by reason).
    """
    sources: dict[str, dict[tuple[int, ...], bytes]] = {}
    skipped: dict[str, int] = {}
    for package in dict.fromkeys(IMAGE_DESIGNS[d][0] for d in designs):
        mine = [d for d in designs if IMAGE_DESIGNS[d][0] == package]
        prefixes = [IMAGE_DESIGNS[d][1] for d in mine]
        if package == TWEMOJI:
            prefixes.append(TWEMOJI_INDEX)
        members = read_members(fetch_package(package, folder), prefixes)
        for design in mine:
            prefix = IMAGE_DESIGNS[design][1]
            if package == TWEMOJI:
                found = twemoji_files(members[TWEMOJI_INDEX], include_skin_tones)
                files = {cp: prefix + name for cp, name in found.items()}
            else:
                stems = {n[len(prefix) : -len(".svg")] for n in members if n.startswith(prefix)}
                found, shared = fluent_files(classes, stems)
                files = {cp: f"{prefix}{stem}.svg" for cp, stem in found.items()}
                if shared:
                    skipped[f"shared_file_{design}"] = shared
            sources[design] = {
                cls.codepoints: members[files[cls.codepoints]]
                for cls in classes
                if files.get(cls.codepoints) in members
            }
    return sources, skipped


def render_sources(
    design: str, classes: Sequence[EmojiClass], sources: Mapping[tuple[int, ...], bytes], size: int
) -> Iterator[tuple[EmojiClass, Image.Image | None]]:
    """(class, image or None where blank) for every class that has a file in ``sources``."""
    render = render_png if design == "twemoji" else render_svg
    for cls in classes:
        if cls.codepoints in sources:
            yield cls, render(sources[cls.codepoints], size)


def versions() -> dict[str, str]:
    """Versions of what draws and names these designs, for fingerprint.json."""
    from importlib.metadata import version

    return {"resvg_py": version("resvg-py"), "emoji": version("emoji")}
