"""The emoji designs from npm packages: fetching, reading archives, matching, drawing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils_cv.similarity.datasets import emoji_packages as ep
from utils_cv.similarity.datasets.emoji_fonts import EmojiClass

RED_CIRCLE = b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><circle cx="16" cy="16" r="8" fill="#f00"/></svg>'  # noqa: E501
WHITE_CIRCLE = RED_CIRCLE.replace(b"#f00", b"#fff")


def _tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _package(archive: Path, name: str = "demo") -> ep.NpmPackage:
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    return ep.NpmPackage(name, "1.0.0", sha, "sha512-unused")


def _fake_npm(tmp_path: Path, monkeypatch, script: str) -> None:
    """An `npm` on PATH that runs ``script`` (bash; $4 is the pack destination)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/usr/bin/env bash\n" + script)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_fetch_uses_a_cached_archive_with_the_right_checksum(tmp_path, monkeypatch):
    archive = _tgz(tmp_path / "demo-1.0.0.tgz", {"package/a.txt": b"a"})
    _fake_npm(tmp_path, monkeypatch, "exit 7\n")  # would fail if it were called
    assert ep.fetch_package(_package(archive), tmp_path) == archive


def test_fetch_runs_npm_pack_and_checks_the_checksum(tmp_path, monkeypatch):
    source = _tgz(tmp_path / "source.tgz", {"package/a.txt": b"a"})
    package = _package(source)
    _fake_npm(tmp_path, monkeypatch, f'[ "$1" = pack ] && cp {source} "$4/demo-1.0.0.tgz"\n')
    cache = tmp_path / "cache"
    path = ep.fetch_package(package, cache)
    assert path == cache / "demo-1.0.0.tgz" and path.read_bytes() == source.read_bytes()
    assert [p.name for p in cache.iterdir()] == ["demo-1.0.0.tgz"]  # no temporary left

    wrong = ep.NpmPackage("demo", "1.0.0", "0" * 64, "sha512-unused")
    with pytest.raises(ValueError, match="checksum mismatch for demo-1.0.0.tgz"):
        ep.fetch_package(wrong, tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []  # nothing saved


def _offline_registry(monkeypatch, url: str) -> None:
    monkeypatch.setattr(ep.NpmPackage, "tarball_url", property(lambda self: url))


def test_fetch_failure_names_the_file_and_the_fix(tmp_path, monkeypatch):
    _fake_npm(tmp_path, monkeypatch, "echo 'npm error code E404' >&2; exit 1\n")
    _offline_registry(monkeypatch, (tmp_path / "no such file.tgz").as_uri())
    package = ep.NpmPackage("demo", "1.0.0", "0" * 64, "sha512-unused")
    with pytest.raises(ep.PackageFetchError) as error:
        ep.fetch_package(package, tmp_path / "cache")
    message = str(error.value)
    assert "E404" in message and "demo-1.0.0.tgz" in message and "0" * 64 in message
    assert "downloading file://" in message and "designs=FONT_DESIGNS" in message
    assert list((tmp_path / "cache").iterdir()) == []  # no temporary folder left


def test_without_npm_the_archive_is_downloaded_and_checked(tmp_path, monkeypatch):
    source = _tgz(tmp_path / "source.tgz", {"package/a.txt": b"a"})
    monkeypatch.setattr(ep.shutil, "which", lambda name: None)
    _offline_registry(monkeypatch, source.as_uri())
    path = ep.fetch_package(_package(source), tmp_path / "cache")
    assert path.read_bytes() == source.read_bytes()
    with pytest.raises(ValueError, match="checksum mismatch"):
        ep.fetch_package(ep.NpmPackage("demo", "2.0.0", "0" * 64, "-"), tmp_path / "cache")


def test_a_class_without_its_own_file_gets_no_image(tmp_path, monkeypatch):
    index = json.dumps(
        [
            {"unified": "1F34E", "non_qualified": None, "image": "1f34e.png",
             "has_img_twitter": True},
            {"unified": "1F600", "non_qualified": None, "image": "1f600.png",
             "has_img_twitter": True},  # listed, but its file is not in the archive
            {"unified": "1F350", "non_qualified": None, "image": "1f350.png",
             "has_img_twitter": False},  # a file, but marked as not Twitter's drawing
        ]
    ).encode()  # fmt: skip
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    archive = _tgz(
        tmp_path / "demo-1.0.0.tgz",
        {
            "package/emoji.json": index,
            "package/img/twitter/64/1f34e.png": png.getvalue(),
            "package/img/twitter/64/1f350.png": png.getvalue(),
        },
    )
    package = _package(archive)
    monkeypatch.setattr(ep, "TWEMOJI", package)
    monkeypatch.setitem(ep.IMAGE_DESIGNS, "twemoji", (package, "package/img/twitter/64/"))
    classes = [EmojiClass((c,), f"c{c}") for c in (0x1F34E, 0x1F600, 0x1F350, 0x1F34F)]
    sources, _ = ep.package_sources(["twemoji"], classes, tmp_path)
    assert list(sources["twemoji"]) == [(0x1F34E,)]
    drawn = list(ep.render_sources("twemoji", classes, sources["twemoji"], 32))
    assert [cls.codepoints for cls, _ in drawn] == [(0x1F34E,)] and drawn[0][1] is not None


def test_read_members_filters_by_prefix_and_skips_links(tmp_path):
    path = tmp_path / "a.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {"package/img/1.png": b"one", "package/other.txt": b"x"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("package/img/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    assert ep.read_members(path, ["package/img/"]) == {"package/img/1.png": b"one"}


def test_read_members_refuses_traversal(tmp_path):
    path = _tgz(tmp_path / "evil.tgz", {"package/img/../../evil.png": b"x"})
    with pytest.raises(ValueError, match="contains '..'"):
        ep.read_members(path, ["package/img/"])


def test_twemoji_index_maps_code_points_without_fe0f():
    index = json.dumps(
        [
            {"unified": "2764-FE0F", "non_qualified": "2764", "image": "2764-fe0f.png",
             "has_img_twitter": True},
            {"unified": "1F44B", "non_qualified": None, "image": "1f44b.png",
             "has_img_twitter": True,
             "skin_variations": {"1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png",
                                           "has_img_twitter": True}}},
            {"unified": "1F600", "non_qualified": None, "image": "1f600.png",
             "has_img_twitter": False},
        ]
    ).encode()  # fmt: skip
    assert ep.twemoji_files(index) == {(0x2764,): "2764-fe0f.png", (0x1F44B,): "1f44b.png"}
    with_tones = ep.twemoji_files(index, include_skin_tones=True)
    assert with_tones[(0x1F44B, 0x1F3FB)] == "1f44b-1f3fb.png"


def test_slug_known_answers():
    assert ep.slug(":A_button_(blood_type):") == "a-button-blood-type"
    assert ep.slug(":rescue_worker’s_helmet:") == "rescue-workers-helmet"
    assert ep.slug(":piñata:") == "pinata"
    assert ep.slug(":1st_place_medal:") == "1st-place-medal"
    assert ep.slug(":keycap_#:") == "keycap-hashtag" and ep.slug(":keycap_*:") == "keycap-asterisk"


def test_fluent_files_by_cldr_name_default_tone_and_alias():
    grinning = EmojiClass((0x1F600,), "grinning face")
    waving = EmojiClass((0x1F44B,), "waving hand sign")
    hugging = EmojiClass((0x1F917,), "hugging face")  # CLDR: smiling face with open hands
    apple = EmojiClass((0x1F34E,), "red apple")
    mage = EmojiClass((0x1F9D9,), "mage")  # Fluent: person-mage, beside man- and woman-mage
    stems = {"grinning-face", "waving-hand-default", "waving-hand-light", "hugging-face",
             "person-mage-default", "man-mage-default"}  # fmt: skip
    found, shared = ep.fluent_files([grinning, waving, hugging, apple, mage], stems)
    assert found == {
        (0x1F600,): "grinning-face",
        (0x1F44B,): "waving-hand-default",
        (0x1F917,): "hugging-face",
        (0x1F9D9,): "person-mage-default",
    }
    assert shared == 0


def test_fluent_files_gives_a_shared_file_to_nobody(monkeypatch):
    names = {(1,): ":same:", (2,): ":same:", (3,): ":own:"}
    monkeypatch.setattr(ep, "_cldr_names", lambda: (names, {k: [] for k in names}))
    classes = [EmojiClass((i,), f"c{i}") for i in (1, 2, 3)]
    found, shared = ep.fluent_files(classes, {"same", "own"})
    assert found == {(3,): "own"} and shared == 2


def test_render_svg_and_png_fit_on_white_and_reject_blank():
    image = ep.render_svg(RED_CIRCLE, 48)
    pixels = np.asarray(image)
    assert image.size == (48, 48) and image.mode == "RGB"
    assert tuple(pixels[24, 24]) == (255, 0, 0) and tuple(pixels[0, 0]) == (255, 255, 255)
    # Cropped to its ink and scaled up: the circle (half the viewBox) spans the box.
    red = np.flatnonzero((pixels[24, :, 0] > 200) & (pixels[24, :, 1] < 60))
    assert red.min() <= 4 and red.max() >= 43
    assert ep.render_svg(WHITE_CIRCLE, 48) is None

    buffer = io.BytesIO()
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (16, 16, 48, 48))
    rgba.save(buffer, format="PNG")
    png = np.asarray(ep.render_png(buffer.getvalue(), 48))
    assert tuple(png[24, 24]) == (0, 0, 255) and tuple(png[1, 1]) == (255, 255, 255)
    empty = io.BytesIO()
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(empty, format="PNG")
    assert ep.render_png(empty.getvalue(), 48) is None


def test_pinned_packages_are_the_ones_documented():
    readme = (Path(__file__).parents[2] / "data" / "README.md").read_text()
    for package, _ in ep.IMAGE_DESIGNS.values():
        assert package.sha256 in readme and f"{package.name}@{package.version}" in readme
