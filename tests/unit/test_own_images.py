"""Your own images: loading as a person expects, domains, DATASET by name, the cache guard."""

from __future__ import annotations

import gzip
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tests.image_folders import snapshot, write_image_folder
from utils_cv.similarity.datasets import (
    ImageData,
    by_name,
    cache_dir,
    cross_domain_pair,
    cross_domain_views,
    example_queries,
    load_dataset,
    load_image_folder,
    split_summary,
    to_rgb,
)

RED = (255, 0, 0)


def pixels(image: Image.Image) -> list:
    return np.asarray(image).reshape(-1, 3).tolist()


# --- to_rgb ---------------------------------------------------------------------------------


def test_transparent_pixels_are_composited_onto_the_background():
    rgba = Image.new("RGBA", (2, 1), (*RED, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # invisible blue
    assert pixels(to_rgb(rgba)) == [list(RED), [255, 255, 255]]
    assert pixels(to_rgb(rgba, background=(0, 128, 0))) == [list(RED), [0, 128, 0]]
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))  # half-transparent black on white
    assert pixels(to_rgb(half)) == [[127, 127, 127]]
    grey_alpha = Image.new("LA", (1, 1), (10, 0))
    assert pixels(to_rgb(grey_alpha)) == [[255, 255, 255]]


def test_palette_and_grey_images_with_a_transparent_colour():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    palette.putpixel((0, 0), 1)  # red
    palette.putpixel((1, 0), 0)  # black, the transparent colour
    palette.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning about palette transparency
        assert pixels(to_rgb(palette)) == [list(RED), [255, 255, 255]]
    grey = Image.new("L", (1, 1), 0)
    grey.info["transparency"] = 0
    assert pixels(to_rgb(grey)) == [[255, 255, 255]]


def test_cmyk_and_sixteen_bit_images_convert_to_what_they_show():
    assert pixels(to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))) == [list(RED)]
    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert [p[0] for p in pixels(to_rgb(sixteen))] == [0, 128, 255]
    wide = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))  # mode "I"
    assert [p[0] for p in pixels(to_rgb(wide))] == [0, 128, 255]
    eight_in_i = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert [p[0] for p in pixels(to_rgb(eight_in_i))] == [0, 100, 255]


def test_exif_orientation_is_applied(tmp_path):
    # A 4 x 2 image stored sideways; EXIF orientation 6 says "rotate 90 degrees to view".
    array = np.zeros((2, 4, 3), np.uint8)
    array[:, 0] = RED  # the stored left column
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "photo.jpg") as image:
        upright = np.asarray(to_rgb(image))
    assert upright.shape == (4, 2, 3)  # portrait, as the camera meant it
    # red on top (JPEG's chroma blur softens the edge)
    assert upright[0, :, 0].mean() > upright[-1, :, 0].mean() + 100


# --- load_image_folder: domains and formats -------------------------------------------------


def test_domains_come_from_the_subfolders_of_a_class(tmp_path):
    for path in ["cat/studio/a.png", "cat/studio/b.png", "cat/phone/c.png", "cat/d.png",
                 "dog/phone/deeper/e.png"]:  # fmt: skip
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), RED).save(tmp_path / path)
    data = load_image_folder(tmp_path, image_size=8)
    found = dict(zip([p.split(str(tmp_path))[1] for p in data.paths], data.domains, strict=True))
    assert found == {
        "/cat/d.png": "",
        "/cat/phone/c.png": "phone",
        "/cat/studio/a.png": "studio",
        "/cat/studio/b.png": "studio",
        "/dog/phone/deeper/e.png": "phone",  # deeper folders keep the first level's domain
    }


def test_a_users_folder_loads_with_transparency_on_the_chosen_background(tmp_path):
    folder = write_image_folder(tmp_path / "mine", classes=3, per_domain=2)
    before = snapshot(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        white = load_image_folder(folder, image_size=24)
        black = load_image_folder(folder, image_size=24, background=(0, 0, 0))
    assert snapshot(folder) == before  # read, never written
    assert set(white.domains) == {"light", "dark"} and white.num_classes == 3
    rgba = [i for i, path in enumerate(white.paths) if path.endswith("rgba.png")]
    assert rgba, "the fixture writes RGBA files"
    # The transparent top band shows the background; the rest of the image is unchanged.
    assert (white.images[rgba, :, :4] == 255).all() and (black.images[rgba, :, :4] == 0).all()
    assert torch.equal(white.images[rgba, :, 8:], black.images[rgba, :, 8:])


# --- example queries and the cross-domain pair ----------------------------------------------


def toy(labels, domains) -> ImageData:
    n = len(labels)
    return ImageData(
        images=torch.zeros(n, 3, 2, 2, dtype=torch.uint8),
        labels=torch.tensor(labels),
        class_names=[f"class {i}" for i in range(max(labels) + 1)],
        splits=["test"] * n,
        domains=domains,
        paths=[""] * n,
    )


def test_example_queries_never_repeat_a_class():
    # Class 0 has many images: without the rule, several queries could come from it.
    data = toy([0] * 6 + [1, 1, 2, 2, 3, 3], [""] * 12)
    for domain in (None, "auto"):
        chosen = example_queries(data, count=4, domain=domain)
        assert sorted(data.labels[chosen].tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="only 4 classes"):
        example_queries(data, count=5, domain=None)


def test_the_cross_domain_pair_is_the_two_largest_domains():
    assert cross_domain_pair(toy([0, 0, 1], ["", "", ""])) is None
    assert cross_domain_pair(toy([0, 0, 1], ["a", "a", ""])) is None
    # b and c both have two images: c was seen first, so it ranks before b.
    data = toy([0, 0, 0, 1, 1, 1, 1], ["c", "a", "b", "a", "b", "a", "c"])
    assert cross_domain_pair(data) == ("a", "c")
    assert cross_domain_views(data) == [("a", "c")]
    assert cross_domain_views(toy([0, 0, 1], ["", "", ""])) == []
    emoji = toy(
        [0, 0, 0, 0, 1, 1], ["openmoji", "noto", "fluent_flat", "twemoji", "openmoji", "noto"]
    )
    assert cross_domain_views(emoji) == [("openmoji", "noto"), ("fluent_flat", "twemoji")]
    # "auto" queries come from the first domain of the pair.
    assert all(data.domains[i] == "a" for i in example_queries(data, count=2))


# --- load_dataset and the cache -------------------------------------------------------------


def test_load_dataset_reads_a_folder_in_place_and_limits_it(tmp_path):
    folder = write_image_folder(tmp_path / "my icons", classes=6, per_domain=3)
    before = snapshot(folder)
    data = load_dataset(str(folder), image_size=16)
    assert (
        data.num_classes == 6 and len(data) == 36 and set(data.splits) <= {"train", "val", "test"}
    )
    few = load_dataset(folder, image_size=16, max_classes=2, max_per_class=4)
    assert few.num_classes == 2 and torch.bincount(few.labels).tolist() == [4, 4]
    assert snapshot(folder) == before


def test_an_unknown_dataset_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"DATASET='emoij'.*\['emoji', 'fashion_mnist'\]"):
        load_dataset("emoij", image_size=16)
    with pytest.raises(ValueError, match="neither a built-in dataset"):
        load_dataset(str(tmp_path / "no such folder"), image_size=16)


def test_emoji_designs_are_chosen_after_a_colon(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"unknown designs \['apple'\].*'twemoji'"):
        load_dataset("emoji:openmoji,apple", image_size=16)
    with pytest.raises(ValueError, match="unknown designs"):
        load_dataset("emoji:", image_size=16)
    # The cache gets every design, whichever are asked; only those asked are loaded.
    calls = {}
    monkeypatch.setattr(by_name, "build_emoji", lambda root, **kw: calls.setdefault("build", root))
    monkeypatch.setattr(by_name, "load_emoji", lambda root, **kw: calls.setdefault("load", kw))
    load_dataset("emoji: noto, twemoji", image_size=16, data_dir=tmp_path / "cache")
    assert calls["build"] == tmp_path / "cache" / "emoji"
    assert calls["load"] == {"image_size": 16, "designs": ["noto", "twemoji"]}


def test_the_cache_refuses_a_folder_of_someone_elses_files(tmp_path):
    users = write_image_folder(tmp_path / "my photos", classes=2, per_domain=1)
    before = snapshot(users)
    with pytest.raises(ValueError, match=r"DATA_DIR=.*my photos.*pass their folder as DATASET"):
        cache_dir(users)
    with pytest.raises(ValueError, match="DATA_DIR=.*pass their folder as DATASET"):
        load_dataset("emoji", image_size=16, data_dir=users)  # refused before any build
    assert snapshot(users) == before
    with pytest.raises(ValueError, match="is a file"):
        cache_dir(next(users.rglob("*.png")))
    fresh = cache_dir(tmp_path / "new cache")
    assert (fresh / by_name.CACHE_MARKER).exists()
    (fresh / "emoji").mkdir()
    assert cache_dir(fresh) == fresh  # marked: accepted with its contents
    assert cache_dir(None) == by_name.DATA_DIR


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_by_name_is_a_balanced_closed_set_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(by_name, "FASHION_MNIST_DEBIAN", tmp_path / "not installed")
    monkeypatch.setattr(by_name, "FASHION_MNIST_PER_CLASS", (3, 1, 2))
    folder = cache_dir(tmp_path / "cache") / "fashion_mnist"  # a cache this project made
    folder.mkdir()
    rng = np.random.default_rng(0)
    # Official training images are dark (< 128), official test images bright (>= 128).
    for prefix, per_class, low in (("train", 5, 0), ("t10k", 3, 128)):
        y = np.repeat(np.arange(10), per_class)
        _write_idx(
            folder / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(low, low + 128, (len(y), 28, 28)),
        )
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    data = load_dataset("fashion_mnist", image_size=28, data_dir=tmp_path / "cache")
    for split, count in (("train", 3), ("val", 1), ("test", 2)):
        assert torch.bincount(data.split(split).labels).tolist() == [count] * 10
    # train and val come from the official training images, test from the official test ones
    assert data.split("train").images.max() < 128 and data.split("val").images.max() < 128
    assert data.split("test").images.min() >= 128
    train_images = {bytes(image.flatten().tolist()) for image in data.split("train").images}
    assert not any(bytes(im.flatten().tolist()) in train_images for im in data.split("val").images)
    again = load_dataset("fashion_mnist", image_size=28, data_dir=tmp_path / "cache")
    assert torch.equal(again.images, data.images)  # the subset is seeded


def test_split_summary_says_whether_the_test_classes_are_new():
    open_set = toy([0, 0, 1, 1, 2, 2], ["" for _ in range(6)])
    open_set = ImageData(
        **{**open_set.__dict__, "splits": ["train", "train", "val", "val", "test", "test"]}
    )
    assert split_summary(open_set) == (
        "train 2 images / 1 classes, val 2 / 1, test 2 / 1; "
        "no class in two splits: the test classes are new to the model"
    )
    closed = ImageData(**{**open_set.__dict__, "labels": torch.tensor([0, 1, 0, 1, 0, 1])})
    assert "closed set: 2 test classes are also training" in split_summary(closed)


def test_offline_the_font_designs_alone_are_built_when_only_they_are_asked(monkeypatch, tmp_path):
    from utils_cv.similarity.datasets.emoji_packages import PackageFetchError

    builds = []

    def build(root, designs=None, **kwargs):
        builds.append(designs)
        if designs is None:
            raise PackageFetchError("cannot fetch fluentui-emoji-1.3.0.tgz")

    monkeypatch.setattr(by_name, "build_emoji", build)
    monkeypatch.setattr(by_name, "load_emoji", lambda root, **kw: kw["designs"])
    with pytest.warns(UserWarning, match="font designs only"):
        load_dataset("emoji:openmoji,noto", image_size=16, data_dir=tmp_path / "a")
    assert builds == [None, ("openmoji", "noto", "symbola", "unifont")]
    with pytest.raises(PackageFetchError):  # Twemoji needs its package: no quiet substitute
        load_dataset("emoji:twemoji", image_size=16, data_dir=tmp_path / "b")
