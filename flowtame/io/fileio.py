"""Atomic output files: write to a temporary file beside the target, then rename over it.

Every file flowtame writes goes through :func:`atomic_path` (directly or through the writers here), which maps
the operating system's errors (no space, read-only file system, permission, name too long, ...) to one
:class:`~flowtame.errors.OutputWriteError` naming the file, and removes the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from flowtame.data.images import IMAGE_EXTENSIONS, LIST_EXTENSION, list_file_paths
from flowtame.errors import DataError, InputError, OutputExistsError, OutputWriteError

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "is a directory",
    errno.EIO: "input/output error",
}


def write_error_reason(exc: BaseException) -> str:
    """A short reason for a failed write: an OSError, or safetensors' error (which carries "os error N")."""
    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code in _REASONS:
        return _REASONS[code]
    if code is not None:
        return os.strerror(code).lower()
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text


def _write_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, SafetensorError)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file ``path`` leads to (symlinks followed), or None when there is none."""
    try:
        found = os.stat(path)
    except (OSError, ValueError):
        return None
    return found.st_dev, found.st_ino


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
    except ValueError:
        return False
    return True


def check_not_an_input(output: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse to write ``output`` over one of the command's ``inputs``, whatever ``--force`` says.

    The same file is caught by path, through a symlink or a hard link (same device and inode); an image file
    inside an input folder counts as that folder's input, and an image a ``.txt`` list names as that list's.
    Embedded sources (``embedded:...``) and ``-`` (stdout)
    are skipped; pass checkpoint paths resolved (an embedded model's file is an input too). Raises InputError.
    """
    output = Path(output)
    out_identity = _identity(output)
    for source in inputs:
        if source is None or str(source) == "-" or str(source).startswith("embedded:"):
            continue
        source_path = Path(source)
        same = os.path.abspath(source_path) == os.path.abspath(output) or (
            out_identity is not None and out_identity == _identity(source_path))
        in_folder = (source_path.is_dir() and output.suffix.lower() in IMAGE_EXTENSIONS
                     and _inside(output, source_path))
        listed = not same and not in_folder and _listed_by(output, source_path)
        if same or in_folder or listed:
            what = "is" if same else ("is listed in" if listed else "lies in")
            raise InputError(f"{output}: {what} an input of this command ({source}); refusing to write over it "
                             "(--force does not change this): choose another output path")


def _listed_by(output: Path, source: Path) -> bool:
    """Whether ``source`` is a readable ``.txt`` image list that names ``output`` (an unreadable list is the
    data loader's error to report, not this check's)."""
    if source.suffix.lower() != LIST_EXTENSION or not source.is_file():
        return False
    try:
        listed = list_file_paths(source)
    except DataError:
        return False
    out_identity = _identity(output)
    return any(os.path.abspath(entry) == os.path.abspath(output)
               or (out_identity is not None and out_identity == _identity(entry)) for entry in listed)


def check_output_path(path: str | Path, force: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse to overwrite an existing file unless ``force``; refuse a folder or a path that cannot exist, and
    a path that is one of ``inputs`` (:func:`check_not_an_input`) whatever ``force`` says."""
    path = Path(path)
    check_not_an_input(path, inputs)
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise OutputWriteError(f"{path}: cannot write ({write_error_reason(exc)})") from None
    if exists and not force:
        raise OutputExistsError(f"{path}: already exists (overwriting needs force)", keys=("force",))
    if exists and path.is_dir():
        raise OutputExistsError(f"{path}: is a directory, not a file")
    return path


def _new_file_mode() -> int:
    """The permission bits ``open()`` would give a new file under the current umask (mkstemp uses 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to ``path``, else delete it.

    The result gets the permissions of a normally created file (umask applied), not mkstemp's private 0600,
    and is flushed to the disk (fsync) before the rename. An OSError or safetensors error while creating,
    writing or renaming becomes an :class:`OutputWriteError` naming ``path``.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _new_file_mode())
        os.replace(tmp_path, path)
    except _write_errors() as exc:
        raise OutputWriteError(f"{path}: cannot write ({write_error_reason(exc)})") from None
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()


def save_safetensors_atomic(path: str | Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (CPU, contiguous) with ``metadata`` to ``path`` as safetensors, atomically.

    The written size is checked against the header (safetensors can drop the error of its last buffered
    write), so a short file never replaces ``path``.
    """
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _check_safetensors_size(path, tmp)


def _check_safetensors_size(path: str | Path, tmp: Path) -> None:
    with open(tmp, "rb") as fh:
        head = fh.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = json.loads(fh.read(header_len)) if header_len >= 0 else {}
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if header_len < 0 or os.path.getsize(tmp) != expected:
        raise OutputWriteError(f"{path}: cannot write (the file came out short: the device may be full)")


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_safe(obj):
    """Recursively replace NaN and infinities (not valid JSON) by None; NumPy scalars become Python ones."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON to a file atomically, or to stdout when ``path`` is ``-``. NaN/inf are written as null."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"
    if str(path) == "-":
        import sys

        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_text_atomic(path, text)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
