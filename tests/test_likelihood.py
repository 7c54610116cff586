"""The likelihood engine (flowtame.likelihood.nll) and device selection (flowtame.engine.devices)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from flowtame.data.images import dequantization_noise, open_images
from flowtame.data.quantization import DataSpec, dequantize, quantize
from flowtame.engine.devices import autocast_context, loop_generator, resolve_device, take_rows, training_rows
from flowtame.errors import DataError, InputError
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.likelihood.nll import PER_IMAGE_CSV_COLUMNS, compute_nll, nll_nats

LOG_2PI = math.log(2 * math.pi)
DIGITS = DataSpec(image_size=16, channels=1, n_bits=5)


def _tiny_glow(seed: int, image_size: int = 16, **overrides) -> nn.Module:
    """A small randomly initialized Glow whose every layer does something (no zero-initialized outputs)."""
    torch.manual_seed(seed)
    spec = GlowSpec(**{"channels": 1, "image_size": image_size, "n_flow": 2, "n_block": 2, "hidden": 8,
                       "affine": True, **overrides})
    model = build_glow(spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "prior" not in name:
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


class _Recorder(nn.Module):
    """Wraps a flow and records every input its log_prob sees."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.event_shape = inner.event_shape
        self.inputs: list[torch.Tensor] = []

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.inner.log_prob(x)


# ---------------------------------------------------------------------------------------------- exact values


def test_nll_of_a_glow_with_known_parameters_matches_the_hand_computation(tmp_path):
    """A 2x2 grayscale Glow (one squeeze, one step): actnorm, a plain 1x1 convolution, an additive coupling
    that adds a constant, and a constant Gaussian prior. Everything is then a closed-form formula."""
    spec = GlowSpec(channels=1, image_size=2, n_flow=1, n_block=1, hidden=4, affine=False, conv_lu=(False,))
    model = build_glow(spec).eval()
    step = model.levels[0].steps[1]
    loc = np.array([0.1, -0.2, 0.05, 0.3])
    scale = np.array([1.5, 0.8, 2.0, 1.1])
    weight = np.array([[2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 3.0]])
    shift = np.array([0.3, -0.2])
    prior_out = np.array([0.1, -0.1, 0.2, 0.0, 0.05, -0.3, 0.2, 0.1])  # mean (4) then log_sd (4)
    with torch.no_grad():
        step.actnorm.loc.copy_(torch.tensor(loc).view(1, 4, 1, 1))
        step.actnorm.scale.copy_(torch.tensor(scale).view(1, 4, 1, 1))
        step.invconv.weight.copy_(torch.tensor(weight).view(4, 4, 1, 1))
        step.coupling.net[4].conv.bias.copy_(torch.tensor(shift))
        model.levels[0].prior.conv.bias.copy_(torch.tensor(prior_out))
    pixels = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    image_set = open_images(_write_png(tmp_path / "known.png", pixels), DataSpec(2, 1, 5))

    result = compute_nll(model, image_set, seed=7, device="cpu")

    n_bins, num_dims = 32, 4
    u = dequantization_noise(image_set.keys, 7, (1, 2, 2)).double().numpy().reshape(4)
    x = np.floor(pixels.reshape(4) / 8) / n_bins - 0.5 + u / n_bins  # squeeze of 1x2x2: row-major order
    h = weight @ (scale * (x + loc))
    z = np.concatenate([h[:2], h[2:] + shift])
    mean, log_sd = prior_out[:4], prior_out[4:]
    log_prior = np.sum(-0.5 * LOG_2PI - log_sd - 0.5 * (z - mean) ** 2 * np.exp(-2 * log_sd))
    log_det = np.sum(np.log(scale)) + np.log(abs(np.linalg.det(weight)))
    nll = -(log_prior + log_det) + num_dims * math.log(n_bins)
    assert result.nll.dtype == np.float64 and result.nll.shape == (1,)
    np.testing.assert_allclose(result.nll[0], nll, rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.bpd[0], nll / (num_dims * math.log(2)), rtol=0, atol=1e-5)


def test_nll_matches_the_change_of_variables_formula(tmp_path):
    """Random affine Glow with constant priors: NLL = -(Σ log N(z; m, s) + log|det ∂z/∂x|) + D log n_bins,
    the Jacobian taken by autograd in float64, on explicitly quantized and dequantized pixels."""
    model = _tiny_glow(0, image_size=4)
    with torch.no_grad():
        for level in model.levels:
            level.prior.conv.bias.copy_(0.2 * torch.randn_like(level.prior.conv.bias))
            level.prior.scale.copy_(0.1 * torch.randn_like(level.prior.scale))
    pixels = np.random.default_rng(3).integers(0, 256, (4, 4), dtype=np.uint8)
    data_spec = DataSpec(4, 1, 4)
    image_set = open_images(_write_png(tmp_path / "x.png", pixels), data_spec)

    result = compute_nll(model, image_set, seed=1, device="cpu")

    double = model.double()
    noise = dequantization_noise(image_set.keys, 1, (1, 4, 4)).double()
    x = quantize(torch.from_numpy(pixels[None, None]), 4).double() + noise / 16

    def latents(flat_x: torch.Tensor) -> torch.Tensor:
        zs, _ = double.encode(flat_x.view(1, 1, 4, 4))
        return torch.cat([z.flatten() for z in zs])

    jacobian = torch.autograd.functional.jacobian(latents, x.flatten())
    log_det = torch.linalg.slogdet(jacobian)[1]
    log_prior = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        encoded = double.encode(x)[0]
    for level, z in zip(double.levels, encoded, strict=True):
        constant = (level.prior.conv.bias * torch.exp(3 * level.prior.scale.flatten()))
        mean, log_sd = constant.view(1, -1, 1, 1).chunk(2, 1)
        log_prior += torch.sum(-0.5 * LOG_2PI - log_sd - 0.5 * (z - mean) ** 2 * torch.exp(-2 * log_sd))
    expected = float(-(log_prior + log_det).detach()) + 16 * 4 * math.log(2)
    assert abs(float(log_det)) > 1.0  # the transforms really change volume
    np.testing.assert_allclose(result.nll[0], expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- pairing


def test_same_seed_same_results_other_seed_other_results():
    image_set = open_images("embedded:digits:test:1", DIGITS)
    model = _tiny_glow(1)
    first = compute_nll(model, image_set, seed=0, device="cpu")
    again = compute_nll(model, image_set, seed=0, device="cpu")
    other = compute_nll(model, image_set, seed=1, device="cpu")
    np.testing.assert_array_equal(first.nll, again.nll)
    assert first.keys == again.keys == image_set.keys and first.paths == image_set.paths
    assert len(first) == 30
    assert not np.isclose(first.nll, other.nll, rtol=0, atol=1e-6).any()


def test_two_models_see_the_very_same_noise():
    image_set = open_images("embedded:digits:test:2", DIGITS)
    base, tamed = _Recorder(_tiny_glow(1)), _Recorder(_tiny_glow(2))
    result_base = compute_nll(base, image_set, seed=5, batch_size=8, device="cpu")
    result_tamed = compute_nll(tamed, image_set, seed=5, batch_size=8, device="cpu")
    seen_base, seen_tamed = torch.cat(base.inputs), torch.cat(tamed.inputs)
    assert torch.equal(seen_base, seen_tamed)
    pixels, keys = image_set.load_tensor()
    expected = dequantize(quantize(pixels, 5), 5, dequantization_noise(keys, 5, (1, 16, 16)))
    assert torch.equal(seen_base, expected)
    assert not np.allclose(result_base.nll, result_tamed.nll)


def test_batch_size_does_not_change_per_image_results():
    image_set = open_images("embedded:digits:test:4", DIGITS)
    model = _tiny_glow(3)
    reference = compute_nll(model, image_set, seed=2, batch_size=256, device="cpu")
    for batch_size in (1, 7):
        result = compute_nll(model, image_set, seed=2, batch_size=batch_size, device="cpu")
        assert result.keys == reference.keys
        np.testing.assert_allclose(result.nll, reference.nll, rtol=1e-6, atol=0)


def test_several_draws_average_the_nll_of_each_draw():
    image_set = open_images("embedded:digits:test:5", DIGITS)
    model = _tiny_glow(4)
    pixels, keys = image_set.load_tensor()
    per_draw = []
    with torch.no_grad():
        for draw in range(3):
            x = dequantize(quantize(pixels, 5), 5, dequantization_noise(keys, 2, (1, 16, 16), draw))
            per_draw.append(nll_nats(model.eval(), x, DIGITS).double().numpy())
    averaged = compute_nll(model, image_set, seed=2, batch_size=7, device="cpu", draws=3)
    np.testing.assert_allclose(averaged.nll, np.mean(per_draw, axis=0), rtol=1e-6, atol=0)
    single = compute_nll(model, image_set, seed=2, device="cpu")
    np.testing.assert_allclose(single.nll, per_draw[0], rtol=1e-6, atol=0)  # draw 0 is the single draw
    with pytest.raises(InputError, match="draws"):
        compute_nll(model, image_set, device="cpu", draws=0)


# ---------------------------------------------------------------------------------------------- outputs


def test_per_image_csv_file_and_stream(tmp_path):
    image_set = open_images("embedded:digits:test:5", DIGITS)
    model = _tiny_glow(4)
    target = tmp_path / "out" / "nll.csv"
    result = compute_nll(model, image_set, batch_size=8, device="cpu", per_image_csv=target)
    with open(target, newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == PER_IMAGE_CSV_COLUMNS
    assert [r[0] for r in rows[1:]] == ["embedded:digits:test:5"] * len(result)
    assert [r[1] for r in rows[1:]] == result.paths and [r[2] for r in rows[1:]] == result.keys
    np.testing.assert_array_equal([float(r[3]) for r in rows[1:]], result.nll)
    np.testing.assert_array_equal([float(r[4]) for r in rows[1:]], result.bpd)
    assert sorted(p.name for p in target.parent.iterdir()) == ["nll.csv"]  # no temporary file left

    stream = io.StringIO()
    compute_nll(model, image_set, batch_size=8, device="cpu", per_image_csv=stream)
    compute_nll(model, image_set, batch_size=8, device="cpu", per_image_csv=stream)
    assert list(csv.reader(io.StringIO(stream.getvalue()))) == rows[1:] * 2  # rows only, no header


def test_progress_reaches_the_number_of_files():
    image_set = open_images("embedded:digits:test:6", DIGITS)
    calls = []
    compute_nll(_tiny_glow(5), image_set, batch_size=8, device="cpu", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (30, 30)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[0] == (8, 30)


def test_skipped_files_reach_the_result_and_strict_leaves_no_csv(tmp_path):
    for i in range(3):
        _write_png(tmp_path / f"{i}.png", np.full((16, 16), 40 * i, dtype=np.uint8))
    (tmp_path / "bad.png").write_bytes(b"")
    result = compute_nll(_tiny_glow(6), open_images(tmp_path, DIGITS), device="cpu")
    assert len(result) == 3 and result.skipped == [(str(tmp_path / "bad.png"), "empty file (0 bytes)")]
    target = tmp_path / "strict.csv"
    with pytest.raises(DataError, match="bad.png: empty file"):
        compute_nll(_tiny_glow(6), open_images(tmp_path, DIGITS, strict=True), device="cpu",
                    per_image_csv=target)
    assert not target.exists()


def test_evaluation_mode_and_training_flag(tmp_path):
    model = build_glow(GlowSpec(channels=1, image_size=16, n_flow=1, n_block=2, hidden=8)).train()
    compute_nll(model, open_images("embedded:digits:test:7", DIGITS), device="cpu")
    assert model.training
    assert all(float(m.initialized) == 0.0 for m in model.modules() if hasattr(m, "initialized"))


def test_shape_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="expects 1x8x8"):
        compute_nll(_tiny_glow(0, image_size=8), open_images("embedded:digits:test:0", DIGITS), device="cpu")


def test_nll_nats_is_differentiable():
    model = _tiny_glow(7).train()
    pixels, keys = open_images("embedded:digits:test:8", DIGITS).load_tensor()
    x = dequantize(quantize(pixels[:4], 5), 5, dequantization_noise(keys[:4], 0, (1, 16, 16)))
    loss = nll_nats(model, x, DIGITS)
    assert loss.shape == (4,)
    loss.mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


# ---------------------------------------------------------------------------------------------- devices


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "cuda:-1"):
        with pytest.raises(InputError, match="expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_clear_error():
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device(spec)


def test_precision_checks():
    with autocast_context(torch.device("cpu"), "fp32"):
        pass
    with pytest.raises(InputError, match="only supported on CUDA"), autocast_context("cpu", "bf16"):
        pass
    with pytest.raises(InputError, match="expected one of fp32, bf16, fp16"), autocast_context("cpu", "fp64"):
        pass
    with pytest.raises(InputError, match="only supported on CUDA"):
        compute_nll(_tiny_glow(0), open_images("embedded:digits:test:0", DIGITS), device="cpu",
                    precision="fp16")


def test_training_loop_placement_on_the_cpu_changes_nothing():
    """On the CPU the loop's generator is the setup generator (CPU runs draw as before) and the images stay
    where they are; take_rows gathers rows in the given order."""
    setup = torch.Generator().manual_seed(3)
    cpu = torch.device("cpu")
    assert loop_generator(setup, cpu, seed=3) is setup
    pixels = torch.arange(24, dtype=torch.uint8).reshape(6, 4)
    assert training_rows(pixels, cpu) is pixels
    assert torch.equal(take_rows(pixels, torch.tensor([5, 0, 5]), cpu), pixels[[5, 0, 5]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_loop_placement_on_cuda_keeps_draws_and_small_sets_on_the_gpu():
    cuda = torch.device("cuda", 0)
    generator = loop_generator(torch.Generator().manual_seed(3), cuda, seed=3)
    assert generator.device.type == "cuda"
    pixels = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    assert training_rows(pixels, cuda).is_cuda
    assert training_rows(pixels, cuda, budget=0.0).is_pinned()
    index = torch.randint(8, (5,), generator=generator, device=cuda)
    assert take_rows(training_rows(pixels, cuda, budget=0.0), index, cuda).is_cuda


def test_a_wide_model_is_evaluated_in_fewer_rows_on_the_cpu(monkeypatch):
    """The CPU's no-gradient passes cap their rows by the model's largest layer output (measured on its first
    chunk, which keeps the requested size); the per-image NLLs are those of uncapped passes."""
    from flowtame.likelihood import nll as engine

    pixels, keys = open_images("embedded:digits:test:0", DIGITS).load_tensor()
    x = dequantize(quantize(pixels, DIGITS.n_bits), dequantization_noise(keys, 0, (1, 16, 16)), DIGITS.n_bits)
    cpu = torch.device("cpu")
    narrow, wide = _tiny_glow(0, hidden=8), _tiny_glow(0, hidden=32)
    assert engine.eval_batch_size(narrow, cpu, 64) == 64  # not measured yet: as asked
    sizes = []
    engine.in_chunks(wide, 100, cpu, 64, lambda i, j: sizes.append(j - i) or torch.zeros(j - i))
    assert sizes[0] == 64 and sum(sizes) == 100  # the first chunk as asked; it measures
    uncapped_set = compute_nll(wide, open_images("embedded:digits:test:0", DIGITS), batch_size=64, device="cpu",
                               draws=2)
    uncapped_wide = engine.batched_nll(wide, x, DIGITS, batch_size=64)
    uncapped_pixels = engine.pixel_nll(wide, pixels, keys, DIGITS, 0, cpu, batch_size=64)
    engine.batched_nll(narrow, x, DIGITS, batch_size=64)
    # a budget of 10 rows of the wide model's largest output: the narrow one (a quarter of the width) gets 4x more
    monkeypatch.setattr(engine, "CPU_ACTIVATION_BYTES", 10 * engine._ROW_BYTES[wide])
    assert engine.eval_batch_size(wide, cpu, 64) == 10
    assert engine.eval_batch_size(narrow, cpu, 64) == 40
    assert engine.eval_batch_size(wide, torch.device("cuda"), 64) == 64  # the GPU keeps its batches
    sizes = []
    engine.in_chunks(wide, 100, cpu, 64, lambda i, j: sizes.append(j - i) or torch.zeros(j - i))
    assert sizes == [10] * 10
    # float rounding only (on the zoo's channels-last models the values were the same to the bit)
    torch.testing.assert_close(engine.batched_nll(wide, x, DIGITS, batch_size=64), uncapped_wide, rtol=1e-6, atol=0)
    np.testing.assert_allclose(engine.pixel_nll(wide, pixels, keys, DIGITS, 0, cpu, batch_size=64),
                               uncapped_pixels, rtol=1e-6, atol=0)
    # compute_nll (evaluate's pass) reads up to 64 files at a time and evaluates them 10 rows at a time
    rows, keyed = [], engine._keyed_nll
    monkeypatch.setattr(engine, "_keyed_nll", lambda model, px, *a, **kw: rows.append(px.shape[0]) or keyed(
        model, px, *a, **kw))
    capped_set = compute_nll(wide, open_images("embedded:digits:test:0", DIGITS), batch_size=64, device="cpu",
                             draws=2)
    assert max(rows) == 10 and sum(rows) == len(keys) == len(capped_set.keys)
    assert capped_set.keys == uncapped_set.keys
    np.testing.assert_allclose(capped_set.nll, uncapped_set.nll, rtol=1e-6, atol=0)


def test_the_neighbour_search_is_sized_like_the_likelihood_passes_on_the_cpu(monkeypatch):
    """find_neighbours (evaluate --neighbours), nearest_rows (taming's look-alikes) and the generation audit's
    distances run their forwards in the rows in_chunks sizes: capped on the CPU for a wide model, with the same
    neighbours (and distances up to float rounding) as uncapped forwards."""
    from flowtame.io.checkpoint import Checkpoint
    from flowtame.likelihood import evaluation
    from flowtame.likelihood import nll as engine
    from flowtame.likelihood.auditing import AuditSets, nearest_training_distances

    spec = GlowSpec(channels=1, image_size=16, n_flow=2, n_block=2, hidden=32, affine=True)
    base = Checkpoint(model=_tiny_glow(0, hidden=32), architecture="glow", spec=spec, data_spec=DIGITS)
    # disjoint sets, as evaluate and tame leave them (remember images with a forget image's pixels are excluded)
    forget, remember = open_images("embedded:digits:test:3", DIGITS), open_images("embedded:digits:train:8", DIGITS)
    forget_pixels, remember_pixels = forget.load_tensor()[0], remember.load_tensor()[0]
    cpu = torch.device("cpu")
    uncapped = evaluation.find_neighbours(base, forget, remember, 20, batch_size=64, device="cpu")
    assert base.model in engine._ROW_BYTES  # measured on its first chunk, which kept the 64 rows asked
    uncapped_rows = evaluation.nearest_rows(base, forget_pixels, remember_pixels, 20, device=cpu, batch_size=64)
    assert uncapped_rows.tolist() == uncapped.indices.tolist()
    audit_sets = AuditSets(forget=[forget], remember=remember, holdout=[])
    queries = {"q": open_images("embedded:digits:test:5", DIGITS).load_tensor()[0]}
    uncapped_audit = nearest_training_distances(base, queries, audit_sets, device="cpu", batch_size=64)["q"]
    monkeypatch.setattr(engine, "CPU_ACTIVATION_BYTES", 10 * engine._ROW_BYTES[base.model])
    rows, latents = [], evaluation._bin_centre_latents
    monkeypatch.setattr(evaluation, "_bin_centre_latents", lambda ckpt, px, device: rows.append(px.shape[0]) or latents(
        ckpt, px, device))
    capped = evaluation.find_neighbours(base, forget, remember, 20, batch_size=64, device="cpu")
    # every forward of both sets (forget latents, streamed remember batches) takes at most 10 rows
    assert max(rows) == 10 and sum(rows) == len(forget) + len(remember) > 64
    assert capped.indices.tolist() == uncapped.indices.tolist()
    # float32 rounding only (the convolutions' kernels differ by batch shape at the last bit of the latents)
    np.testing.assert_allclose(capped.distances, uncapped.distances, rtol=1e-6, atol=0)
    rows.clear()
    capped_rows = evaluation.nearest_rows(base, forget_pixels, remember_pixels, 20, device=cpu, batch_size=64)
    assert max(rows) == 10 and sum(rows) == len(forget) + len(remember)
    assert capped_rows.tolist() == uncapped_rows.tolist()
    rows.clear()
    capped_audit = nearest_training_distances(base, queries, audit_sets, device="cpu", batch_size=64)["q"]
    assert max(rows) == 10 and sum(rows) == len(forget) + len(queries["q"]) + len(remember)
    # exact distances: what differs is the latents' last float32 bit (the kernels differ by batch shape)
    np.testing.assert_allclose(capped_audit.forget, uncapped_audit.forget, rtol=1e-6, atol=0)
    np.testing.assert_allclose(capped_audit.remember, uncapped_audit.remember, rtol=1e-6, atol=0)
