"""Loss modules, each against a reference computed by hand."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from utils_cv.similarity import losses
from utils_cv.similarity.losses import NormSoftmaxLoss, ProxyNCALoss, SoftmaxLoss


def test_softmax_loss_matches_cross_entropy_of_its_linear_layer():
    torch.manual_seed(0)
    loss = SoftmaxLoss(embedding_size=6, num_classes=4)
    embeddings, labels = torch.randn(10, 6), torch.randint(0, 4, (10,))
    weight, bias = loss.classifier.weight, loss.classifier.bias
    expected = F.cross_entropy(embeddings @ weight.T + bias, labels)
    torch.testing.assert_close(loss(embeddings, labels), expected)


def test_softmax_loss_of_a_zero_classifier_is_log_num_classes():
    loss = SoftmaxLoss(embedding_size=3, num_classes=5)
    torch.nn.init.zeros_(loss.classifier.weight)
    torch.nn.init.zeros_(loss.classifier.bias)
    value = loss(torch.randn(7, 3), torch.randint(0, 5, (7,)))
    assert value.item() == pytest.approx(math.log(5))


def test_softmax_loss_trains_its_classifier_and_the_embeddings():
    loss = SoftmaxLoss(embedding_size=4, num_classes=3)
    embeddings = torch.randn(6, 4, requires_grad=True)
    loss(embeddings, torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    for tensor in (embeddings, loss.classifier.weight, loss.classifier.bias):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bfloat16", "float64"])
def test_softmax_loss_takes_embeddings_of_another_dtype_than_its_classifier(dtype):
    # bfloat16 embeddings met the float32 classifier in a matrix product and failed with
    # "mat1 and mat2 must have the same dtype"; both are computed in the wider dtype now.
    torch.manual_seed(0)
    loss = SoftmaxLoss(embedding_size=6, num_classes=4)
    embeddings, labels = torch.randn(10, 6).to(dtype), torch.randint(0, 4, (10,))
    value = loss(embeddings.requires_grad_(), labels)
    value.backward()
    wide = torch.promote_types(dtype, torch.float32)
    weight, bias = loss.classifier.weight.to(wide), loss.classifier.bias.to(wide)
    expected = F.cross_entropy(embeddings.to(wide) @ weight.T + bias, labels)
    assert value.dtype == wide and embeddings.grad.dtype == dtype
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("bad_label", [-1, 3])
def test_softmax_loss_refuses_labels_out_of_range(bad_label):
    loss = SoftmaxLoss(embedding_size=4, num_classes=3)
    with pytest.raises(ValueError, match=f"{bad_label}.*num_classes=3.*relabel"):
        loss(torch.randn(2, 4), torch.tensor([0, bad_label]))


def test_softmax_loss_refuses_embeddings_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        SoftmaxLoss(embedding_size=4, num_classes=3)(torch.randn(2, 5), torch.tensor([0, 1]))


@pytest.mark.parametrize("loss_class", [NormSoftmaxLoss, ProxyNCALoss])
@pytest.mark.parametrize("norm", [1e-10, 1e20, 3e38])
def test_normalizing_losses_do_not_depend_on_the_norms_of_the_embeddings(loss_class, norm):
    """The squared norm of a float32 row of norm 1e20 overflows, and F.normalize returned 0
    for it: the loss was that of zero embeddings (log C), not of their directions."""
    num_classes, dim = 5, 4
    torch.manual_seed(0)
    loss = loss_class(num_classes, dim)
    generator = torch.Generator().manual_seed(0)
    labels = (torch.arange(12) % num_classes)[torch.randperm(12, generator=generator)]
    embeddings = torch.randn(12, dim, generator=generator, dtype=torch.float64)
    unit = F.normalize(embeddings.float(), dim=1)
    x = (unit * norm).requires_grad_()
    value = loss(x, labels)
    value.backward()
    assert value.item() == pytest.approx(loss(unit, labels).item(), rel=1e-6)
    assert torch.isfinite(x.grad).all()


LOSS_FILES = sorted(p for p in Path(losses.__file__).parent.glob("*.py") if p.name != "__init__.py")


def test_every_loss_is_in_its_own_file():
    assert {p.stem for p in LOSS_FILES} >= {"softmax", "triplet"}
    for path in LOSS_FILES:
        modules = [
            node.name
            for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.ClassDef)
            and any(ast.unparse(base) in ("nn.Module", "torch.nn.Module") for base in node.bases)
        ]
        assert len(modules) == 1, f"{path.name} defines {modules}: one loss per file"
    for name in losses.__all__:
        module = getattr(losses, name).__module__
        assert module.startswith("utils_cv.similarity.losses."), (name, module)


@pytest.mark.parametrize("path", LOSS_FILES, ids=lambda p: p.name)
def test_each_loss_file_imports_torch_only(path):
    tree = ast.parse(path.read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, f"{path.name} imports from its own package"
    assert imported <= {"__future__", "torch"}, imported


@pytest.mark.parametrize("path", LOSS_FILES, ids=lambda p: p.name)
def test_each_loss_file_runs_copied_alone(path, tmp_path):
    # Run the file as a script in an empty folder, as someone who copied it would.
    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    code = f"import runpy; runpy.run_path({str(copy)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
