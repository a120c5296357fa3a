import matplotlib

matplotlib.use("Agg")

import datetime  # noqa: E402
import io  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from PIL import Image  # noqa: E402

from utils_cv.similarity import plot  # noqa: E402
from utils_cv.similarity.index import EmbeddingIndex, model_identity  # noqa: E402
from utils_cv.similarity.models import EmbeddingNet, embed  # noqa: E402

K = 5


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def catalogue():
    """40 embeddings of 16 dims around 4 overlapping centres (labels), image i filled with i.

    Query 14 finds 3 of its class and 2 of others among its 5 nearest in "flat".
    """
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    x = rng.normal(size=(4, 16))[labels] + 1.0 * rng.normal(size=(40, 16))
    embeddings = torch.as_tensor(x, dtype=torch.float32)
    images = torch.arange(40, dtype=torch.uint8)[:, None, None, None].expand(40, 3, 6, 6).clone()
    indexes = {
        kind: EmbeddingIndex(16, kind).add(embeddings, labels=labels)
        for kind in ("flat", "binary_flat")
    }
    return indexes, embeddings, images, labels


def expected(index, embeddings, query, k=K):
    """What the browser should show: the index's k + 1 neighbours without the query itself."""
    distances, ids = index.search(embeddings[query : query + 1], k + 1)
    keep = ids[0] != query
    return distances[0][keep][:k], ids[0][keep][:k]


def png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image).transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def uploaded(content):
    """The value a FileUpload holds once the frontend sent a file."""
    now = datetime.datetime.now(datetime.UTC)
    return ({"name": "q.png", "type": "image/png", "size": len(content),
             "content": memoryview(content), "last_modified": now},)  # fmt: skip


def test_set_query_shows_the_index_neighbours_without_the_query(catalogue):
    indexes, embeddings, images, labels = catalogue
    browser = plot.RetrievalBrowser(indexes, embeddings, images, k=K, query=3)
    assert browser.kind == "flat" and browser.query == 3
    for query in (3, 17, 39):
        browser.set_query(query)
        distances, ids = expected(indexes["flat"], embeddings, query)
        np.testing.assert_array_equal(browser.positions, ids)
        np.testing.assert_allclose(browser.distances, distances, rtol=1e-6)
        assert query not in browser.positions
        np.testing.assert_array_equal(browser.query_image, images[query].numpy())
    # The labels come from the index when none are given.
    assert browser.labels == labels.tolist()


def test_click_makes_the_result_the_query(catalogue):
    indexes, embeddings, images, _ = catalogue
    browser = plot.RetrievalBrowser(indexes, embeddings, images, k=K, query=5)
    third = int(browser.positions[2])
    browser.click(2)
    assert browser.query == third
    np.testing.assert_array_equal(
        browser.positions, expected(indexes["flat"], embeddings, third)[1]
    )
    with pytest.raises(ValueError, match=f"rank={K} but there are {K} results"):
        browser.click(K)


def test_set_kind_searches_the_other_index_for_the_same_query(catalogue):
    indexes, embeddings, images, _ = catalogue
    browser = plot.RetrievalBrowser(indexes, embeddings, images, k=K, query=8)
    browser.set_kind("binary_flat")
    assert browser.kind == "binary_flat" and browser.query == 8
    distances, ids = expected(indexes["binary_flat"], embeddings, 8)
    np.testing.assert_array_equal(browser.positions, ids)
    np.testing.assert_array_equal(browser.distances, distances)  # Hamming: whole bits
    assert np.all(browser.distances == np.round(browser.distances))
    with pytest.raises(
        ValueError, match=r"no index named 'ivf'; use one of \['flat', 'binary_flat'\]"
    ):
        browser.set_kind("ivf")
    assert browser.kind == "binary_flat"  # a failed change leaves the state as it was


def test_widget_controls_drive_the_same_state(catalogue):
    indexes, embeddings, images, _ = catalogue
    browser = plot.RetrievalBrowser(indexes, embeddings, images, k=K, query=0, examples=[12, 30])
    box = browser.widget()  # built without a frontend, as under papermill
    ui = browser._ui
    assert box is ui.box and browser.widget() is box
    assert ui.query_image.value == png_bytes(images[0])

    ui.kind.value = "binary_flat"
    assert browser.kind == "binary_flat"
    np.testing.assert_array_equal(
        browser.positions, expected(indexes["binary_flat"], embeddings, 0)[1]
    )

    second = int(browser.positions[1])
    ui.buttons[1].click()
    assert browser.query == second and ui.query.value == second
    assert ui.query_image.value == png_bytes(images[second])
    assert ui.images[0].value == png_bytes(images[browser.positions[0]])

    ui.query.value = 21
    assert browser.query == 21
    ui.examples.value = 30
    assert browser.query == 30 and ui.query.value == 30

    # Calls from code show in the widget too.
    browser.set_kind("flat")
    browser.click(0)
    assert ui.kind.value == "flat" and ui.query.value == browser.query
    browser.set_query(14)
    assert ui.query.value == 14 and ui.examples.value is None
    # Same label as the query: green frame and "match"; another label: red and "no match".
    matches = [browser.labels[p] == browser.labels[14] for p in browser.positions]
    assert sum(matches) == 3
    for rank, match in enumerate(matches):
        color = "#2ca02c" if match else "#d62728"  # tab:green, tab:red
        assert ui.images[rank].layout.border == f"4px solid {color}"
        assert ("<br>match" if match else "<br>no match") in ui.captions[rank].value


def test_widget_shows_errors_instead_of_raising(catalogue):
    indexes, embeddings, images, _ = catalogue
    browser = plot.RetrievalBrowser(indexes, embeddings, images, k=K)
    browser.widget()
    ui = browser._ui
    ui.upload.value = uploaded(b"not an image")
    assert "needs the embedding model" in ui.status.value
    assert ui.upload.value == ()  # emptied, so that the same file can be sent again
    ui.buttons[0].click()
    assert ui.status.value == ""


def test_upload_finds_the_catalogue_image_first():
    torch.manual_seed(0)
    model = EmbeddingNet("small_cnn", 16)
    images = torch.randint(0, 256, (40, 3, 24, 24), dtype=torch.uint8)
    labels = np.arange(40) % 4
    embeddings = embed(model, images)
    index = EmbeddingIndex(16, "flat", model=model_identity(model, 24)).add(
        embeddings, labels=labels
    )
    browser = plot.RetrievalBrowser({"flat": index}, embeddings, images, k=K, model=model)

    browser.upload(png_bytes(images[7]))
    assert browser.query is None
    assert browser.positions[0] == 7 and browser.distances[0] < 1e-4
    assert len(browser.positions) == K
    np.testing.assert_array_equal(browser.query_image, images[7].numpy())
    # An uploaded image has no label: no match marks, in the figure or in the widget.
    fig = browser.figure()
    for ax in fig.axes[1:]:
        assert to_rgba(ax.spines["left"].get_edgecolor()) == to_rgba(plot.TILE_EDGE_COLOR)
        assert "match" not in ax.get_title()
    assert fig.axes[0].get_title() == "query\nuploaded image"

    # The same through the widget's FileUpload.
    browser.set_query(0)
    browser.widget()
    browser._ui.upload.value = uploaded(png_bytes(images[11]))
    assert browser.query is None and browser.positions[0] == 11
    assert browser._ui.images[0].layout.border == "1px solid lightgray"

    with pytest.raises(ValueError, match="not an image; upload a JPEG or a PNG"):
        browser.upload(b"definitely not a PNG")
    assert browser.positions[0] == 11  # unchanged


def test_upload_errors_name_the_fix(catalogue):
    indexes, embeddings, images, _ = catalogue
    browser = plot.RetrievalBrowser(indexes, embeddings, images, k=K)
    with pytest.raises(
        ValueError, match=r"needs the embedding model: RetrievalBrowser\(\.\.\., model=model\)"
    ):
        browser.upload(png_bytes(images[0]))
    browser.model = EmbeddingNet("small_cnn", 16)
    with pytest.raises(ValueError, match="does not say which model made it"):
        browser.upload(png_bytes(images[0]))
    assert browser.query == 0


def test_constructor_errors_name_the_fix(catalogue):
    indexes, embeddings, images, labels = catalogue
    with pytest.raises(ValueError, match="the embeddings hold 39 images but index 'flat' holds 40"):
        plot.RetrievalBrowser({"flat": indexes["flat"]}, embeddings[:39], images[:39])
    with pytest.raises(ValueError, match="labels holds 39"):
        plot.RetrievalBrowser(indexes, embeddings, images, labels=labels[:39])
    with pytest.raises(ValueError, match="query 40 is out of range: use 0 to 39"):
        plot.RetrievalBrowser(indexes, embeddings, images, query=40)
    with pytest.raises(ValueError, match="query -1 is out of range"):
        plot.RetrievalBrowser(indexes, embeddings, images).set_query(-1)
    with pytest.raises(ValueError, match="k=40 must be between 1 and 39"):
        plot.RetrievalBrowser(indexes, embeddings, images, k=40)
    with pytest.raises(ValueError, match="indexes is empty"):
        plot.RetrievalBrowser({}, embeddings, images)


def test_figure_shows_query_results_distances_and_marks(catalogue):
    indexes, embeddings, images, labels = catalogue
    names = [f"class {label}" for label in labels]
    browser = plot.RetrievalBrowser(indexes, embeddings, images, labels=names, k=K, query=14)
    fig = browser.figure()
    assert len(fig.axes) == K + 1
    assert all(len(ax.images) == 1 for ax in fig.axes)
    values = [int(np.asarray(ax.images[0].get_array())[0, 0, 0]) for ax in fig.axes]
    assert values == [14, *browser.positions.tolist()]
    assert fig.axes[0].get_title() == "query\n#14 class 1"
    assert fig.get_suptitle() == "flat index"
    matches = [names[p] == names[14] for p in browser.positions]
    assert sum(matches) == 3  # both marks drawn
    for rank, (ax, position) in enumerate(zip(fig.axes[1:], browser.positions, strict=True)):
        match = matches[rank]
        title = ax.get_title()
        assert title.startswith(f"rank: {rank + 1}, dist: {browser.distances[rank]:.2f}")
        assert ("\nmatch\n" if match else "\nno match\n") in title and title.endswith(
            names[position]
        )
        color = plot.MATCH_COLOR if match else plot.MISMATCH_COLOR
        assert to_rgba(ax.spines["left"].get_edgecolor()) == to_rgba(color)
    browser.set_kind("binary_flat")
    assert browser.figure().get_suptitle() == "binary_flat index"
