"""Datasets that do not fit in memory: a FileList decoded batch by batch (file_loader.py).

Each check compares the file-backed path with the in-memory one it stands in for: the
pixels of ``to_rgb``, the geometry of ``FileList.load``, the batches of ``DeviceDataLoader``
and the training and embeddings of the same images held in memory.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from tests.image_folders import KINDS, file_list, pattern, write_image_folder, write_stripes
from tests.unit.test_training import NUM_CLASSES, PER_CLASS, SIZE, new_model, stripes
from utils_cv.similarity import runner
from utils_cv.similarity.callbacks import get_history, load_checkpoint
from utils_cv.similarity.datasets import FileList, load_image_folder, to_rgb
from utils_cv.similarity.file_loader import (
    FileDataLoader,
    FileDataset,
    decode_rgb,
    photo_augmentation,
)
from utils_cv.similarity.losses import SoftmaxLoss
from utils_cv.similarity.models import embed
from utils_cv.similarity.samplers import ClassBalancedBatchSampler
from utils_cv.similarity.training import make_learner

ORIENTATION = 0x0112  # the EXIF tag
# torchvision 0.29 deprecates its image decoders (for TorchCodec) with a warning per call.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def reference(path: Path) -> torch.Tensor:
    """(3, H, W) uint8: the pixels ``FileList.load`` starts from."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1)


def write_files(folder: Path) -> list[Path]:
    """Every kind of file a FileList meets: the image folders' four kinds (RGB, RGBA and
    palette PNGs with transparency, JPEG), non-square photos with each EXIF orientation, a
    grey and a CMYK JPEG, a 16-bit PNG and a GIF."""
    write_image_folder(folder / "kinds", classes=1, domains=(), per_domain=len(KINDS), size=20)
    paths = sorted((folder / "kinds").rglob("*.*"))
    photo = Image.fromarray(pattern(5, 1, 48)[:, :30])  # 48 high, 30 wide
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        paths.append(folder / f"exif{orientation}.jpg")
        photo.save(paths[-1], exif=exif, quality=90)
    extra = {
        "grey.jpg": photo.convert("L"),
        "cmyk.jpg": photo.convert("CMYK"),
        "sixteen.png": Image.fromarray(np.asarray(photo)[..., 0].astype(np.uint16) * 257),
        "palette.gif": photo.quantize(16),
    }
    for name, image in extra.items():
        paths.append(folder / name)
        image.save(paths[-1])
    return paths


# --- decoding -------------------------------------------------------------------------------


def test_decoding_gives_the_pixels_of_to_rgb_for_every_kind_of_file(tmp_path):
    for path in write_files(tmp_path):
        pixels = decode_rgb(path)
        assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3, path.name
        assert torch.equal(pixels, reference(path)), path.name
    # The EXIF orientations were applied, not just kept: 5 to 8 turn the 30 x 48 photo.
    assert decode_rgb(tmp_path / "exif6.jpg").shape == (3, 30, 48)
    assert decode_rgb(tmp_path / "exif3.jpg").shape == (3, 48, 30)


def test_torchvision_decodes_the_jpegs_it_is_given_as_pillow_and_not_transparent_pngs(tmp_path):
    # Why decode_rgb hands torchvision RGB and grey JPEGs only: on them its decoder gives
    # to_rgb's pixels bit for bit, EXIF orientation included; on a transparent PNG it drops
    # the alpha instead of compositing onto white.
    paths = write_files(tmp_path)
    for path in [p for p in paths if p.suffix == ".jpg" and p.name != "cmyk.jpg"]:
        tv = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        assert torch.equal(tv, reference(path)), path.name
    for kind in ("rgba.png", "palette.png"):
        (path,) = [p for p in paths if p.name.endswith(kind)]
        tv = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        assert not torch.equal(tv, reference(path)) and torch.equal(
            decode_rgb(path), reference(path)
        )


# --- the loader -----------------------------------------------------------------------------


def test_evaluation_batches_equal_the_images_file_list_load_keeps(tmp_path):
    files = file_list(write_files(tmp_path))  # squares, portraits and landscapes
    loaded = files.load(16)
    for workers in (0, 2):
        loader = FileDataLoader(files, 16, batch_size=5, num_workers=workers)
        batches = list(loader)
        assert len(loader) == len(batches) == 4
        images = torch.cat([images for images, _ in batches])
        assert images.dtype == torch.float32
        assert torch.equal(images, loaded.images.float() / 255)  # exactly, not within a bound
        assert torch.equal(torch.cat([labels for _, labels in batches]), files.labels)


def test_crop_pct_resizes_to_image_size_over_it_and_keeps_the_centre(tmp_path):
    """The papers' evaluation geometry, 256 -> 224 (crop_pct 0.875): a 256 x 320 photo is
    not resized (its shorter side is already 224 / 0.875) and its centre 224 x 224 is kept;
    the loader gives the same pixels, and subsets and splits keep the setting."""
    photo = torch.from_numpy(pattern(3, 2, 320)[:256]).permute(2, 0, 1)  # (3, 256, 320)
    path = tmp_path / "photo.png"
    Image.fromarray(photo.permute(1, 2, 0).numpy()).save(path)
    files = replace(file_list([path]), crop_pct=0.875)
    loaded = files.load(224).images[0]
    assert torch.equal(loaded, photo[:, 16:240, 48:272])
    (batch, _), *_ = list(FileDataLoader(files, 224, num_workers=0))
    assert torch.equal(batch[0], loaded.float() / 255)
    assert files.split("train").crop_pct == files.relabel().crop_pct == 0.875
    # the default keeps the whole shorter side: 256 x 320 resized to 224 x 280, centre crop
    whole = Image.open(path).resize((280, 224), Image.Resampling.LANCZOS).crop((28, 0, 252, 224))
    default = file_list([path]).load(224).images[0]
    assert torch.equal(default, torch.from_numpy(np.array(whole)).permute(2, 0, 1))
    for bad in (0, 1.2, -0.5):
        with pytest.raises(ValueError, match=f"crop_pct={bad} must be in"):
            replace(files, crop_pct=bad)


def test_seeded_batches_and_crops_repeat_with_0_and_2_workers(tmp_path):
    files = file_list(write_files(tmp_path))

    def passes(workers: int, seed: int = 5) -> list[torch.Tensor]:
        """Two passes of a new loader, each as one (N, pixels + label) tensor."""
        loader = FileDataLoader(
            files, 12, 4, shuffle=True, drop_last=True, augment=True, num_workers=workers, seed=seed
        )
        rows = [[torch.cat([x.flatten(1), y[:, None]], 1) for x, y in loader] for _ in range(2)]
        return [torch.cat(batches) for batches in rows]

    state = torch.random.get_rng_state()
    first, second = passes(0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator untouched
    assert len(first) == 16 and not torch.equal(first, second)  # new order and crops each pass
    assert all(map(torch.equal, passes(0), (first, second)))
    assert all(map(torch.equal, passes(2), (first, second)))  # whichever process decodes
    assert not torch.equal(passes(0, seed=6)[0], first)


def test_an_item_is_the_photo_augmentation_drawn_from_its_seed(tmp_path):
    (path,) = [p for p in write_files(tmp_path) if p.name == "exif6.jpg"]
    dataset = FileDataset(file_list([path]), 16, augment=True)
    image, label = dataset[(0, 1234)]
    torch.manual_seed(1234)
    expected = photo_augmentation(16)(decode_rgb(path))
    assert label == 0 and image.shape == (3, 16, 16) and torch.equal(image, expected)
    crop, flip = photo_augmentation(16).transforms
    assert (crop.scale, crop.ratio, flip.p) == ((0.08, 1.0), (3 / 4, 4 / 3), 0.5)


def test_class_balanced_batches_hold_p_classes_of_k_images(tmp_path):
    files = write_stripes(tmp_path / "stripes", stripes(0))
    sampler = ClassBalancedBatchSampler(files.labels, classes_per_batch=3, samples_per_class=2)
    loader = FileDataLoader(files, SIZE, batch_sampler=sampler, augment=True, num_workers=2)
    batches = list(loader)
    assert len(loader) == len(sampler) == len(batches) == NUM_CLASSES * PER_CLASS // 6
    for images, labels in batches:
        assert images.shape == (6, 3, SIZE, SIZE) and labels.dtype == torch.int64
        assert 0 <= images.min() and images.max() <= 1
        counts = torch.bincount(labels)
        assert sorted(counts[counts > 0].tolist()) == [2, 2, 2]


# --- training and embedding -----------------------------------------------------------------


def test_a_file_list_trains_and_validates_exactly_as_the_same_images_in_memory(tmp_path):
    train, val = stripes(0), stripes(1)
    train_files = write_stripes(tmp_path / "train", train)
    val_files = write_stripes(tmp_path / "val", val)
    states, histories = [], []
    for data, val_data, options in (
        (train, val, {}),
        (train_files, val_files, {"image_size": SIZE, "num_workers": 2}),
    ):
        model = new_model()
        loss = SoftmaxLoss(model.embedding_size, NUM_CLASSES)
        learn = make_learner(
            model, loss, data, val=val_data, batch_size=16, augment=False, device="cpu", **options
        )
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(2, 3e-3)  # the second epoch reshuffles
        states.append(model.state_dict())
        histories.append(get_history(learn))
    assert [entry["epoch"] for entry in histories[1]] == [0, 1]
    assert histories[0] == histories[1]
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


@pytest.mark.filterwarnings("ignore:the validation split has only")  # 8 classes: a toy
def test_train_run_tests_a_file_list_as_the_same_images_in_memory(tmp_path, monkeypatch):
    splits = {name: stripes(seed) for seed, name in enumerate(("train", "val", "test"))}
    files = {name: write_stripes(tmp_path / name, data) for name, data in splits.items()}
    log = tmp_path / "trainings.jsonl"
    monkeypatch.setenv(runner.TRAINING_LOG, str(log))
    runs = []
    for data, options in ((splits, {}), (files, {"image_size": SIZE, "num_workers": 0})):
        loss = lambda: SoftmaxLoss(32, NUM_CLASSES)  # noqa: E731
        runs.append(
            runner.train_run(
                new_model,
                loss,
                data["train"],
                val=data["val"],
                test=data["test"],
                epochs=1,
                lr=3e-3,
                batch_size=16,
                augment=False,
                device="cpu",
                **options,
            )  # fmt: skip
        )
    assert runs[0].metrics == runs[1].metrics and 0 <= runs[1].metrics["recall@1"] <= 1
    assert torch.equal(runs[0].embeddings, runs[1].embeddings)
    assert [entry["image_size"] for entry in runner.read_training_log(log)] == [SIZE, SIZE]


def test_a_file_list_trains_an_epoch_with_the_photo_augmentation_val_and_a_checkpoint(tmp_path):
    train = write_stripes(tmp_path / "train", stripes(0))
    val = write_stripes(tmp_path / "val", stripes(1))
    model = new_model()
    learn = make_learner(
        model, SoftmaxLoss(32, NUM_CLASSES), train, val=val, batch_size=16, image_size=SIZE,
        num_workers=2, device="cpu", checkpoint_path=tmp_path / "best.pth",
    )  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    (entry,) = get_history(learn)
    assert np.isfinite(entry["train_loss"]) and 0 <= entry["val_recall@1"] <= 1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the checkpoint holds the trained weights, chosen on the FileList's validation classes
    restored = new_model()
    assert load_checkpoint(tmp_path / "best.pth", restored)["epoch"] == 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_embedding_a_file_list_equals_embedding_it_loaded_in_memory(tmp_path):
    files = file_list(write_files(tmp_path))
    model = new_model()
    in_memory = embed(model, files.load(SIZE).images, batch_size=8)
    for workers in (0, 2):
        from_files = embed(model, files, batch_size=8, image_size=SIZE, num_workers=workers)
        assert torch.equal(from_files, in_memory)
    with pytest.raises(ValueError, match="pass image_size"):
        embed(model, files)
    with pytest.raises(ValueError, match="image_size is for a FileList"):
        embed(model, files.load(SIZE).images, image_size=SIZE + 1)


def test_an_unreadable_file_met_in_training_is_named(tmp_path):
    files = write_stripes(tmp_path / "train", stripes(0))
    broken = Path(files.paths[5])
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    learn = make_learner(
        new_model(), SoftmaxLoss(32, NUM_CLASSES), files, batch_size=16, image_size=SIZE,
        num_workers=2, device="cpu",
    )  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(f"cannot read image {broken}")):
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3)


def test_lr_find_and_summary_run_on_a_file_list_and_leave_no_worker_behind(tmp_path):
    """fastai's lr finder stops a pass early and summary takes one batch: both leave the
    decoding workers of the unfinished passes shut down, not waiting for the garbage
    collector."""
    import multiprocessing

    import fastai.callback.hook  # noqa: F401  (Learner.summary)

    files = write_stripes(tmp_path / "train", stripes(0))
    # other tests may leave pools of their own (joblib's loky workers, for NMI's k-means)
    before = set(multiprocessing.active_children())
    learn = make_learner(
        new_model(), SoftmaxLoss(32, NUM_CLASSES), files, batch_size=8, image_size=SIZE,
        num_workers=2, augment=True, device="cpu",
    )  # fmt: skip
    with learn.no_bar(), learn.no_logging():
        suggestion = learn.lr_find(num_it=5, show_plot=False)
        summary = learn.summary()
    assert suggestion.valley > 0
    assert f"8 x 3 x {SIZE} x {SIZE}" in summary  # the input shape of one file batch
    assert set(multiprocessing.active_children()) - before == set()


def test_make_learner_asks_a_file_list_for_its_size_and_a_plain_augmentation(tmp_path):
    files = write_stripes(tmp_path / "train", stripes(0))

    def learner(data, **kwargs):
        loss = SoftmaxLoss(32, NUM_CLASSES)
        return make_learner(new_model(), loss, data, batch_size=16, device="cpu", **kwargs)

    with pytest.raises(ValueError, match="train is a FileList: pass image_size"):
        learner(files)
    with pytest.raises(ValueError, match="augment=0.5"):
        learner(files, image_size=SIZE, augment=0.5)
    with pytest.raises(ValueError, match=f"image_size={SIZE + 1} but train's images"):
        learner(stripes(0), image_size=SIZE + 1)


# --- FileList and ImageFolder ---------------------------------------------------------------


def test_file_list_relabel_mirrors_image_data(tmp_path):
    data = stripes(0, classes=(2, 5, 7))
    files = write_stripes(tmp_path / "some", data)
    relabeled = files.relabel()
    assert torch.equal(relabeled.labels, data.relabel().labels)
    assert relabeled.class_names == data.relabel().class_names == ["class2", "class5", "class7"]
    assert relabeled.paths == files.paths and relabeled.splits == files.splits


def test_an_image_folder_as_a_file_list_holds_what_it_loads_in_memory(tmp_path):
    root = write_image_folder(tmp_path / "folder", classes=6)
    (root / "class_00" / "light" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="broken.png") as in_memory_warnings:
        data = load_image_folder(root, image_size=SIZE)
    with pytest.warns(UserWarning) as file_warnings:
        files = load_image_folder(root, in_memory=False)
    assert [str(w.message) for w in file_warnings] == [str(w.message) for w in in_memory_warnings]
    assert isinstance(files, FileList) and all(Path(p).is_absolute() for p in files.paths)
    assert files.paths == [str(Path(p).resolve()) for p in data.paths]
    assert (files.class_names, files.splits, files.domains) == (
        data.class_names, data.splits, data.domains,
    )  # fmt: skip
    assert torch.equal(files.labels, data.labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file list is loaded without a new warning
        assert torch.equal(files.load(SIZE).images, data.images)
