"""Image sources, the one preprocessing policy, per-image keys and seeded dequantization noise.

Sources (:func:`open_images`):

- a folder, searched recursively for ``.png .jpg .jpeg .bmp .webp .tif .tiff`` (any case), in the sorted
  order of the paths relative to the folder;
- a single image file;
- a ``.txt`` list file: one image path per line, relative paths taken relative to the list's folder; blank
  lines and lines starting with ``#`` are ignored;
- ``embedded:digits[:SPLIT][:CLASS]``: the handwritten digits shipped in the package (SPLIT all|train|test,
  default all; CLASS 0-9), displayed as ``embedded:digits#INDEX`` (INDEX into all 1,797 digits).

Preprocessing (:func:`preprocess`), the same for every source, gives uint8 pixels of shape [C, S, S] for a
model with C channels and image size S:

1. the EXIF orientation is applied (``PIL.ImageOps.exif_transpose``);
2. 16-bit grayscale is reduced to 8 bits (v >> 8); the image is converted to ``L`` (C = 1) or ``RGB``
   (C = 3) with Pillow's conversions (alpha dropped, palettes expanded, RGB -> L by ITU-R 601-2 luma);
3. it is resized with Pillow's bicubic filter so that its short side is S (aspect ratio kept, the long side
   rounded), then centre-cropped to S x S (an odd extra pixel is cut on the right or bottom).

Quantization to the model's ``n_bits`` happens later (:func:`flowtame.data.quantization.quantize`). An image's key
is the sha256 of its preprocessed pixels (:func:`pixel_key`), so identical pixels share a key wherever they
come from, and :func:`dequantization_noise` draws each image's noise from (seed, key).

Bad files. Opening a source only lists it: a missing path, or a folder or list without image files, raises
:class:`~flowtame.errors.DataError` at once. Each file is decoded when the set is first read through
(:meth:`ImageSet.iter_batches`, which :func:`flowtame.likelihood.nll.compute_nll` streams;
:meth:`ImageSet.load_tensor`; :meth:`ImageSet.validate`; or the first use of ``len()``, ``paths``, ``keys``
or ``pixels()``, which validate).
A file that cannot be used (missing, unreadable, not a regular file — a FIFO, socket or device is never
opened for reading, see :func:`open_regular_file` —, zero bytes, not an image, truncated or corrupt data, more
pixels than Pillow's ``Image.MAX_IMAGE_PIXELS``, i.e. a possible decompression bomb) is logged as a warning on
the ``flowtame.data.images`` logger naming the file and the problem, and left out; when that first read completes,
``ImageSet.skipped`` holds every such (path, reason), so it is complete whenever results exist. With
``strict=True`` the first bad file raises DataError instead, and a set whose every file is bad is a DataError.
Pixels are never cached: later reads decode again, so memory does not grow with the number of images.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from flowtame.data.embedded import PREFIX as EMBEDDED_PREFIX
from flowtame.data.embedded import asset_path
from flowtame.data.quantization import DataSpec
from flowtame.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
LIST_EXTENSION = ".txt"
DIGITS_SPLITS = ("all", "train", "test")
DIGITS_ASSET = "digits.npz"
_SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N")


# ----------------------------------------------------------------------------------------------------------
# Preprocessing, keys and noise


def preprocess(image: Image.Image, data_spec: DataSpec) -> np.ndarray:
    """A decoded PIL image -> uint8 pixels [C, S, S] for ``data_spec`` (orientation, mode, resize, crop)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_GRAY:
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    image = image.convert("L" if data_spec.channels == 1 else "RGB")
    size = data_spec.image_size
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        if new_size != (width, height):
            image = image.resize(new_size, Image.Resampling.BICUBIC)
        left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels)


def pixel_key(pixels: np.ndarray) -> str:
    """The key of an image: sha256 hex digest of its preprocessed uint8 pixels [C, H, W] (C order)."""
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def _noise_seed(seed: int, key: str, draw: int = 0) -> int:
    """A 63-bit generator seed derived from (seed, key, draw) through sha256 (stable across runs and platforms)."""
    suffix = f":{int(draw)}" if draw else ""
    digest = hashlib.sha256(f"flowtame-dequantization:{int(seed)}:{key}{suffix}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def dequantization_noise(keys: Sequence[str], seed: int, shape: tuple[int, ...], draw: int = 0) -> torch.Tensor:
    """Uniform noise in [0, 1), float32 [B, *shape]: row i from a CPU generator seeded by (seed, keys[i], draw).

    The same (seed, key) always gives the same row, whatever the batch around it and whichever model it is
    fed to, so evaluations with one seed are paired; another seed or ``draw`` gives other noise (draw 0 is the
    one every single-draw evaluation uses; draws 1, 2, ... are independent extra draws). Scale it to one
    quantization bin with :func:`flowtame.data.quantization.dequantize`.
    """
    noise = torch.empty((len(keys), *shape), dtype=torch.float32)
    generator = torch.Generator()
    for row, key in zip(noise, keys, strict=True):
        generator.manual_seed(_noise_seed(seed, key, draw))
        torch.rand(shape, generator=generator, out=row)
    return noise


# ----------------------------------------------------------------------------------------------------------
# Readers: where the undecoded images of a source come from (both picklable, for DataLoader workers)


class _EmptyFileError(OSError):
    """A zero-byte file."""


class _NotRegularFileError(OSError):
    """A FIFO, socket or device where a regular file was expected; ``args[0]`` says which."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def _require_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise _NotRegularFileError(f"not a regular file ({kind}; never read)", str(path))


def open_regular_file(path: str | Path):
    """Open ``path`` for binary reading only if it is (or a symlink leads to) a regular file.

    A FIFO would block the reader forever and a device would never end, so both are refused before they are
    opened (``os.stat``); the open itself is non-blocking and re-checked on the descriptor (``os.fstat``), so
    a file swapped for a FIFO in between cannot block either. Raises OSError (FileNotFoundError, ...).
    """
    path = Path(path)
    _require_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _describe_failure(exc: BaseException) -> str:
    """A short reason for a file that could not be used."""
    if isinstance(exc, _EmptyFileError):
        return "empty file (0 bytes)"
    if isinstance(exc, _NotRegularFileError):
        return exc.args[0]
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (or a format Pillow cannot read)"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused as a possible decompression bomb ({str(exc).split(', could be')[0]})"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "truncated" in text:
        return f"truncated or corrupt image data ({text})"
    return f"cannot decode ({text})"


@dataclass(frozen=True)
class _FileReader:
    """Image files; ``names`` are the paths as displayed."""

    files: tuple[Path, ...]

    @property
    def names(self) -> list[str]:
        return [str(path) for path in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        path = self.files[index]
        with open_regular_file(path) as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise _EmptyFileError(path)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(fh) as image:
                    image.load()
                    return image


@dataclass(frozen=True)
class _ArrayReader:
    """In-memory grayscale images uint8 [N, h, w] with their display names."""

    images: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


_Reader = _FileReader | _ArrayReader


def _read(reader: _Reader, index: int, data_spec: DataSpec) -> tuple[np.ndarray | None, str]:
    """(pixels [C, S, S] uint8, "") for a usable image, (None, reason) for a bad file."""
    try:
        return preprocess(reader.load(index), data_spec), ""
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-file problem, reported and skipped
        return None, _describe_failure(exc)


@dataclass
class ImageBatch:
    """A batch of good images from :meth:`ImageSet.iter_batches`.

    ``pixels`` uint8 [B, C, S, S]; ``keys`` and ``paths`` [B]; ``noise`` float32 [B, C, S, S] in [0, 1) when a
    noise seed was given, else None; ``files_done`` counts the files read so far, bad ones included;
    ``indices`` are the images' positions among the source's files and ``failures`` the (position, reason)
    of this batch's bad files, which the set has already recorded (or raised for).
    """

    pixels: torch.Tensor
    keys: list[str]
    paths: list[str]
    noise: torch.Tensor | None
    files_done: int
    indices: list[int]
    failures: list[tuple[int, str]]

    def pin_memory(self) -> ImageBatch:
        """Page-locked copies of the tensors (DataLoader calls this when ``pin_memory=True``)."""
        return replace(self, pixels=self.pixels.pin_memory(),
                       noise=None if self.noise is None else self.noise.pin_memory())


class _ReadDataset(Dataset):
    """Item j = (reader index, pixels or None, reason) of ``indices[j]``."""

    def __init__(self, reader: _Reader, data_spec: DataSpec, indices: Sequence[int]):
        self.reader = reader
        self.data_spec = data_spec
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, np.ndarray | None, str]:
        index = self.indices[j]
        pixels, reason = _read(self.reader, index, self.data_spec)
        return index, pixels, reason


def _collate(items: list[tuple[int, np.ndarray | None, str]], names: Sequence[str], data_spec: DataSpec,
             noise_seed: int | None) -> ImageBatch:
    """Stack the good images of ``items``, key them, draw their noise; keep the failures apart."""
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    shape = (data_spec.channels, data_spec.image_size, data_spec.image_size)
    if good:
        pixels = torch.from_numpy(np.stack([p for _, p in good]))
    else:
        pixels = torch.empty((0, *shape), dtype=torch.uint8)
    keys = [pixel_key(p) for _, p in good]
    return ImageBatch(
        pixels=pixels,
        keys=keys,
        paths=[names[index] for index, _ in good],
        noise=None if noise_seed is None else dequantization_noise(keys, noise_seed, shape),
        files_done=len(items),
        indices=[index for index, _ in good],
        failures=[(index, reason) for index, pixels, reason in items if pixels is None],
    )


# ----------------------------------------------------------------------------------------------------------
# Image sets


class ImageSet:
    """The images of one source, preprocessed for one :class:`DataSpec`; see the module docstring.

    ``name`` is the source as given, ``num_files`` the number of files found before decoding; ``len()``,
    ``paths``, ``keys`` and ``pixels(i)`` count only the good images (and read the set through once first).
    """

    def __init__(self, name: str, data_spec: DataSpec, reader: _Reader, *,
                 strict: bool = False):
        self.name = name
        self.data_spec = data_spec
        self.strict = strict
        self.skipped: list[tuple[str, str]] = []
        self.shard_skipped: list[tuple[str, str]] = []
        self._reader = reader
        self._names = reader.names
        #: After the first complete pass: (positions of the good files among the source's, their keys).
        self._first: tuple[list[int], list[str]] | None = None

    def __repr__(self) -> str:
        state = f"{len(self._first[0])} good of " if self._first is not None else ""
        return f"ImageSet({self.name!r}, {state}{self.num_files} files)"

    @property
    def num_files(self) -> int:
        """Files (or embedded images) in the source, before any is decoded."""
        return len(self._reader)

    @property
    def in_memory(self) -> bool:
        """True when the images are already in memory (embedded data): decoding them costs next to nothing."""
        return isinstance(self._reader, _ArrayReader)

    @property
    def validated(self) -> bool:
        """True once the set has been read through (its good images, keys and skipped files are known)."""
        return self._first is not None

    def validate(self) -> None:
        """Read the set through once (unless done), filling ``skipped`` and the keys; pixels are not kept."""
        self._first_pass()

    def _first_pass(self) -> tuple[list[int], list[str]]:
        """(positions of the good files, their keys), reading the set through once first when needed."""
        if self._first is None:
            for _ in self.iter_batches(256):
                pass
        first = self._first
        assert first is not None, "a complete first pass records the set or raises"
        return first

    def __len__(self) -> int:
        return len(self._first_pass()[0])

    @property
    def paths(self) -> list[str]:
        """Display names of the good images (file paths; ``embedded:digits#INDEX`` for embedded images)."""
        return [self._names[index] for index in self._first_pass()[0]]

    @property
    def keys(self) -> list[str]:
        """Keys (sha256 hex of the preprocessed pixels) of the good images, in order."""
        return list(self._first_pass()[1])

    def pixels(self, i: int) -> np.ndarray:
        """Preprocessed pixels of good image ``i``, uint8 [C, S, S]."""
        good, keys = self._first_pass()
        index = good[i]
        pixels, reason = _read(self._reader, index, self.data_spec)
        if pixels is None or pixel_key(pixels) != keys[i]:
            raise DataError(f"{self._names[index]}: changed since it was first read "
                            f"({reason or 'different pixels'})")
        return pixels

    def load_tensor(self) -> tuple[torch.Tensor, list[str]]:
        """All good images at once: (uint8 [N, C, S, S], their keys). Memory grows with N: for small sets."""
        batches = list(self.iter_batches(256))
        return torch.cat([b.pixels for b in batches]), [key for b in batches for key in b.keys]

    def iter_batches(self, batch_size: int, *, num_workers: int = 0, pin_memory: bool = False,
                     noise_seed: int | None = None, positions: range | None = None) -> Iterator[ImageBatch]:
        """Stream the good images in order, ``batch_size`` files at a time (fewer images when some fail).

        Decoding runs in ``num_workers`` DataLoader worker processes (0 = in this process). With
        ``noise_seed``, each batch carries its dequantization noise (:func:`dequantization_noise`). The first
        complete pass records bad files (warning, ``skipped``; DataError with ``strict``) and raises DataError
        when no file is good; later passes read only the good files and raise DataError if one has changed.

        ``positions``: read only these positions of the pass (among the files on a first pass, among the good
        images after it), e.g. one rank's shard. Such a partial pass records nothing on the set; its bad files
        are in ``shard_skipped`` afterwards, and :meth:`adopt_first_pass` records the whole pass once the
        shards are put together.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        first = self._first
        first_pass = first is None
        indices: Sequence[int]
        first_keys: list[str]  # the keys a later pass must find (empty on a first pass)
        indices, first_keys = (range(self.num_files), []) if first is None else first
        partial_pass = positions is not None
        if positions is not None:
            indices = [indices[p] for p in positions]
            if first is not None:
                first_keys = [first_keys[p] for p in positions]
        loader = DataLoader(
            _ReadDataset(self._reader, self.data_spec, indices),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=partial(_collate, names=self._names, data_spec=self.data_spec, noise_seed=noise_seed),
            pin_memory=pin_memory,
        )
        skipped: list[tuple[str, str]] = []
        good: list[int] = []
        keys: list[str] = []
        files_done = 0
        for batch in loader:
            files_done += batch.files_done
            for index, reason in batch.failures:
                path = self._names[index]
                if not first_pass:
                    raise DataError(f"{path}: changed since it was first read ({reason})")
                if self.strict:
                    raise DataError(f"{path}: {reason}")
                logger.warning("%s: skipped: %s", path, reason)
                skipped.append((path, reason))
            if not first_pass and batch.keys != first_keys[len(keys):len(keys) + len(batch.keys)]:
                raise DataError(f"{self.name}: an image changed since the set was first read")
            good.extend(batch.indices)
            keys.extend(batch.keys)
            if batch.keys:
                yield replace(batch, files_done=files_done)
        if partial_pass:
            self.shard_skipped = skipped
        elif first_pass:
            self.adopt_first_pass(good, keys, skipped)

    def adopt_first_pass(self, good: list[int], keys: list[str], skipped: list[tuple[str, str]]) -> None:
        """Record a first pass read elsewhere (the shards of several ranks put together, in file order):
        the good files' positions, their keys and the (path, reason) of the bad files. DataError when no
        file is good."""
        if not good:
            path, reason = skipped[0]
            if len(skipped) == 1:
                raise DataError(f"{path}: {reason}")
            raise DataError(f"{self.name}: none of its {len(skipped)} files could be read "
                            f"(first: {path}: {reason})")
        self.skipped = list(skipped)
        self._first = (list(good), list(keys))


# ----------------------------------------------------------------------------------------------------------
# Opening sources


def _folder_files(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()]
    if not files:
        raise DataError(f"{folder}: no images found (searched recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def list_file_paths(list_file: Path) -> list[Path]:
    """The image paths a ``.txt`` list names (relative ones taken relative to the list's folder); DataError when
    the list cannot be read or names none."""
    try:
        with open_regular_file(list_file) as fh:
            lines = fh.read().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{list_file}: cannot read the list file ({_describe_failure(exc)})") from None
    entries = [line.strip() for line in lines]
    files = [list_file.parent / entry for entry in entries if entry and not entry.startswith("#")]
    if not files:
        raise DataError(f"{list_file}: lists no image paths")
    return files


def _embedded_digits(source: str) -> _ArrayReader:
    """``embedded:digits[:SPLIT][:CLASS]`` -> the selected digits (8x8 grayscale) with their display names."""
    usage = "expected embedded:digits[:all|train|test][:CLASS] with CLASS 0-9"
    parts = source[len(EMBEDDED_PREFIX):].split(":")
    if parts[0] != "digits":
        raise DataError(f"{source}: unknown embedded data set ({usage})")
    options = parts[1:]
    split = options.pop(0) if options and options[0] in DIGITS_SPLITS else "all"
    label = options.pop(0) if options else None
    if options or (label is not None and not (label.isdigit() and 0 <= int(label) <= 9)):
        raise DataError(f"{source}: {usage}")
    path = asset_path(DIGITS_ASSET)
    try:
        with np.load(path) as arrays:
            images, labels, train = arrays["images"], arrays["labels"], arrays["train"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: the embedded digits cannot be read ({exc}); rebuild them with "
                        "examples/embedded/make_digits_asset.py") from None
    mask = np.ones(len(images), dtype=bool) if split == "all" else (train if split == "train" else ~train)
    if label is not None:
        mask &= labels == int(label)
    indices = np.flatnonzero(mask)
    return _ArrayReader(images=images[indices], names=[f"embedded:digits#{i}" for i in indices])


def open_images(source: str | Path, data_spec: DataSpec, *, strict: bool = False) -> ImageSet:
    """Open an image source (folder, image file, ``.txt`` list or ``embedded:digits...``) for ``data_spec``.

    Lists the files only; they are decoded when the set is first read (see the module docstring). Raises
    DataError for a missing path, an unknown kind of file, or a source without any image file.
    """
    name = str(source)
    if name.startswith(EMBEDDED_PREFIX):
        return ImageSet(name, data_spec, _embedded_digits(name), strict=strict)
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        files = _folder_files(path)
    elif path.suffix.lower() == LIST_EXTENSION:
        files = list_file_paths(path)
    elif path.suffix.lower() in IMAGE_EXTENSIONS:
        files = [path]
    else:
        raise DataError(f"{path}: not a folder, an image ({', '.join(IMAGE_EXTENSIONS)}) "
                        f"or a {LIST_EXTENSION} list of image paths")
    return ImageSet(name, data_spec, _FileReader(tuple(files)), strict=strict)
