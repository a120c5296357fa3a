"""The paper benchmarks' loaders (CUB-200-2011, Cars196, Stanford Online Products, In-Shop)
on small fixtures that the layout writers put in each official format, on lines copied from
the real files, and on every mistake a user can make with them."""

from __future__ import annotations

import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import utils_cv.similarity.datasets.cub as cub_module
import utils_cv.similarity.datasets.sop as sop_module
from tests.image_folders import pattern, snapshot
from utils_cv.common.download import sha256_file
from utils_cv.similarity.datasets import (
    FileList,
    class_split,
    cross_domain_pair,
    cross_domain_views,
    example_queries,
    load_cars196,
    load_cub,
    load_inshop,
    load_sop,
    write_cars196_layout,
    write_cub_layout,
    write_inshop_layout,
    write_sop_layout,
)

CLASSES, PER_CLASS, SIZE = 8, 3, 16
NAMES = [f"species {c}" for c in range(CLASSES)]
VAL = 0.5  # of 4 training classes: some "val", some "train" with these names
# The sample is shuffled: the writers group the images by class, as the real files do.
ORDER = torch.randperm(CLASSES * PER_CLASS, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(CLASSES).repeat_interleave(PER_CLASS)[ORDER]
# Each image its own stripes: the class sets angle and period, the variant the phase.
VARIANTS = [int((LABELS[:k] == c).sum()) for k, c in enumerate(LABELS)]
IMAGES = torch.stack(
    [
        torch.from_numpy(pattern(int(c), v, SIZE)).permute(2, 0, 1)
        for c, v in zip(LABELS, VARIANTS, strict=True)
    ]
)


def write(kind: str, root: Path) -> Path:
    writers = {
        "cub": lambda: write_cub_layout(root, IMAGES, LABELS, NAMES),
        "cars196": lambda: write_cars196_layout(root, IMAGES, LABELS, NAMES),
        "sop": lambda: write_sop_layout(root, IMAGES, LABELS),
        "inshop": lambda: write_inshop_layout(root, IMAGES, LABELS),
    }
    return writers[kind]()


LOADERS = {"cub": load_cub, "cars196": load_cars196, "sop": load_sop, "inshop": load_inshop}


def load(kind: str, root: Path) -> FileList:
    """The fixture loaded; the loader warns (8 classes, not 200) and writes nothing."""
    before = snapshot(root)
    with pytest.warns(UserWarning, match="the official dataset has"):
        files = LOADERS[kind](root, val_fraction=VAL)
    assert snapshot(root) == before
    return files


def source_labels(files: FileList) -> list[int]:
    """The label of the written image each file decodes closest to (JPEG is lossy)."""
    loaded = files.load(SIZE).images.float()
    distances = (loaded[:, None] - IMAGES[None].float()).abs().mean(dim=(2, 3, 4))
    assert distances.min(dim=1).values.max() < 16, "a file decodes far from every written image"
    return LABELS[distances.argmin(dim=1)].tolist()


def check_splits(files: FileList, test_classes: set[str]) -> None:
    """Test classes exactly the official ones; the rest train or val by the stable hash."""
    by_split = {
        s: {files.class_names[label] for label in files.split(s).labels.tolist()}
        for s in ("train", "val", "test")
    }
    assert by_split["test"] == test_classes
    assert by_split["val"] and by_split["train"], "the fixture should exercise both"
    assert not by_split["val"] & test_classes and not by_split["train"] & test_classes
    for name in by_split["train"] | by_split["val"]:
        assert name in by_split[class_split(name, test_fraction=0.0, val_fraction=VAL)]
    assert len(files) == CLASSES * PER_CLASS and len(files.class_names) == CLASSES
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in files.paths)


# --- each benchmark on a fixture in its layout ------------------------------------------------


def test_cub_reads_its_layout_split_100_100_by_class_id(tmp_path):
    root = write("cub", tmp_path / "CUB_200_2011")
    files = load("cub", root)
    folders = [f"{c + 1:03d}.species_{c}" for c in range(CLASSES)]
    assert files.class_names == folders  # the names of classes.txt
    check_splits(files, set(folders[CLASSES // 2 :]))
    for path, label, source in zip(
        files.paths, files.labels.tolist(), source_labels(files), strict=True
    ):
        assert label == source and Path(path).parent.name == folders[label]
    assert files.super_classes is None and set(files.domains) == {""}


def test_cars196_splits_by_class_not_by_the_files_test_flag(tmp_path):
    root = write("cars196", tmp_path / "cars196")
    files = load("cars196", root)
    assert files.class_names == NAMES
    check_splits(files, set(NAMES[CLASSES // 2 :]))
    assert files.labels.tolist() == source_labels(files)
    annotations = scipy.io.loadmat(root / "cars_annos.mat", squeeze_me=True)["annotations"]
    flags = {
        (int(c), int(t)) for c, t in zip(annotations["class"], annotations["test"], strict=True)
    }
    # the classification flag puts images of a training class on both sides; not our split
    assert {(1, 0), (1, 1)} <= flags and files.splits[0] != "test"
    assert [Path(p).relative_to(root).as_posix() for p in files.paths][:2] == [
        "car_ims/000001.jpg",
        "car_ims/000002.jpg",
    ]


def test_sop_reads_products_super_classes_and_its_file_split(tmp_path):
    root = write("sop", tmp_path / "Stanford_Online_Products")
    files = load("sop", root)
    assert files.class_names == [f"class_{c}" for c in range(1, CLASSES + 1)]
    check_splits(files, {f"class_{c}" for c in range(5, CLASSES + 1)})
    assert files.labels.tolist() == source_labels(files)
    # 4 products per half, in blocks named after the official categories, in both halves
    categories = ["bicycle", "cabinet", "chair", "coffee_maker"] * 2
    expected = [f"{categories[label]}_final" for label in files.labels.tolist()]
    assert files.super_classes == expected
    assert [Path(p).parent.name for p in files.paths] == expected
    info = (root / "Ebay_info.txt").read_text().splitlines()
    assert len(info) == 1 + len(files) and info[0] == "image_id class_id super_class_id path"


def test_sop_writer_takes_given_super_classes(tmp_path):
    given = ["mug", "lamp", "mug", "lamp", "kettle", "kettle", "fan", "fan"]
    root = write_sop_layout(tmp_path / "sop", IMAGES, LABELS, super_classes=given)
    files = load("sop", root)
    assert files.super_classes == [f"{given[label]}_final" for label in files.labels.tolist()]
    # super_class_id follows the sorted category names (fan 1, kettle 2, lamp 3, mug 4)
    ids = {
        line.split()[3].split("/")[0]: line.split()[2]
        for line in (root / "Ebay_info.txt").read_text().splitlines()[1:]
    }
    assert ids == {"fan_final": "1", "kettle_final": "2", "lamp_final": "3", "mug_final": "4"}
    with pytest.raises(ValueError, match="one category per class"):
        write_sop_layout(tmp_path / "other", IMAGES, LABELS, super_classes=["mug"])


def test_inshop_query_and_gallery_are_test_domains_evaluated_query_first(tmp_path):
    root = write("inshop", tmp_path / "inshop")
    files = load("inshop", root)
    items = [f"id_{c:08d}" for c in range(1, CLASSES + 1)]
    assert files.class_names == items
    check_splits(files, set(items[CLASSES // 2 :]))
    assert files.labels.tolist() == source_labels(files)
    assert all(
        Path(p).parent.name == items[label]
        for p, label in zip(files.paths, files.labels.tolist(), strict=True)
    )
    domains = set(zip(files.splits, files.domains, strict=True))
    assert set(domains) == {("train", ""), ("val", ""), ("test", "query"), ("test", "gallery")}
    test = files.load(8).split("test")
    assert cross_domain_pair(test) == ("query", "gallery")
    assert cross_domain_views(test) == [("query", "gallery")]
    assert all(test.domains[i] == "query" for i in example_queries(test, count=2))
    # In the real data the query set is the larger (14,218 against 12,612 images); a subset
    # with more gallery images must still search queries in the gallery, not the reverse.
    one_item = int(test.labels[0])
    pairs = zip(test.labels.tolist(), test.domains, strict=True)
    small = test.subset([d == "gallery" or label == one_item for label, d in pairs])
    assert small.domains.count("gallery") > small.domains.count("query")
    assert cross_domain_pair(small) == ("query", "gallery")


def test_inshop_partition_file_may_sit_in_root_or_in_eval(tmp_path):
    root = write("inshop", tmp_path / "inshop")
    (root / "Eval" / "list_eval_partition.txt").rename(root / "list_eval_partition.txt")
    assert len(load("inshop", root)) == CLASSES * PER_CLASS


def test_file_list_load_decodes_like_load_image_folder(tmp_path):
    files = load("cub", write("cub", tmp_path / "cub"))
    data = files.load(12)
    assert data.images.shape == (len(files), 3, 12, 12) and data.images.dtype == torch.uint8
    assert torch.equal(data.labels, files.labels)
    assert (data.splits, data.domains, data.paths, data.class_names) == (
        files.splits,
        files.domains,
        files.paths,
        files.class_names,
    )
    # A transparent PNG lands on the background, as in load_image_folder.
    png = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (0, 0, 255, 0)).save(png)
    clear = FileList(tmp_path, [str(png)], torch.tensor([0]), ["a"], ["test"], [""])
    assert clear.load(4, background=(0, 255, 0)).images[0, :, 0, 0].tolist() == [0, 255, 0]


def test_file_list_subset_split_and_repr(tmp_path):
    files = load("sop", write("sop", tmp_path / "sop"))
    test = files.split("test")
    assert len(test) == 12 and set(test.splits) == {"test"} and len(test.super_classes) == 12
    assert test.class_names == files.class_names and test.num_classes == 4
    assert files.subset([0, 2]).paths == [files.paths[0], files.paths[2]]
    assert "24 images" in repr(files) and "'test': 12" in repr(files) and "8 classes" in repr(files)
    with pytest.raises(ValueError, match="split 'tset' unknown"):
        files.split("tset")


# --- the real formats, written by hand from the official files --------------------------------

CUB_LINE = re.compile(r"^\d+ \d{3}\.[A-Za-z0-9_]+/[A-Za-z0-9_]+_\d{4}_\d+\.jpg$")
SOP_LINE = re.compile(r"^\d+ \d+ \d+ [a-z_]+_final/\d+_\d+\.JPG$")
INSHOP_LINE = re.compile(
    r"^img/(WOMEN|MEN)/\w+/id_\d{8}/\d{2}_\d+_[a-z]+\.jpg +id_\d{8} (train|query|gallery) *$"
)


def tiny_jpegs(root: Path, paths: list[str]) -> None:
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), (200, 30, 30)).save(root / path)


def test_hand_written_lines_in_the_real_formats_parse(tmp_path):
    cub = tmp_path / "CUB_200_2011"
    cub.mkdir()
    images = [
        "1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg",
        "2 001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg",
        "3 002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg",
    ]
    (cub / "images.txt").write_text("\n".join(images) + "\n")
    (cub / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n")
    (cub / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    tiny_jpegs(cub / "images", [line.split()[1] for line in images])
    with pytest.warns(UserWarning, match="lists 2 classes"):
        files = load_cub(cub)
    assert files.class_names == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    assert (
        files.labels.tolist() == [0, 0, 1]
        and files.splits[2] == "test"
        and files.splits[0] != "test"
    )
    assert files.load(4).images.shape == (3, 3, 4, 4)  # 6 x 4 photos, centre crop

    sop = tmp_path / "Stanford_Online_Products"
    sop.mkdir()
    header = "image_id class_id super_class_id path\n"
    train = ["1 1 1 bicycle_final/111085122871_0.JPG", "2 1 1 bicycle_final/111085122871_1.JPG"]
    test = [
        "1 11319 1 bicycle_final/251952414262_0.JPG",
        "2 11319 1 bicycle_final/251952414262_1.JPG",
    ]
    (sop / "Ebay_train.txt").write_text(header + "\n".join(train) + "\n")
    (sop / "Ebay_test.txt").write_text(header + "\n".join(test) + "\n")
    tiny_jpegs(sop, [line.split()[3] for line in train + test])
    with pytest.warns(UserWarning):
        files = load_sop(sop)
    assert files.class_names == ["class_1", "class_11319"]
    assert files.splits[2:] == ["test", "test"] and files.super_classes == ["bicycle_final"] * 4

    inshop = tmp_path / "In-shop Clothes Retrieval Benchmark"
    (inshop / "Eval").mkdir(parents=True)
    rows = [
        "img/WOMEN/Dresses/id_00000002/02_1_front.jpg                           id_00000002 train      ",
        "img/WOMEN/Dresses/id_00000002/02_2_side.jpg                            id_00000002 train ",
        "img/WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg                    id_00000001 gallery    ",
        "img/WOMEN/Blouses_Shirts/id_00000001/02_2_side.jpg                     id_00000001 query      ",
    ]
    partition = "4\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    (inshop / "Eval" / "list_eval_partition.txt").write_text(partition)
    tiny_jpegs(inshop, [row.split()[0] for row in rows])
    with pytest.warns(UserWarning):
        files = load_inshop(inshop)
    assert files.class_names == ["id_00000001", "id_00000002"]
    assert files.domains == ["", "", "gallery", "query"] and files.splits[2:] == ["test", "test"]

    # The writers' lines have the same shape as the real ones.
    assert all(CUB_LINE.match(line) for line in images)
    assert all(SOP_LINE.match(line) for line in train + test)
    assert all(INSHOP_LINE.match(row) for row in rows)
    written = {kind: write(kind, tmp_path / "written" / kind) for kind in ("cub", "sop", "inshop")}
    assert all(
        CUB_LINE.match(line) for line in (written["cub"] / "images.txt").read_text().splitlines()
    )
    assert all(
        SOP_LINE.match(line)
        for line in (written["sop"] / "Ebay_train.txt").read_text().splitlines()[1:]
    )
    assert all(
        INSHOP_LINE.match(line)
        for line in (written["inshop"] / "Eval" / "list_eval_partition.txt")
        .read_text()
        .splitlines()[2:]
    )


def test_a_cars_annos_mat_shaped_like_the_real_one_parses(tmp_path):
    # cars_annos.mat: 'annotations' a 1 x 16185 struct array (relative_im_path, bbox_x1,
    # bbox_y1, bbox_x2, bbox_y2, class, test), 'class_names' a 1 x 196 cell array.
    fields = [
        ("relative_im_path", "O"),
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("test", "O"),
    ]
    annotations = np.empty((1, 3), dtype=fields)
    annotations[0, 0] = (
        "car_ims/000001.jpg",
        np.uint8(112),
        np.uint8(7),
        np.uint16(853),
        np.uint16(717),
        np.uint8(1),
        np.uint8(0),
    )
    annotations[0, 1] = (
        "car_ims/000002.jpg",
        np.uint8(48),
        np.uint8(24),
        np.uint16(441),
        np.uint16(202),
        np.uint8(1),
        np.uint8(1),
    )
    annotations[0, 2] = (
        "car_ims/000003.jpg",
        np.uint8(7),
        np.uint8(4),
        np.uint16(277),
        np.uint16(180),
        np.uint8(2),
        np.uint8(0),
    )
    names = np.empty((1, 2), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    scipy.io.savemat(
        tmp_path / "cars_annos.mat", {"annotations": annotations, "class_names": names}
    )
    tiny_jpegs(tmp_path, [f"car_ims/00000{i}.jpg" for i in (1, 2, 3)])
    with pytest.warns(UserWarning, match="196"):
        files = load_cars196(tmp_path)
    assert files.class_names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert files.labels.tolist() == [0, 0, 1] and files.splits[2] == "test"
    assert "test" not in files.splits[:2]  # the test flag of image 2 does not make it a test image


# --- what a user can get wrong ----------------------------------------------------------------

FIXES = {
    "cub": "CUB_200_2011",
    "cars196": "cars_annos.mat",
    "sop": "Stanford_Online_Products",
    "inshop": "DeepFashion",
}
INDEX = {
    "cub": "images.txt",
    "cars196": "cars_annos.mat",
    "sop": "Ebay_test.txt",
    "inshop": "Eval/list_eval_partition.txt",
}


@pytest.mark.parametrize("kind", LOADERS)
def test_a_missing_root_or_index_file_names_it_and_the_fix(tmp_path, kind):
    nowhere = re.escape(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"{nowhere} does not exist.*{FIXES[kind]}"):
        LOADERS[kind](tmp_path / "nowhere")
    root = write(kind, tmp_path / kind)
    (root / INDEX[kind]).unlink()
    missing = "list_eval_partition.txt" if kind == "inshop" else INDEX[kind]
    with pytest.raises(FileNotFoundError, match=rf"{missing} does not exist.*{FIXES[kind]}"):
        LOADERS[kind](root)


@pytest.mark.parametrize("kind", LOADERS)
def test_missing_images_are_counted_and_the_first_ones_listed(tmp_path, kind):
    root = write(kind, tmp_path / kind)
    files = load(kind, root)
    for path in files.paths[-7:]:
        Path(path).unlink()
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError) as error:
        LOADERS[kind](root)
    message = str(error.value)
    assert "7 of the" in message and "... and 2 more" in message and FIXES[kind] in message
    assert files.paths[-7] in message and files.paths[-1] not in message


@pytest.mark.parametrize(
    ("kind", "file", "line", "expected"),
    [
        (
            "cub",
            "images.txt",
            "1 a/b.jpg extra",
            r"images.txt, line 1: expected 2 values \(image_id path\)",
        ),
        (
            "cub",
            "image_class_labels.txt",
            "1 one",
            r"image_class_labels.txt, line 1: expected 2 values",
        ),
        ("cub", "classes.txt", "7 007.species_6", r"classes.txt: class ids must be 1, 2, 3"),
        (
            "sop",
            "Ebay_train.txt",
            "image_id class_id path",
            r"Ebay_train.txt: the header line must be",
        ),
        (
            "sop",
            "Ebay_test.txt",
            "image_id class_id super_class_id path\n1 x 1 a/b.JPG",
            r"Ebay_test.txt, line 2: expected 4 values",
        ),
        (
            "inshop",
            "Eval/list_eval_partition.txt",
            "two\nimage_name item_id evaluation_status",
            r"the first line must be the number of images",
        ),
    ],
)
def test_a_malformed_line_names_the_file_the_line_and_the_fix(tmp_path, kind, file, line, expected):
    root = write(kind, tmp_path / kind)
    lines = (root / file).read_text().splitlines()
    replaced = len(line.splitlines())
    (root / file).write_text("\n".join(line.splitlines() + lines[replaced:]) + "\n")
    with pytest.raises(ValueError, match=expected) as error:
        LOADERS[kind](root)
    assert FIXES[kind] in str(error.value)


def test_inshop_inconsistent_partition_files_are_refused(tmp_path):
    root = write("inshop", tmp_path / "inshop")
    index = root / "Eval" / "list_eval_partition.txt"
    original = index.read_text()
    index.write_text(original.replace("24\n", "25\n", 1))
    with pytest.raises(ValueError, match="says 25 images but it lists 24.*DeepFashion"):
        load_inshop(root)
    index.write_text(original.replace("train", "tarin", 1))
    with pytest.raises(ValueError, match="evaluation_status 'tarin'.*DeepFashion"):
        load_inshop(root)
    lines = original.splitlines()
    lines[-1] = lines[-1].replace("id_00000008", "id_00000001")
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ValueError, match=r"items \['id_00000001'\] are both training and query/gallery"
    ):
        load_inshop(root)


def test_sop_products_in_both_files_are_refused(tmp_path):
    root = write("sop", tmp_path / "sop")
    test = (root / "Ebay_test.txt").read_text().splitlines()
    test[1] = test[1].replace(" 5 ", " 1 ", 1)
    (root / "Ebay_test.txt").write_text("\n".join(test) + "\n")
    with pytest.raises(
        ValueError, match=r"share 1 class ids \(e.g. \[1\]\).*Stanford_Online_Products"
    ):
        load_sop(root)


def test_cars196_wrong_files_are_named_with_the_fix(tmp_path):
    (tmp_path / "cars_train").mkdir()
    with pytest.raises(FileNotFoundError, match="classification release.*car_ims"):
        load_cars196(tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(b"not a MATLAB file at all")
    with pytest.raises(ValueError, match="cars_annos.mat is not a readable MATLAB file.*md5"):
        load_cars196(tmp_path)
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": np.zeros(3)})
    with pytest.raises(ValueError, match="lacks the fields of cars_annos.mat.*relative_im_path"):
        load_cars196(tmp_path)


def test_a_different_class_count_warns_and_still_loads(tmp_path):
    root = write("cub", tmp_path / "cub")
    with pytest.warns(
        UserWarning, match=r"classes.txt lists 8 classes; the official dataset has 200"
    ):
        assert len(load_cub(root)) == CLASSES * PER_CLASS


def test_an_unreadable_image_names_the_file(tmp_path):
    files = load("cub", write("cub", tmp_path / "cub"))
    Path(files.paths[4]).write_bytes(b"truncated")
    with pytest.raises(
        ValueError, match=rf"cannot read image {re.escape(files.paths[4])}.*extract it again"
    ):
        files.load(8)


def test_file_list_checks_its_fields(tmp_path):
    path = str(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="1 paths but lengths {'splits': 2}"):
        FileList(tmp_path, [path], torch.tensor([0]), ["a"], ["train", "test"], [""])
    with pytest.raises(ValueError, match="labels must index class_names"):
        FileList(tmp_path, [path], torch.tensor([1]), ["a"], ["train"], [""])
    with pytest.raises(ValueError, match="paths are relative"):
        FileList(tmp_path, ["a.jpg"], torch.tensor([0]), ["a"], ["train"], [""])
    with pytest.raises(ValueError, match="unknown split names"):
        FileList(tmp_path, [path], torch.tensor([0]), ["a"], ["training"], [""])


def test_root_and_download_are_one_or_the_other(tmp_path):
    for loader in (load_cub, load_sop):
        with pytest.raises(ValueError, match="pass root .* or download=True"):
            loader()
        with pytest.raises(ValueError, match="nothing is ever written into root"):
            loader(tmp_path, download=True)


def test_the_layout_writers_never_overwrite(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not an empty folder"):
        write_cub_layout(tmp_path / "mine", IMAGES, LABELS, NAMES)
    with pytest.raises(ValueError, match="24 images but 3 labels"):
        write_inshop_layout(tmp_path / "new", IMAGES, LABELS[:3])


# --- downloads, from file:// archives with their real sha256 ----------------------------------


def test_cub_download_extracts_into_the_cache_and_loads(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write("cub", source / "CUB_200_2011")
    (source / "attributes.txt").write_text("1 has_bill_shape::curved\n")  # as in the archive
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for entry in ("CUB_200_2011", "attributes.txt"):
            tar.add(source / entry, arcname=entry)
    monkeypatch.setattr(cub_module, "CUB_URLS", (archive.as_uri(),))
    monkeypatch.setattr(cub_module, "CUB_SHA256", sha256_file(archive))
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="official dataset has 200"):
        files = load_cub(download=True, data_dir=cache, val_fraction=VAL)
    assert files.root == cache / "cub" / "CUB_200_2011" and len(files) == CLASSES * PER_CLASS
    assert sorted(p.name for p in cache.iterdir()) == [".utils_cv_cache", "cub", "downloads"]
    assert list((cache / "downloads").iterdir()) == []  # the archive is deleted once extracted
    # extracted once: a second call neither downloads nor extracts
    monkeypatch.setattr(cub_module, "CUB_URLS", ("file:///nowhere/CUB_200_2011.tgz",))
    with pytest.warns(UserWarning):
        assert load_cub(download=True, data_dir=cache).paths == files.paths


def test_a_failed_download_names_the_urls_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(cub_module, "CUB_URLS", ((tmp_path / "gone.tgz").as_uri(),))
    with pytest.raises(
        OSError,
        match=r"(?s)could not download CUB_200_2011.tgz:\n  file://.*gone.tgz.*data.caltech.edu",
    ):
        load_cub(download=True, data_dir=tmp_path / "cache")
    wrong = tmp_path / "wrong.tgz"
    wrong.write_bytes(b"not the archive")
    monkeypatch.setattr(cub_module, "CUB_URLS", (wrong.as_uri(),))
    with pytest.raises(OSError, match="checksum mismatch"):
        load_cub(download=True, data_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "cub").exists()


def test_sop_download_falls_back_to_the_second_url(tmp_path, monkeypatch):
    source = write("sop", tmp_path / "source" / "Stanford_Online_Products")
    archive = tmp_path / "Stanford_Online_Products.zip"
    with zipfile.ZipFile(archive, "w") as zip_file:
        for path in sorted(source.rglob("*")):
            zip_file.write(path, path.relative_to(source.parent).as_posix())
    urls = ((tmp_path / "ftp-gone.zip").as_uri(), archive.as_uri())
    monkeypatch.setattr(sop_module, "SOP_URLS", urls)
    monkeypatch.setattr(sop_module, "SOP_SHA256", sha256_file(archive))
    with pytest.warns(UserWarning):
        files = load_sop(download=True, data_dir=tmp_path / "cache", val_fraction=VAL)
    assert files.root == tmp_path / "cache" / "sop" / "Stanford_Online_Products"
    assert len(files) == CLASSES * PER_CLASS
