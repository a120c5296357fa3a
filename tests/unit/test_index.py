import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.image_folders import file_list, pattern
from utils_cv.similarity.binary import binarize
from utils_cv.similarity.catalogue import (
    index_images,
    load_query_images,
    query_geometry,
    search_images,
)
from utils_cv.similarity.datasets.base import ImageData
from utils_cv.similarity.index import KINDS, EmbeddingIndex, model_identity
from utils_cv.similarity.models import EmbeddingNet
from utils_cv.similarity.search import nearest_neighbors


def clustered(n=600, dim=32, centres=20, seed=0):
    """Unit-ish vectors around a few centres, with exact duplicates at the end (ties)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(centres, dim))[rng.integers(0, centres, n)] + 0.3 * rng.normal(
        size=(n, dim)
    )
    x[-20:] = x[:20]
    return x.astype(np.float32)


def overlap(found, exact):
    """Share of the exact neighbours that the approximate search found (k-recall@k)."""
    return np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)])


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "squared_euclidean"])
def test_flat_index_gives_exactly_the_neighbours_of_nearest_neighbors_ties_included(metric):
    x = clustered()
    queries = np.concatenate([x[:30], x[-5:]])  # their duplicates tie with them
    index = EmbeddingIndex(x.shape[1], "flat", metric).add(x)
    distances, ids = index.search(queries, k=7)
    want_d, want_i = nearest_neighbors(queries, x, k=7, metric=metric, device="cpu")
    np.testing.assert_array_equal(ids, want_i.numpy())
    np.testing.assert_allclose(distances, want_d.numpy(), atol=1e-5)
    assert ids[0, :2].tolist() == [0, 580]  # the query and its duplicate, in index order


def test_binary_flat_index_is_exact_hamming_search_of_the_sign_codes():
    x = clustered(dim=64)
    index = EmbeddingIndex(64, "binary_flat").add(x)
    distances, ids = index.search(x[:50], k=10)
    want_d, want_i = nearest_neighbors(binarize(x[:50]), binarize(x), k=10, metric="hamming")
    np.testing.assert_array_equal(ids, want_i.numpy())
    np.testing.assert_array_equal(distances, want_d.numpy())
    # Packed codes are accepted as well as float embeddings.
    np.testing.assert_array_equal(index.search(binarize(x[:50]), k=10)[1], ids)
    assert index.memory_bytes() < EmbeddingIndex(64, "flat").add(x).memory_bytes() / 16


def test_ivf_flat_scanning_every_cell_is_exact_and_fewer_cells_miss_some():
    x = clustered(n=2000, seed=1)[:-20]  # no duplicates: ties would make the order arbitrary
    exact = EmbeddingIndex(32, "flat", "euclidean").add(x).search(x[:200], k=10)[1]
    index = EmbeddingIndex(32, "ivf_flat", "euclidean", nlist=40, nprobe=40).add(x)
    assert overlap(index.search(x[:200], k=10)[1], exact) == 1.0
    index.set_search_params(nprobe=1)
    assert overlap(index.search(x[:200], k=10)[1], exact) < 1.0


@pytest.mark.parametrize(
    ("kind", "options", "least"),
    [("hnsw", {"ef_search": 128}, 0.95), ("ivf_pq", {"pq_bytes": 8, "nprobe": 16}, 0.3)],
)
def test_approximate_kinds_find_most_exact_neighbours(kind, options, least):
    x = clustered(n=3000, seed=2)[:-20]
    exact = EmbeddingIndex(32, "flat").add(x).search(x[:200], k=10)[1]
    found = EmbeddingIndex(32, kind, **options).add(x).search(x[:200], k=10)[1]
    random = overlap(np.random.default_rng(0).integers(0, len(x), (200, 10)), exact)
    assert overlap(found, exact) >= least > 10 * random


@pytest.mark.parametrize("kind", KINDS)
def test_saved_index_loads_with_its_ids_labels_paths_and_model(tmp_path, kind):
    x = clustered(n=1200, seed=3)
    identity = {"name": "m", "weights_sha256": "ab", "image_size": 8, "mean": None, "std": None}
    index = EmbeddingIndex(32, kind, model=identity, nprobe=4, ef_search=16)
    index.add(x, labels=[f"c{i % 7}" for i in range(len(x))], paths=[f"{i}.png" for i in range(len(x))], ids=np.arange(len(x)) + 1000)  # fmt: skip
    before = index.search(x[:20], k=5)
    loaded = EmbeddingIndex.load(index.save(tmp_path / "index"))
    after = loaded.search(x[:20], k=5)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    assert before[1].min() >= 1000  # the given ids, not positions
    assert (loaded.labels[5], loaded.paths[5], loaded.model) == ("c5", "5.png", identity)
    assert (loaded.kind, loaded.metric, loaded.params) == (index.kind, index.metric, index.params)


def test_an_index_saved_by_one_process_is_loaded_and_queried_by_another(tmp_path):
    x = clustered(n=800, seed=4)[:-20]  # without duplicates, each query finds itself first
    index = EmbeddingIndex(32, "hnsw").add(x, labels=list(range(len(x))))
    index.save(tmp_path / "index")
    np.save(tmp_path / "queries.npy", x[:10])
    script = (
        "import json, sys, numpy as np\n"
        "from utils_cv.similarity.index import EmbeddingIndex\n"
        "index = EmbeddingIndex.load(sys.argv[1] + '/index')\n"
        "d, i = index.search(np.load(sys.argv[1] + '/queries.npy'), k=4)\n"
        "print(json.dumps({'ids': i.tolist(), 'labels': [index.labels[j] for j in i[:, 0]]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ids"] == index.search(x[:10], k=4)[1].tolist()
    assert result["labels"] == list(range(10))


def test_saving_again_replaces_the_folder_whole(tmp_path):
    x = clustered(n=300)
    EmbeddingIndex(32).add(x).save(tmp_path / "index")
    EmbeddingIndex(32).add(x[:100]).save(tmp_path / "index")
    assert len(EmbeddingIndex.load(tmp_path / "index")) == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary folder left


def test_bad_requests_get_errors_that_name_the_fix(tmp_path):
    x = clustered(n=300)
    with pytest.raises(ValueError, match="kind='ivf' is not an index kind"):
        EmbeddingIndex(32, "ivf")
    with pytest.raises(ValueError, match="pq_bytes=5 must divide"):
        EmbeddingIndex(32, "ivf_pq", pq_bytes=5)
    with pytest.raises(ValueError, match="metric='dot'"):
        EmbeddingIndex(32, metric="dot")
    index = EmbeddingIndex(32).add(x)
    with pytest.raises(ValueError, match=r"shape \(2, 16\).*size 32"):
        index.search(np.zeros((2, 16), np.float32))
    with pytest.raises(ValueError, match="k=301"):
        index.search(x[:2], k=301)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match="labels has 2 entries for 300"):
        EmbeddingIndex(32).add(x, labels=[0, 1])
    with pytest.raises(ValueError, match="nlist=50"):
        EmbeddingIndex(32, "ivf_flat", nlist=50).add(x[:40])
    with pytest.raises(FileNotFoundError, match="not a saved index"):
        EmbeddingIndex.load(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        EmbeddingIndex(32).save(tmp_path / "empty")


def test_queries_of_another_model_are_refused():
    torch.manual_seed(0)
    model, other = EmbeddingNet("small_cnn", 16), EmbeddingNet("small_cnn", 16)
    index = EmbeddingIndex(16, model=model_identity(model, 24)).add(torch.randn(20, 16))
    index.search(torch.randn(2, 16), k=3, model=model_identity(model, 24))  # the same: fine
    with pytest.raises(ValueError, match="another model.*weights_sha256"):
        index.search(torch.randn(2, 16), k=3, model=model_identity(other, 24))
    with pytest.raises(ValueError, match="image_size 32 against the index's 24"):
        index.search(torch.randn(2, 16), k=3, model=model_identity(model, 32))
    with pytest.raises(ValueError, match="crop_pct 0.875 against the index's 1.0"):
        index.search(torch.randn(2, 16), k=3, model=model_identity(model, 24, crop_pct=0.875))
    del index.model["crop_pct"]  # an index saved before identities stored it: the whole side
    index.search(torch.randn(2, 16), k=3, model=model_identity(model, 24))


def test_a_file_list_catalogue_gives_its_crop_to_the_queries(tmp_path):
    """Indexed from files at crop_pct 0.875 (the papers' 256 -> 224), a catalogue file used
    as a query is loaded with the same crop, so it finds itself at distance 0; at the whole
    shorter side it would be another picture."""
    torch.manual_seed(0)
    model, paths = EmbeddingNet("small_cnn", 16), []
    for i in range(6):  # 32 x 40 pictures: not square, so the crop matters
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(pattern(i, i, 40)[:32]).save(paths[-1])
    files = replace(file_list(paths), crop_pct=0.875)
    index = index_images(model, files, image_size=24, num_workers=0)
    assert index.model["crop_pct"] == 0.875 and index.paths == [str(p) for p in paths]
    in_memory = index_images(model, files.load(24), image_size=24, crop_pct=0.875)
    assert in_memory.model == index.model
    probe = torch.randn(3, 16)
    for got, want in zip(index.search(probe, k=6), in_memory.search(probe, k=6), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert query_geometry(index) == (24, 0.875)
    queries = load_query_images([paths[4]], *query_geometry(index))
    assert torch.equal(queries[0], files.load(24).images[4])
    assert not torch.equal(load_query_images([paths[4]], 24)[0], queries[0])
    (found, *_), *_ = search_images(model, index, [paths[4]], k=2)
    assert found["path"] == str(paths[4]) and found["distance"] < 1e-5
    with pytest.raises(ValueError, match="crop_pct=1.0 but the FileList crops at 0.875"):
        index_images(model, files, image_size=24, crop_pct=1.0)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=f"crop_pct={bad} must be in"):
            index_images(model, files.load(24), image_size=24, crop_pct=bad)


def catalogue_data(size=24, count=12):
    """Coloured squares on white, one class per colour pair."""
    rng = np.random.default_rng(0)
    images = np.full((count, size, size, 3), 255, np.uint8)
    for i in range(count):
        images[i, 2:10, 2:22] = rng.integers(0, 255, 3)  # a bar at the top: not symmetric
    return ImageData(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.arange(count) // 2,
        class_names=[f"class {i}" for i in range(count // 2)],
        splits=["test"] * count, domains=[""] * count, paths=[f"/catalogue/{i}.png" for i in range(count)],
    )  # fmt: skip


def test_search_images_queries_with_files_loaded_as_the_datasets_load_them(tmp_path):
    torch.manual_seed(0)
    model, data = EmbeddingNet("small_cnn", 16), catalogue_data()
    index = index_images(model, data, image_size=24)
    # Image 3 as an RGBA file with a transparent border (composited on white, as stored)
    # and as a JPEG stored sideways with an EXIF tag that turns it upright.
    rgba = np.zeros((48, 48, 4), np.uint8)
    picture = Image.fromarray(data.images[3].permute(1, 2, 0).numpy()).resize((40, 40))
    rgba[4:44, 4:44, :3], rgba[4:44, 4:44, 3] = np.asarray(picture), 255
    Image.fromarray(rgba).save(tmp_path / "query.png")
    upright = Image.fromarray(data.images[5].permute(1, 2, 0).numpy()).resize((48, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    upright.rotate(90, expand=True).save(tmp_path / "query.jpg", exif=exif, quality=95)
    loaded = load_query_images([tmp_path / "query.png", tmp_path / "query.jpg"], 24)
    assert loaded.shape == (2, 3, 24, 24) and loaded[0, :, 0, 0].tolist() == [255, 255, 255]
    error = (loaded[1].float() - data.images[5].float()).abs().mean()  # upright again
    assert error < 10 < (loaded[1].float() - data.images[5].float().rot90(1, (1, 2))).abs().mean()
    results = search_images(model, index, [tmp_path / "query.png", tmp_path / "query.jpg"], k=3)
    assert [r[0]["path"] for r in results] == ["/catalogue/3.png", "/catalogue/5.png"]
    assert results[0][0]["label"] == "class 1" and results[0][0]["rank"] == 1
    assert [r["distance"] for r in results[1]] == sorted(r["distance"] for r in results[1])
    with pytest.raises(ValueError, match="another model"):
        search_images(EmbeddingNet("small_cnn", 16), index, [tmp_path / "query.png"])


def test_search_images_names_a_missing_or_unreadable_file(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        load_query_images([tmp_path / "missing.png"], 24)
    with pytest.raises(ValueError, match="notes.png cannot be read as an image"):
        load_query_images([tmp_path / "notes.png"], 24)


def test_saving_refuses_a_folder_that_is_not_an_index_and_leaves_it_alone(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"my photo")
    with pytest.raises(FileExistsError, match="not a saved index"):
        EmbeddingIndex(32).add(clustered(n=50)).save(tmp_path / "photos")
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]


def test_a_refused_add_changes_nothing():
    x = clustered(n=500)
    index, index_pq = EmbeddingIndex(32, "ivf_flat"), EmbeddingIndex(32, "ivf_pq")
    with pytest.raises(ValueError, match="PQ codebooks"):
        index_pq.add(x[:100])
    index_pq.add(x)  # the failed add above did not fix nlist from its 100 rows
    assert index_pq.params["nlist"] == min(int(4 * 500**0.5), 500 // 39)
    index.add(x[:100], ids=np.arange(100))
    with pytest.raises(ValueError, match="unique"):
        index.add(x[100:110], ids=np.arange(95, 105))
    with pytest.raises(ValueError, match="non-negative integers"):
        index.add(x[100:102], ids=[-1, 7000])
    assert len(index) == index._faiss.ntotal == 100
    index.add(x[100:110])  # default ids continue after the largest
    assert index.ids[-1] == 109


def test_labels_are_saved_as_json_values(tmp_path):
    x = clustered(n=30)
    labels = [np.int64(1), None, "a"] * 10
    index = EmbeddingIndex(32).add(x, labels=labels)
    loaded = EmbeddingIndex.load(index.save(tmp_path / "index"))
    assert loaded.labels[:3] == [1, None, "a"]
    with pytest.raises(ValueError, match="labels must be strings, numbers or None"):
        EmbeddingIndex(32).add(x[:2], labels=[object(), object()])


def test_binary_index_checks_the_width_of_float_queries_and_load_checks_the_folder(tmp_path):
    index = EmbeddingIndex(32, "binary_flat").add(clustered(n=40))
    with pytest.raises(ValueError, match=r"shape \(2, 30\).*size 32"):
        index.search(np.ones((2, 30), np.float32))
    index.save(tmp_path / "index")
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    meta["ids"] = meta["ids"][:-1]
    (tmp_path / "index" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="inconsistent"):
        EmbeddingIndex.load(tmp_path / "index")
