"""Image sources, preprocessing, bad files, keys and dequantization noise (flowtame.data.images)."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtame.data import images as data_module
from flowtame.data.images import dequantization_noise, open_images, pixel_key, preprocess
from flowtame.data.quantization import DataSpec
from flowtame.errors import DataError

GRAY4 = DataSpec(image_size=4, channels=1, n_bits=5)
GRAY16 = DataSpec(image_size=16, channels=1, n_bits=5)


def _gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height grayscale pixels and holds no pixel data (a decompression bomb's
    header: Pillow reads the size when opening, before any decoding)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _truncated(path: Path, fmt: str, size: int = 64) -> Path:
    """A noise image (incompressible) saved as ``fmt`` and cut to half its bytes."""
    _save(path, np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8), format=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


# ---------------------------------------------------------------------------------------------- preprocessing


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.arange(8, dtype=np.uint8).reshape(2, 4) * 30  # 4 wide, 2 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown rotated 90° clockwise
    path = _save(tmp_path / "rotated.png", pixels, exif=exif)
    out = open_images(path, DataSpec(image_size=2, channels=1, n_bits=8)).pixels(0)
    upright = np.rot90(pixels, k=-1)  # 2 wide, 4 high
    np.testing.assert_array_equal(out[0], upright[1:3, :])  # short side already 2: centre crop of the rows


def test_centre_crop_without_resize_keeps_the_middle(tmp_path):
    wide = np.zeros((4, 8), dtype=np.uint8)
    wide[:, :2], wide[:, 2:6], wide[:, 6:] = 255, 128, 0
    out = preprocess(Image.fromarray(wide), GRAY4)
    assert out.shape == (1, 4, 4) and out.dtype == np.uint8
    assert (out == 128).all()


def test_resize_short_side_then_centre_crop(tmp_path):
    tall = np.zeros((32, 8), dtype=np.uint8)  # 8 wide, 32 high -> 4 x 16, crop rows 6..10
    tall[8:24] = 200
    out = preprocess(Image.fromarray(tall), GRAY4)
    assert out.shape == (1, 4, 4)
    assert (out == 200).all()
    constant = np.full((50, 100, 3), 77, dtype=np.uint8)
    assert (preprocess(Image.fromarray(constant), DataSpec(16, 3, 5)) == 77).all()


def test_upscaling_small_images(tmp_path):
    out = preprocess(Image.fromarray(_gradient(8, 8)), GRAY16)
    assert out.shape == (1, 16, 16)


def test_channel_conversions():
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    gray = preprocess(Image.fromarray(red), GRAY4)
    assert (gray == 76).all()  # ITU-R 601-2 luma: 299/1000 * 255
    rgb = preprocess(Image.fromarray(np.full((4, 4), 90, dtype=np.uint8)), DataSpec(4, 3, 5))
    assert rgb.shape == (3, 4, 4) and (rgb == 90).all()
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 1] = 200
    assert (preprocess(Image.fromarray(rgba), DataSpec(4, 3, 5))[1] == 200).all()  # alpha dropped


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 0x8000, dtype=np.uint16)).save(path)
    assert (open_images(path, GRAY4).pixels(0) == 0x80).all()


# ---------------------------------------------------------------------------------------------- sources


def test_folder_is_recursive_sorted_and_filtered(tmp_path):
    _save(tmp_path / "b.png", _gradient(4, 4, 1))
    _save(tmp_path / "sub" / "a.JPG", _gradient(4, 4, 2))
    _save(tmp_path / "a.bmp", _gradient(4, 4, 3))
    _save(tmp_path / "c.webp", _gradient(4, 4, 4), lossless=True)
    _save(tmp_path / "d.tiff", _gradient(4, 4, 5))
    (tmp_path / "notes.txt").write_text("not an image source inside a folder")
    (tmp_path / "README").write_text("ignored")
    image_set = open_images(tmp_path, GRAY4)
    assert image_set.name == str(tmp_path)
    names = [Path(p).relative_to(tmp_path).as_posix() for p in image_set.paths]
    assert names == ["a.bmp", "b.png", "c.webp", "d.tiff", "sub/a.JPG"]
    assert len(image_set) == 5 and image_set.skipped == []
    pixels, keys = image_set.load_tensor()
    assert pixels.shape == (5, 1, 4, 4) and pixels.dtype == torch.uint8
    assert keys == image_set.keys
    assert keys == [pixel_key(image_set.pixels(i)) for i in range(5)]
    np.testing.assert_array_equal(pixels[2].numpy(), image_set.pixels(2))


def test_single_image_file(tmp_path):
    path = _save(tmp_path / "one.png", _gradient(4, 4))
    image_set = open_images(path, GRAY4)
    assert image_set.paths == [str(path)]
    np.testing.assert_array_equal(image_set.pixels(0)[0], _gradient(4, 4))


def test_list_file_relative_absolute_comments_and_missing_entries(tmp_path, caplog):
    _save(tmp_path / "imgs" / "x.png", _gradient(4, 4, 1))
    absolute = _save(tmp_path / "elsewhere" / "y.png", _gradient(4, 4, 2))
    listing = tmp_path / "lists" / "set.txt"
    listing.parent.mkdir()
    listing.write_text(f"# my set\n../imgs/x.png\n\n  {absolute}  \nmissing.png\n")
    with caplog.at_level(logging.WARNING, logger="flowtame.data.images"):
        image_set = open_images(listing, GRAY4)
        assert image_set.paths == [str(listing.parent / "../imgs/x.png"), str(absolute)]
    missing = str(listing.parent / "missing.png")
    assert image_set.skipped == [(missing, "no such file")]
    assert f"{missing}: skipped: no such file" in caplog.text


def test_identical_pixels_give_identical_keys(tmp_path):
    pixels = _gradient(4, 4)
    a = _save(tmp_path / "a.png", pixels)
    b = _save(tmp_path / "b.bmp", pixels)
    c = _save(tmp_path / "c.png", _gradient(4, 4, seed=9))
    listing = tmp_path / "l.txt"
    listing.write_text(f"{a}\n{b}\n{c}\n")
    keys = open_images(listing, GRAY4).keys
    assert keys[0] == keys[1] != keys[2]
    assert keys[0] == pixel_key(pixels[None])


@pytest.mark.parametrize(("source", "count"), [
    ("embedded:digits", 1797),
    ("embedded:digits:all", 1797),
    ("embedded:digits:train", 1497),
    ("embedded:digits:test", 300),
    ("embedded:digits:all:3", 183),
    ("embedded:digits:3", 183),
])
def test_embedded_digits_sources(source, count):
    image_set = open_images(source, GRAY16)
    assert image_set.in_memory and image_set.num_files == count


def test_embedded_digits_filters_follow_the_asset():
    with np.load(data_module.asset_path(data_module.DIGITS_ASSET)) as arrays:
        labels, train = arrays["labels"], arrays["train"]
    image_set = open_images("embedded:digits:train:3", GRAY16)
    indices = [int(p.split("#")[1]) for p in image_set.paths]
    assert image_set.paths[0].startswith("embedded:digits#")
    assert indices == np.flatnonzero(train & (labels == 3)).tolist()
    assert len(image_set) == 152
    assert image_set.pixels(0).shape == (1, 16, 16)
    test_indices = {int(p.split("#")[1]) for p in open_images("embedded:digits:test", GRAY16).paths}
    assert not test_indices & set(np.flatnonzero(train).tolist())


@pytest.mark.parametrize("source", ["embedded:faces", "embedded:digits:validation",
                                    "embedded:digits:train:12", "embedded:digits:train:3:extra",
                                    "embedded:digits:3:train"])
def test_bad_embedded_sources(source):
    with pytest.raises(DataError, match=source):
        open_images(source, GRAY16)


def test_missing_empty_and_unknown_sources(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        open_images(tmp_path / "nope", GRAY4)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    with pytest.raises(DataError, match="no images found"):
        open_images(tmp_path / "empty", GRAY4)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="lists no image paths"):
        open_images(tmp_path / "empty.txt", GRAY4)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder, an image"):
        open_images(tmp_path / "model.safetensors", GRAY4)


# ---------------------------------------------------------------------------------------------- bad files


def _bad_files(folder: Path) -> dict[str, str]:
    """Write one file per bad-file case into ``folder``; returns name -> expected reason fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.png").write_bytes(b"")
    _truncated(folder / "cut.png", "PNG")
    _truncated(folder / "cut.jpg", "JPEG")
    (folder / "text.png").write_text("this is not a PNG")
    (folder / "bomb.png").write_bytes(_png_header_only(30_000, 30_000))  # over 2x Pillow's limit: an error
    (folder / "bomb-warn.png").write_bytes(_png_header_only(10_000, 10_000))  # over 1x: only a warning
    return {
        "zero.png": "empty file (0 bytes)",
        "cut.png": "truncated or corrupt image data",
        "cut.jpg": "truncated or corrupt image data",
        "text.png": "not an image",
        "bomb.png": "decompression bomb",
        "bomb-warn.png": "decompression bomb",
    }


def test_each_bad_file_is_warned_recorded_and_counted(tmp_path, caplog):
    expected = _bad_files(tmp_path)
    _save(tmp_path / "good.png", _gradient(4, 4))
    with caplog.at_level(logging.WARNING, logger="flowtame.data.images"):
        image_set = open_images(tmp_path, GRAY4)
        assert len(image_set) == 1
    assert image_set.paths == [str(tmp_path / "good.png")]
    reasons = {Path(path).name: reason for path, reason in image_set.skipped}
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name]
        assert f"{tmp_path / name}: skipped: " in caplog.text
    assert len(caplog.records) == len(expected)
    assert "\n" not in "".join(reasons.values())


@pytest.mark.parametrize("name", ["zero.png", "cut.png", "cut.jpg", "text.png", "bomb.png", "bomb-warn.png"])
def test_strict_raises_on_the_first_bad_file(tmp_path, name):
    expected = _bad_files(tmp_path / "all")
    folder = tmp_path / "one"
    folder.mkdir()
    (tmp_path / "all" / name).rename(folder / name)
    _save(folder / "good.png", _gradient(4, 4))
    with pytest.raises(DataError) as info:
        open_images(folder, GRAY4, strict=True).validate()
    assert str(info.value).startswith(f"{folder / name}: ")
    assert expected[name] in str(info.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_skipped(tmp_path):
    path = _save(tmp_path / "locked.png", _gradient(4, 4))
    _save(tmp_path / "good.png", _gradient(4, 4))
    path.chmod(0)
    try:
        image_set = open_images(tmp_path, GRAY4)
        image_set.validate()
        assert image_set.skipped == [(str(path), "permission denied")]
    finally:
        path.chmod(0o644)


def test_permission_error_is_reported_as_such(tmp_path, monkeypatch):
    path = _save(tmp_path / "locked.png", _gradient(4, 4))
    _save(tmp_path / "good.png", _gradient(4, 4))
    real_open = os.open

    def denying_open(fp, *args, **kwargs):
        if Path(fp) == path:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(data_module.os, "open", denying_open)
    image_set = open_images(tmp_path, GRAY4)
    image_set.validate()
    assert image_set.skipped == [(str(path), "permission denied")]


def test_a_set_of_only_bad_files_is_an_error(tmp_path):
    _bad_files(tmp_path)
    with pytest.raises(DataError, match="none of its 6 files could be read"):
        open_images(tmp_path, GRAY4).validate()
    with pytest.raises(DataError, match="not an image"):
        open_images(tmp_path / "text.png", GRAY4).validate()


def test_a_file_changed_after_the_first_read_is_an_error(tmp_path):
    path = _save(tmp_path / "a.png", _gradient(4, 4))
    image_set = open_images(tmp_path, GRAY4)
    image_set.validate()
    _save(path, _gradient(4, 4, seed=5))
    with pytest.raises(DataError, match="changed since"):
        image_set.pixels(0)
    with pytest.raises(DataError, match="changed since"):
        image_set.load_tensor()


def test_worker_processes_give_the_same_batches(tmp_path, caplog):
    for i in range(6):
        _save(tmp_path / f"{i}.png", _gradient(4, 4, i))
    (tmp_path / "3.png").write_text("broken")
    serial = open_images(tmp_path, GRAY4)
    batches = list(serial.iter_batches(4, noise_seed=1))
    parallel = open_images(tmp_path, GRAY4)
    with caplog.at_level(logging.WARNING, logger="flowtame.data.images"):
        parallel_batches = list(parallel.iter_batches(4, num_workers=2, noise_seed=1))
    broken = (str(tmp_path / "3.png"), "not an image (or a format Pillow cannot read)")
    assert parallel.skipped == serial.skipped == [broken]
    assert [b.keys for b in parallel_batches] == [b.keys for b in batches]
    assert [b.files_done for b in parallel_batches] == [4, 6]
    for a, b in zip(batches, parallel_batches, strict=True):
        assert torch.equal(a.pixels, b.pixels) and torch.equal(a.noise, b.noise)


# ---------------------------------------------------------------------------------------------- noise


def test_dequantization_noise_is_keyed_and_seeded():
    keys = [f"{i:064x}" for i in range(6)]
    shape = (1, 4, 4)
    noise = dequantization_noise(keys, seed=3, shape=shape)
    assert noise.shape == (6, 1, 4, 4) and noise.dtype == torch.float32
    assert float(noise.min()) >= 0.0 and float(noise.max()) < 1.0
    assert torch.equal(noise, dequantization_noise(keys, 3, shape))
    assert torch.equal(noise[2:5], dequantization_noise(keys[2:5], 3, shape))  # batch composition irrelevant
    assert torch.equal(noise[4], dequantization_noise([keys[4], keys[0]], 3, shape)[0])
    other = dequantization_noise(keys, seed=4, shape=shape)
    assert not torch.isclose(noise, other).any()
    assert not torch.equal(noise[0], noise[1])
    # extra draws: draw 0 is the single-draw noise, draws 1, 2 are other noise, each reproducible
    assert torch.equal(dequantization_noise(keys, 3, shape, draw=0), noise)
    draw1, draw2 = (dequantization_noise(keys, 3, shape, draw=j) for j in (1, 2))
    assert not torch.isclose(draw1, noise).any() and not torch.isclose(draw1, draw2).any()
    assert torch.equal(draw1[3], dequantization_noise([keys[3]], 3, shape, draw=1)[0])


def test_batches_carry_the_noise_of_their_keys():
    image_set = open_images("embedded:digits:test:0", GRAY16)
    batch = next(image_set.iter_batches(7, noise_seed=11))
    assert len(batch.keys) == 7 and batch.files_done == 7
    assert torch.equal(batch.noise, dequantization_noise(batch.keys, 11, (1, 16, 16)))
    assert batch.paths == image_set.paths[:7]
