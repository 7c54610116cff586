"""flowtame sample: shared latents across models, pixel mapping, grid layout, CLI outputs and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flowtame.data.quantization import DataSpec, quantize
from flowtame.errors import InputError
from flowtame.figures.sampling import make_grid, sample_grid, sample_images, to_uint8
from flowtame.flows import GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint


def _tiny_checkpoint(path, image_size: int = 8, seed: int = 0, perturb: float = 0.0) -> Checkpoint:
    torch.manual_seed(seed)
    spec = GlowSpec(channels=1, image_size=image_size, n_flow=1, n_block=2, hidden=8)
    model = build_glow(spec)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(perturb * torch.randn_like(param))
    ckpt = Checkpoint(model=model.eval(), architecture="glow", spec=spec,
                      data_spec=DataSpec(image_size=image_size, channels=1, n_bits=5))
    save_checkpoint(path, ckpt)
    return load_checkpoint(path)


@pytest.fixture
def models(tmp_path):
    base = _tiny_checkpoint(tmp_path / "base.safetensors", perturb=0.05)
    other = _tiny_checkpoint(tmp_path / "other.safetensors", seed=1, perturb=0.05)
    return base, other


def test_same_model_twice_gives_identical_rows(models):
    base, other = models
    images = sample_images([base, other, base], n=6, temperature=0.8, seed=3)
    assert images.shape == (3, 6, 1, 8, 8) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], images[2])
    assert not np.array_equal(images[0], images[1])
    # A seed is a seed: the same call again, alone, reproduces the row.
    np.testing.assert_array_equal(sample_images([base], n=6, temperature=0.8, seed=3)[0], images[0])
    assert not np.array_equal(sample_images([base], n=6, temperature=0.8, seed=4)[0], images[0])


def test_rows_decode_the_shared_noise(models):
    base, other = models
    noise = base.model.sample_noise(4, 0.5, torch.Generator().manual_seed(11), device="cpu")
    with torch.no_grad():
        expected = [to_uint8(m.model.decode_noise(noise), 5) for m in (base, other)]
    images = sample_images([base, other], n=4, temperature=0.5, seed=11)
    np.testing.assert_array_equal(images[0], expected[0])
    np.testing.assert_array_equal(images[1], expected[1])


def test_to_uint8_inverts_quantize():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    for n_bits in (1, 3, 5, 8):
        x = quantize(pixels, n_bits)
        back = to_uint8(x + 0.3 / 2 ** n_bits, n_bits)  # anywhere inside the bin
        torch.testing.assert_close(quantize(torch.from_numpy(back), n_bits), x)
        assert back.min() == 0 and back.max() == 255
    extreme = to_uint8(torch.tensor([-3.0, 7.0, float("nan"), float("inf")]), 5)
    assert extreme.tolist() == [0, 255, 0, 255]


def test_grid_layout():
    images = np.zeros((2, 3, 1, 4, 4), dtype=np.uint8)
    images[1, 2] = 200
    grid = make_grid(images, scale=2, padding=1)
    assert grid.shape == (2 * (8 + 1) + 1, 3 * (8 + 1) + 1, 1)
    tile = grid[1 + 9:1 + 9 + 8, 1 + 18:1 + 18 + 8]
    assert (tile == 200).all()
    assert (grid[0] == 255).all()


def test_sample_grid_upscales_tiny_images(models):
    base, _ = models
    grid = sample_grid([base], n=2, temperature=0.7, seed=0)
    # 8x8 images are upscaled 8x to 64 pixels, with 2 pixels of padding.
    assert grid.shape == (2 + 64 + 2, 2 + 2 * (64 + 2), 1)


def test_incompatible_latent_shapes_are_refused(tmp_path, models):
    base, _ = models
    bigger = _tiny_checkpoint(tmp_path / "big.safetensors", image_size=16)
    with pytest.raises(InputError, match="latent shapes"):
        sample_images([base, bigger], n=2)


def test_cli_sample(tmp_path, run_cli, models):
    base, other = models
    grid_path = tmp_path / "grid.png"
    result = run_cli("sample", base.path, other.path, base.path, "-n", "5", "--temperature", "0.7",
                     "--seed", "2", "-o", grid_path, "--out-dir", tmp_path / "each", "--scale", "2")
    assert result.exit_code == 0, result.stderr
    grid = np.asarray(Image.open(grid_path))
    assert grid.shape == (3 * (16 + 2) + 2, 5 * (16 + 2) + 2)
    rows = [grid[2 + r * 18:2 + r * 18 + 16] for r in range(3)]
    np.testing.assert_array_equal(rows[0], rows[2])
    assert not np.array_equal(rows[0], rows[1])
    singles = sorted((tmp_path / "each").rglob("*.png"))
    assert len(singles) == 15
    assert np.asarray(Image.open(singles[0])).shape == (16, 16)

    again = run_cli("sample", base.path, "-n", "2", "-o", grid_path)
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert run_cli("sample", base.path, "-n", "2", "-o", grid_path, "--force").exit_code == 0


def test_cli_sample_mismatched_models(tmp_path, run_cli, models):
    base, _ = models
    bigger = _tiny_checkpoint(tmp_path / "big.safetensors", image_size=16)
    result = run_cli("sample", base.path, bigger.path, "-n", "2", "-o", tmp_path / "grid.png")
    assert result.exit_code == 2
    assert "latent shapes" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "grid.png").exists()


def test_decoding_is_sized_like_the_likelihood_passes_on_the_cpu(models, monkeypatch):
    """The first decode (all 40 rows, fewer than DECODE_BATCH) measures the largest layer output; with an activation
    budget of 3 such rows every later decode takes at most 3 samples, and the images are the same."""
    from flowtame.likelihood import nll as engine

    base, _ = models
    whole = sample_images([base], n=40, temperature=0.8, seed=3)
    assert engine._ROW_BYTES[base.model] > 0  # measured by the decode
    monkeypatch.setattr(engine, "CPU_ACTIVATION_BYTES", 3 * engine._ROW_BYTES[base.model])
    rows, decode = [], base.model.decode_noise
    monkeypatch.setattr(base.model, "decode_noise", lambda noise: rows.append(noise[0].shape[0]) or decode(noise))
    capped = sample_images([base], n=40, temperature=0.8, seed=3)
    assert rows == [3] * 13 + [1]
    np.testing.assert_array_equal(capped, whole)
