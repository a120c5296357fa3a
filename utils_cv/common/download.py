"""Downloads verified by checksum and written atomically; archives extracted safely.

A download goes to a temporary file next to its destination and is renamed into
place only when its sha256 matches, so an interrupted or corrupted download never
leaves a file that looks complete. Archives are checked member by member before
anything is written: absolute names, ``..`` components, links that point outside
the destination (or paths that go through a link) and special files are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import tarfile
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, path: str | os.PathLike, sha256: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to the file ``path`` unless it is already there with this sha256.

    url: http(s):// or file:// URL; sha256: expected hex digest of the file (64 characters).
    The data is written to a temporary file in the same folder and renamed to ``path``
    (an atomic replace) only after its checksum matched.
    Raises ValueError on a checksum mismatch (nothing is written) and urllib's errors when
    the URL cannot be fetched. Returns ``path``.
    """
    expected = sha256.lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ValueError(f"sha256={sha256!r} is not a 64-character hex digest")
    path = Path(path)
    if path.is_file() and sha256_file(path) == expected:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    # Same folder, so the final rename is atomic; open() (unlike tempfile) keeps the umask.
    part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        with open(part, "xb") as file, urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                file.write(chunk)
        if digest.hexdigest() != expected:
            raise ValueError(
                f"checksum mismatch for {url}: sha256 {digest.hexdigest()}, expected {expected}; "
                f"the file was not saved to {path}. Retry, or check the URL and the checksum."
            )
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path


def check_member_name(name: str, archive: Path) -> str:
    """The member name normalized to a relative POSIX path; ValueError for an absolute name
    or one with a ``..`` component (what an extraction must never write)."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or re.match(r"[A-Za-z]:", unified):
        raise ValueError(f"unsafe archive {archive}: member {name!r} has an absolute path")
    if ".." in unified.split("/"):
        raise ValueError(f"unsafe archive {archive}: member {name!r} contains '..'")
    return unified


def _walk(path: str, links: set[str], name: str, archive: Path) -> str:
    """Resolve ``path`` (relative to the destination) lexically; refuses going above the
    destination or through a link of the archive, whose real target a lexical walk cannot see.
    """
    parts: list[str] = []
    components = [c for c in path.split("/") if c not in ("", ".")]
    for i, component in enumerate(components):
        if component == "..":
            if not parts:
                raise ValueError(
                    f"unsafe archive {archive}: member {name!r} points outside the destination"
                )
            parts.pop()
            continue
        parts.append(component)
        if i < len(components) - 1 and "/".join(parts) in links:
            raise ValueError(
                f"unsafe archive {archive}: member {name!r} goes through the link "
                f"{'/'.join(parts)!r}"
            )
    return "/".join(parts) or "."


def _check_tar(tar: tarfile.TarFile, archive: Path) -> None:
    links: set[str] = set()
    for member in tar.getmembers():
        name = _walk(check_member_name(member.name, archive), links, member.name, archive)
        if member.issym() or member.islnk():
            if member.linkname.startswith("/"):
                raise ValueError(
                    f"unsafe archive {archive}: link {member.name!r} points to the absolute "
                    f"path {member.linkname!r}"
                )
            # Symbolic links are relative to their folder, hard links to the archive root.
            base = posixpath.dirname(name) if member.issym() else ""
            _walk(posixpath.join(base, member.linkname), links, member.name, archive)
            links.add(name)
        elif not (member.isfile() or member.isdir()):
            raise ValueError(
                f"unsafe archive {archive}: member {member.name!r} is a device or pipe"
            )


@contextlib.contextmanager
def _refused_whole(archive: Path) -> Iterator[None]:
    """Say, with a check's error, that nothing was extracted and what to do."""
    try:
        yield
    except ValueError as error:
        raise ValueError(
            f"{error}; nothing was extracted. Such an archive is damaged or was tampered "
            f"with: download it again from its official source"
        ) from None


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a zip or tar (plain, .gz, .bz2, .xz) archive into ``dest``.

    Every member is checked before anything is written; the whole archive is refused
    (ValueError naming the member) when a name is absolute or contains ``..``, when a
    link points outside ``dest`` or a path goes through a link in the archive, or when a
    member is a device or pipe. Returns ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zip_file:
            with _refused_whole(archive):
                for name in zip_file.namelist():
                    check_member_name(name, archive)
            zip_file.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            with _refused_whole(archive):
                _check_tar(tar, archive)
            if hasattr(tarfile, "data_filter"):
                # Python's own filter re-checks the real paths while writing.
                tar.extractall(dest, filter="data")
            else:
                tar.extractall(dest)
    else:
        raise ValueError(f"{archive} is neither a zip nor a tar archive")
    return dest
