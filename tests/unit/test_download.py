"""Checked, atomic downloads (file:// and a local HTTP server) and safe archive extraction."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile

import pytest

from utils_cv.common.download import download, safe_extract, sha256_file

PAYLOAD = b"metric learning\n" * 1000
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "served" / "data.bin"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


@pytest.fixture
def http_url(source):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(source.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{source.name}"
    server.shutdown()
    server.server_close()


def test_download_file_url_checks_sha(tmp_path, source):
    target = tmp_path / "out" / "data.bin"
    assert download(source.as_uri(), target, PAYLOAD_SHA) == target
    assert target.read_bytes() == PAYLOAD and sha256_file(target) == PAYLOAD_SHA
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.bin"]


def test_download_over_http(tmp_path, http_url):
    target = tmp_path / "data.bin"
    download(http_url, target, PAYLOAD_SHA.upper())
    assert target.read_bytes() == PAYLOAD


def test_checksum_mismatch_writes_nothing(tmp_path, source):
    target = tmp_path / "out" / "data.bin"
    wrong = "0" * 64
    with pytest.raises(ValueError, match=f"checksum mismatch.*expected {wrong}"):
        download(source.as_uri(), target, wrong)
    assert list(target.parent.iterdir()) == []


def test_existing_file_is_kept_or_replaced_by_checksum(tmp_path, source):
    target = tmp_path / "data.bin"
    target.write_bytes(PAYLOAD)
    # Already verified: no fetch at all, so even an unreachable URL works.
    download((tmp_path / "missing").as_uri(), target, PAYLOAD_SHA)
    target.write_bytes(b"stale")
    download(source.as_uri(), target, PAYLOAD_SHA)
    assert target.read_bytes() == PAYLOAD


def test_failed_fetch_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        download((tmp_path / "missing").as_uri(), target, PAYLOAD_SHA)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_bad_sha_argument(tmp_path, source):
    with pytest.raises(ValueError, match="64-character hex"):
        download(source.as_uri(), tmp_path / "x", "abc")


# safe_extract


def _zip(path, names):
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(zipfile.ZipInfo(name), b"content of " + name.encode())
    return path


def _tar(path, members):
    """members: (name, kind, link target) with kind "file" | "dir" | "sym" | "hard" | "fifo"."""
    with tarfile.open(path, "w:gz") as archive:
        for name, kind, target in members:
            info = tarfile.TarInfo(name)
            data = b""
            if kind == "file":
                data = b"content of " + name.encode()
                info.size = len(data)
            info.type = {
                "file": tarfile.REGTYPE,
                "dir": tarfile.DIRTYPE,
                "sym": tarfile.SYMTYPE,
                "hard": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            info.linkname = target or ""
            archive.addfile(info, io.BytesIO(data) if data else None)
    return path


def test_extract_good_archives(tmp_path):
    zipped = _zip(tmp_path / "good.zip", ["a/b.txt", "c.txt"])
    assert safe_extract(zipped, tmp_path / "z") == tmp_path / "z"
    assert (tmp_path / "z" / "a" / "b.txt").read_bytes() == b"content of a/b.txt"
    tarred = _tar(
        tmp_path / "good.tar.gz",
        [("d", "dir", None), ("d/x.txt", "file", None), ("d/link", "sym", "x.txt")],
    )
    safe_extract(tarred, tmp_path / "t")
    assert (tmp_path / "t" / "d" / "link").read_bytes() == b"content of d/x.txt"


@pytest.mark.parametrize(
    "names, reason",
    [
        (["ok.txt", "../evil.txt"], "contains '..'"),
        (["/abs/evil.txt"], "absolute path"),
        (["C:/evil.txt"], "absolute path"),
        (["a\\..\\..\\evil.txt"], "contains '..'"),
    ],
)
def test_zip_traversal_refused(tmp_path, names, reason):
    archive = _zip(tmp_path / "bad.zip", names)
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match=reason):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize(
    "members, reason",
    [
        ([("ok.txt", "file", None), ("../evil.txt", "file", None)], "contains '..'"),
        ([("/tmp/evil.txt", "file", None)], "absolute path"),
        ([("link", "sym", "/etc")], "absolute path"),
        ([("d/link", "sym", "../../outside")], "outside the destination"),
        ([("hard", "hard", "../outside")], "contains|outside"),
        ([("here", "sym", "."), ("here/x.txt", "file", None)], "goes through the link"),
        ([("here", "sym", "."), ("up", "sym", "here/..")], "goes through the link"),
        ([("pipe", "fifo", None)], "device or pipe"),
    ],
)
def test_tar_traversal_and_links_refused(tmp_path, members, reason):
    archive = _tar(tmp_path / "bad.tar.gz", members)
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match=reason):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []


def test_not_an_archive(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        safe_extract(path, tmp_path / "dest")
