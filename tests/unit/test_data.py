"""ImageData, the class split and the loaders (emoji, ImageFolder, Fashion-MNIST)."""

from __future__ import annotations

import csv
import gzip
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from utils_cv.similarity.datasets import ImageData, class_split, emoji, fashion_mnist, image_folder


def _toy(n=6):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return ImageData(
        images=images,
        labels=torch.tensor([3, 3, 1, 1, 0, 0][:n]),
        class_names=["a", "b", "c", "d"],
        splits=["train", "train", "val", "val", "test", "test"][:n],
        domains=["x", "y"] * (n // 2),
        paths=[f"p{i}" for i in range(n)],
    )


# ImageData


def test_subset_by_mask_indices_and_tensor():
    toy = _toy()
    by_mask = toy.subset([True, False, True, False, False, True])
    by_list = toy.subset([0, 2, 5])
    by_tensor = toy.subset(torch.tensor([0, 2, 5]))
    for part in (by_mask, by_list, by_tensor):
        assert part.images[:, 0, 0, 0].tolist() == [0, 2, 5]
        assert part.labels.tolist() == [3, 1, 0]
        assert part.paths == ["p0", "p2", "p5"]
        assert part.splits == ["train", "val", "test"]
        assert part.domains == ["x", "x", "y"]
        assert part.class_names == toy.class_names
    with pytest.raises(ValueError, match="bool mask"):
        toy.subset([True, False])


def test_split_relabel_num_classes():
    toy = _toy()
    val = toy.split("val")
    assert val.paths == ["p2", "p3"] and val.num_classes == 1
    relabelled = toy.relabel()
    assert relabelled.class_names == ["a", "b", "d"]
    assert relabelled.labels.tolist() == [2, 2, 1, 1, 0, 0]
    assert [relabelled.class_names[i] for i in relabelled.labels] == [
        toy.class_names[i] for i in toy.labels
    ]
    assert toy.num_classes == 3 and len(toy) == 6
    with pytest.raises(ValueError, match="split 'valid' unknown"):
        toy.split("valid")


def test_to_moves_tensors_and_keeps_lists():
    toy = _toy()
    moved = toy.to(torch.device("meta"))
    assert moved.images.device.type == "meta" and moved.labels.device.type == "meta"
    assert moved.paths == toy.paths and moved.images is not toy.images
    assert toy.images.device.type == "cpu"


def test_image_data_validates_fields():
    toy = _toy()
    with pytest.raises(ValueError, match="lengths"):
        ImageData(toy.images, toy.labels, toy.class_names, toy.splits[:-1], toy.domains, toy.paths)
    with pytest.raises(ValueError, match="uint8"):
        ImageData(
            toy.images.float(), toy.labels, toy.class_names, toy.splits, toy.domains, toy.paths
        )
    with pytest.raises(ValueError, match="index class_names"):
        ImageData(toy.images, toy.labels + 1, toy.class_names, toy.splits, toy.domains, toy.paths)


# class_split


def test_class_split_known_answers_never_change():
    # Fixed by sha256: the same on every machine and Python version (hash() is salted).
    names = ["grinning face", "flag US", "apple", "Black-footed Albatross", "keycap digit one"]
    assert [class_split(n) for n in names] == ["test", "val", "test", "test", "train"]


def test_class_split_proportions_and_edges():
    names = [f"class {i}" for i in range(20000)]
    splits = [class_split(n) for n in names]
    test_share = splits.count("test") / len(splits)
    val_share = splits.count("val") / (len(splits) - splits.count("test"))
    assert abs(test_share - 0.5) < 0.02 and abs(val_share - 0.2) < 0.02
    assert {class_split(n, test_fraction=0.0, val_fraction=0.0) for n in names[:200]} == {"train"}
    assert {class_split(n, test_fraction=1.0) for n in names[:200]} == {"test"}
    # Lowering test_fraction moves classes from test to train/val, never between train and val.
    for name in names[:2000]:
        small = class_split(name, test_fraction=0.3)
        if class_split(name) != "test":
            assert small == class_split(name)
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        class_split("a", val_fraction=1.5)


# load_emoji


def _fonts_missing() -> str:
    try:
        emoji.find_fonts()
    except emoji.FontNotFoundError as error:
        return str(error)
    return ""


needs_fonts = pytest.mark.skipif(bool(_fonts_missing()), reason=_fonts_missing())


@pytest.fixture(scope="module")
def emoji_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "emoji"
    emoji.build_emoji(root, max_classes=30)
    return root


@needs_fonts
def test_load_emoji_matches_manifest(emoji_root):
    loaded = emoji.load_emoji(emoji_root, image_size=32, max_classes=30)
    with open(emoji_root / "manifest.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(loaded) == len(rows) and loaded.images.shape[1:] == (3, 32, 32)
    assert loaded.images.dtype == torch.uint8
    assert [loaded.class_names[i] for i in loaded.labels] == [r["class_name"] for r in rows]
    assert loaded.domains == [r["design"] for r in rows]
    assert loaded.num_classes == 30 and set(loaded.domains) <= set(emoji.DESIGNS)
    # Train, val and test are disjoint by class.
    by_split = {s: set(loaded.split(s).labels.tolist()) for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    # Resizing is antialiased: the 32 px image is close to the 96 px file box-averaged.
    with Image.open(emoji_root / rows[0]["path"]) as image:
        reference = np.asarray(image.reduce(3), dtype=float)
    got = loaded.images[0].permute(1, 2, 0).numpy().astype(float)
    assert np.abs(got - reference).mean() < 8


@needs_fonts
def test_load_emoji_designs_and_refusals(emoji_root, tmp_path):
    colour = emoji.load_emoji(emoji_root, designs=["noto", "openmoji"], max_classes=30)
    assert set(colour.domains) == {"openmoji", "noto"}
    assert torch.bincount(colour.labels).tolist() == [2] * 30
    with pytest.raises(emoji.EmojiDataMismatchError, match="max_classes"):
        emoji.load_emoji(emoji_root)
    with pytest.raises(FileNotFoundError, match="build=True"):
        emoji.load_emoji(tmp_path / "nothing", build=False)
    with pytest.raises(ValueError, match="designs"):
        emoji.load_emoji(emoji_root, designs=["comic sans"])


@needs_fonts
def test_load_emoji_builds_missing_and_refuses_tampered(tmp_path):
    root = tmp_path / "emoji"
    first = emoji.load_emoji(root, designs=["openmoji", "noto"], max_classes=4)
    assert (root / "fingerprint.json").is_file() and len(first) == 8
    with pytest.raises(emoji.EmojiDataMismatchError, match="designs"):
        emoji.load_emoji(root, max_classes=4)
    victim = root / first.paths[0]
    Image.new("RGB", (96, 96), "white").save(victim)
    with pytest.raises(emoji.EmojiDataMismatchError, match="rebuild=True"):
        emoji.load_emoji(root, designs=["openmoji", "noto"], max_classes=4)
    rebuilt = emoji.load_emoji(root, designs=["openmoji", "noto"], max_classes=4, rebuild=True)
    assert torch.equal(rebuilt.images, first.images)


# load_image_folder


def _save(path, size=(20, 10), color=(255, 0, 0), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_load_image_folder_reports_every_problem(tmp_path):
    _save(tmp_path / "apple" / "1.png")
    _save(tmp_path / "apple" / "2.jpg", color=(0, 255, 0))
    _save(tmp_path / "apple" / "grey.png", mode="L", color=128)
    (tmp_path / "apple" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    _save(tmp_path / "banana" / "nested" / "1.png")
    _save(tmp_path / "banana" / "2.png")
    (tmp_path / "cherry").mkdir()
    _save(tmp_path / "durian" / "only.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(UserWarning) as record:
        loaded = image_folder.load_image_folder(tmp_path, image_size=8)
    message = "\n".join(str(w.message) for w in record)
    assert len(record) == 1
    assert "skipped 3 files" in message
    for part in ("corrupt.png", "notes.txt", ".DS_Store", "cherry", "durian"):
        assert part in message
    assert loaded.class_names == ["apple", "banana", "durian"]
    assert torch.bincount(loaded.labels).tolist() == [3, 2, 1]
    assert loaded.images.shape == (6, 3, 8, 8)
    grey = loaded.paths.index(str(tmp_path / "apple" / "grey.png"))
    assert loaded.images[grey].unique().tolist() == [128]
    expected = [class_split(loaded.class_names[i]) for i in loaded.labels]
    assert loaded.splits == expected
    # banana/nested/1.png lies in a subfolder of its class: that subfolder is its domain.
    assert loaded.domains == ["", "", "", "", "nested", ""]


def test_load_image_folder_resizes_shorter_side_and_crops_centre(tmp_path):
    _save(tmp_path / "a" / "x.png", size=(40, 10))
    with Image.open(tmp_path / "a" / "x.png") as image:
        image.paste((0, 0, 255), (20, 0, 40, 10))  # left half red, right half blue
        image.save(tmp_path / "a" / "x.png")
    _save(tmp_path / "a" / "y.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = image_folder.load_image_folder(tmp_path, image_size=8)
    pixels = loaded.images[loaded.paths.index(str(tmp_path / "a" / "x.png"))]
    # 40x10 -> 32x8, centre crop keeps x = 12..19 of 32: red on the left, blue on the right.
    assert pixels[:, 4, 0].tolist() == [255, 0, 0]
    assert pixels[:, 4, 7].tolist() == [0, 0, 255]


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder.load_image_folder(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=r"(?s)no readable images.*readme.md"):
        image_folder.load_image_folder(tmp_path)


# load_fashion_mnist


def _write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


@pytest.fixture
def tiny_fashion(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(5, 28, 28))
    test = rng.integers(0, 256, size=(3, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte", train, compress=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 9]), compress=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test, compress=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([4, 5, 6]), compress=False)
    return tmp_path, np.concatenate([train, test])


def test_load_fashion_mnist_tiny(tiny_fashion):
    root, pixels = tiny_fashion
    loaded = fashion_mnist.load_fashion_mnist(root)
    assert loaded.images.shape == (8, 3, 28, 28)
    assert torch.equal(loaded.images[:, 0], torch.from_numpy(pixels.astype(np.uint8)))
    assert torch.equal(loaded.images[:, 0], loaded.images[:, 2])
    assert loaded.labels.tolist() == [0, 1, 2, 3, 9, 4, 5, 6]
    assert loaded.splits == ["train"] * 5 + ["test"] * 3
    assert loaded.class_names[9] == "Ankle boot"
    resized = fashion_mnist.load_fashion_mnist(root, image_size=14)
    assert resized.images.shape == (8, 3, 14, 14)
    # Antialiased: each output pixel is close to the mean of its 2x2 block.
    blocks = pixels.reshape(8, 14, 2, 14, 2).mean(axis=(2, 4))
    assert np.abs(resized.images[:, 0].numpy() - blocks).mean() < 20


def test_load_fashion_mnist_errors(tmp_path, tiny_fashion):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load_fashion_mnist(tmp_path / "nowhere")
    root, _ = tiny_fashion
    (root / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x03garbage")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        fashion_mnist.load_fashion_mnist(root)


@pytest.mark.skipif(
    not fashion_mnist.FASHION_MNIST_DEBIAN.is_dir(), reason="dataset-fashion-mnist missing"
)
def test_load_fashion_mnist_debian_copy():
    loaded = fashion_mnist.load_fashion_mnist()
    assert loaded.splits.count("train") == 60000 and loaded.splits.count("test") == 10000
    assert torch.bincount(loaded.labels).tolist() == [7000] * 10


def test_example_queries_are_fixed_have_partners_and_match_the_domain():
    from utils_cv.similarity.datasets import ImageData, example_queries

    labels = torch.tensor([0, 0, 1, 2, 2, 3, 3, 3])
    domains = ["a", "b", "a", "a", "b", "a", "b", "a"]
    data = ImageData(
        images=torch.zeros(8, 3, 4, 4, dtype=torch.uint8),
        labels=labels,
        class_names=["w", "x", "y", "z"],
        splits=["test"] * 8,
        domains=domains,
        paths=[""] * 8,
    )
    chosen = example_queries(data, count=3, domain="a")
    # Index 2 (class x) has no partner; only domain "a" images qualify.
    assert len(set(chosen)) == 3 and set(chosen) <= {0, 3, 5, 7}
    assert 2 not in chosen and all(domains[i] == "a" for i in chosen)
    assert chosen == example_queries(data, count=3, domain="a")
    assert example_queries(data, count=2, domain="a") == chosen[:2]
    with pytest.raises(ValueError, match="count=9"):
        example_queries(data, count=9, domain="a")
