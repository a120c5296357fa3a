"""Every bad input of DESIGN.md's Reliability list (and a few more), as one table.

Each row makes one mistake a user makes and checks the message: it must name the file or
the parameter at fault, and say what to do. docs/reliability.md ("What happens when ...")
shows the same table to readers; `test_the_docs_page_lists_every_row` keeps the two equal.
"""

from __future__ import annotations

import io
import re
import tarfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils_cv.common.download import download, safe_extract
from utils_cv.similarity.datasets.by_name import load_dataset
from utils_cv.similarity.datasets.emoji import check_emoji
from utils_cv.similarity.datasets.emoji_fonts import find_fonts
from utils_cv.similarity.datasets.fashion_mnist import load_fashion_mnist
from utils_cv.similarity.datasets.image_folder import load_image_folder
from utils_cv.similarity.index import EmbeddingIndex
from utils_cv.similarity.losses import MultiSimilarityLoss, TripletLoss
from utils_cv.similarity.metrics import retrieval_metrics
from utils_cv.similarity.presets import preset_config, resolve_preset
from utils_cv.similarity.samplers import ClassBalancedBatchSampler

ROOT = Path(__file__).resolve().parents[2]
DOCS_PAGE = ROOT / "docs" / "reliability.md"


@dataclass(frozen=True)
class Case:
    """One bad input. ``names`` and ``fix`` are regular expressions the message must match;
    ``{tmp}`` in ``names`` stands for the test's temporary folder."""

    situation: str  # the docs table's first column, word for word
    trigger: Callable[[Path], object]
    raises: type[BaseException]  # an exception, or a Warning subclass for a warning
    names: str
    fix: str


def _png(path: Path, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (200, 40, 40)).save(path)
    return path


def _folder(tmp: Path, extra: Callable[[Path], None]) -> Path:
    """Two good classes of two images, plus whatever ``extra`` adds."""
    root = tmp / "images"
    for name in ("cat", "dog"):
        for i in range(2):
            _png(root / name / f"{i}.png")
    extra(root)
    return root


def _load(root: Path) -> None:
    load_image_folder(root, image_size=8)


def _corrupt_jpeg(tmp: Path) -> None:
    _load(_folder(tmp, lambda root: (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg")))


def _text_file(tmp: Path) -> None:
    _load(_folder(tmp, lambda root: (root / "cat" / "notes.txt").write_text("hello")))


def _empty_class(tmp: Path) -> None:
    _load(_folder(tmp, lambda root: (root / "empty_class").mkdir()))


def _lone_image(tmp: Path) -> None:
    _load(_folder(tmp, lambda root: _png(root / "lonely" / "0.png")))


def _no_images(tmp: Path) -> None:
    (tmp / "images" / "cat").mkdir(parents=True)
    _load(tmp / "images")


def _tiny_classes_sampler(tmp: Path) -> None:
    ClassBalancedBatchSampler([0, 1, 1, 2, 2], classes_per_batch=2, samples_per_class=2)


def _nan_embeddings(tmp: Path) -> None:
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    x[2] = np.nan
    retrieval_metrics(x, [0, 0, 1, 1, 2, 2])


def _one_class_batch(loss: torch.nn.Module) -> Callable[[Path], object]:
    return lambda tmp: loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def _missing_font(tmp: Path) -> None:
    find_fonts({"symbola": tmp / "Symbola_hint.ttf"}, keys=["symbola"])


def _missing_fashion_mnist(tmp: Path) -> None:
    load_fashion_mnist(root=tmp / "fashion")


def _unknown_dataset(tmp: Path) -> None:
    load_dataset(str(tmp / "no_such_folder"), image_size=8, data_dir=tmp / "cache")


def _changed_emoji_data(tmp: Path) -> None:
    (tmp / "emoji").mkdir()
    (tmp / "emoji" / "fingerprint.json").write_text("{not json")
    check_emoji(tmp / "emoji")


def _bad_checksum(tmp: Path) -> None:
    source = tmp / "weights.bin"
    source.write_bytes(b"some bytes")
    download(source.as_uri(), tmp / "saved" / "weights.bin", sha256="0" * 64)


def _path_traversal(tmp: Path) -> None:
    archive = tmp / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        member = tarfile.TarInfo("../outside.txt")
        member.size = 1
        tar.addfile(member, io.BytesIO(b"x"))
    safe_extract(archive, tmp / "out")


def _search_wrong_size(tmp: Path) -> None:
    index = EmbeddingIndex(dim=4)
    index.add(np.eye(4, dtype=np.float32))
    index.search(np.ones((1, 3), dtype=np.float32), k=1)


CASES = [
    Case(
        "an image file cannot be decoded",
        _corrupt_jpeg,
        UserWarning,
        r"{tmp}/images/cat/broken\.jpg",
        r"re-save or remove",
    ),
    Case(
        "a file in a class folder is not an image",
        _text_file,
        UserWarning,
        r"{tmp}/images/cat/notes\.txt",
        r"re-save or remove",
    ),
    Case(
        "a class folder holds no readable image",
        _empty_class,
        UserWarning,
        r"empty_class",
        r"add images",
    ),
    Case(
        "a class has a single image",
        _lone_image,
        UserWarning,
        r"lonely",
        r"add a second image",
    ),
    Case(
        "the image folder does not exist",
        lambda tmp: _load(tmp / "missing"),
        FileNotFoundError,
        r"{tmp}/missing",
        r"root/<class>/<image>",
    ),
    Case(
        "the image folder holds no readable image",
        _no_images,
        ValueError,
        r"{tmp}/images",
        r"root/<class>/<image>",
    ),
    Case(
        "the dataset name is neither built in nor a folder",
        _unknown_dataset,
        ValueError,
        r"no_such_folder",
        r"emoji.*fashion_mnist",
    ),
    Case(
        "classes have fewer images than a batch takes from each",
        _tiny_classes_sampler,
        UserWarning,
        r"samples_per_class=2",
        r"add images or lower samples_per_class",
    ),
    Case(
        "a batch holds one class only (triplet)",
        _one_class_batch(TripletLoss()),
        ValueError,
        r"same label",
        r"classes_per_batch >= 2",
    ),
    Case(
        "a batch holds one class only (multi-similarity)",
        _one_class_batch(MultiSimilarityLoss()),
        ValueError,
        r"same label",
        r"classes_per_batch >= 2",
    ),
    Case(
        "a sampler is asked for one class per batch",
        lambda tmp: ClassBalancedBatchSampler([0, 0, 1, 1], 1, 2),
        ValueError,
        r"classes_per_batch=1",
        r"at least 2",
    ),
    Case(
        "embeddings hold NaN or inf",
        _nan_embeddings,
        ValueError,
        r"embeddings has 1 of 6 rows",
        r"learning rate",
    ),
    Case(
        "a font file is missing",
        _missing_font,
        FileNotFoundError,
        r"{tmp}/Symbola_hint\.ttf",
        r"apt-get install .*fonts-symbola.*UTILS_CV_FONT_SYMBOLA",
    ),
    Case(
        "Fashion-MNIST is not installed",
        _missing_fashion_mnist,
        FileNotFoundError,
        r"{tmp}/fashion",
        r"apt-get install dataset-fashion-mnist.*download=True",
    ),
    Case(
        "the built emoji data was changed or cut short",
        _changed_emoji_data,
        RuntimeError,
        r"{tmp}/emoji",
        r"delete the folder .* or call load_emoji\(\.\.\., rebuild=True\)",
    ),
    Case(
        "a preset setting is misspelt",
        lambda tmp: preset_config("smoke", epoch=3),
        ValueError,
        r"'epoch'",
        r"did you mean 'epochs' for 'epoch'",
    ),
    Case(
        "a preset setting has a wrong value",
        lambda tmp: preset_config("smoke", epochs=-1),
        ValueError,
        r"EPOCHS=-1",
        r"at least 1",
    ),
    Case(
        "a notebook parameter arrives as a string",
        lambda tmp: preset_config("smoke", seeds="[0, 1]"),
        TypeError,
        r"SEEDS='\[0, 1\]'",
        r"pass YAML instead: -y 'SEEDS: \[0\]'",
    ),
    Case(
        "the preset name is unknown",
        lambda tmp: resolve_preset("fast"),
        ValueError,
        r"'fast'",
        r"'auto' or one of",
    ),
    Case(
        "a loss parameter has a wrong value",
        lambda tmp: TripletLoss(mining="hardest"),
        ValueError,
        r"mining='hardest'",
        r"use one of",
    ),
    Case(
        "a download does not match its checksum",
        _bad_checksum,
        ValueError,
        r"weights\.bin",
        r"not saved.*Retry, or check the URL and the checksum",
    ),
    Case(
        "an archive member points outside the destination",
        _path_traversal,
        ValueError,
        r"evil\.tar.*'\.\./outside\.txt'",
        r"nothing was extracted",
    ),
    Case(
        "queries do not have the index's embedding size",
        _search_wrong_size,
        ValueError,
        r"\b3\b.*\b4\b|\b4\b.*\b3\b",
        r"embed with the index's model",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.situation for case in CASES])
def test_bad_input_message_names_the_culprit_and_the_fix(case: Case, tmp_path: Path):
    if issubclass(case.raises, Warning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            case.trigger(tmp_path)
        messages = [str(w.message) for w in caught if issubclass(w.category, case.raises)]
        assert messages, f"no {case.raises.__name__} for: {case.situation}"
        message = " ".join(messages)
    else:
        with pytest.raises(case.raises) as error:
            case.trigger(tmp_path)
        message = str(error.value)
    names = case.names.replace("{tmp}", re.escape(str(tmp_path)))
    assert re.search(names, message, re.S), f"the message does not name the culprit: {message}"
    assert re.search(case.fix, message, re.S), f"the message does not say the fix: {message}"


def _docs_rows() -> list[str]:
    text = DOCS_PAGE.read_text()
    table = text.split("## What happens when", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    return [row.split("|")[1].strip() for row in rows[1:]]  # minus the header row


def test_the_docs_page_lists_every_row():
    assert _docs_rows() == [case.situation for case in CASES]


def test_a_bad_input_never_writes_into_the_users_folder(tmp_path: Path):
    """Loading a folder with every kind of bad file in it leaves the folder as it was."""
    root = _folder(tmp_path, lambda r: None)
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "notes.txt").write_text("stray")
    (root / "empty").mkdir()
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load(root)
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before
