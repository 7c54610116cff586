"""Flow layers and architectures: exact inverses, log-determinants against autograd, ActNorm and LU details,
seeded sampling, gradients and checkpoint round trips, all on tiny instances.

Zero-initialized parameters are perturbed with small random values first, so no check is the trivial identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import jacobian

from flowtame.data.quantization import DataSpec
from flowtame.flows import ARCHITECTURES, MultiScaleFlow, build_model, make_spec
from flowtame.flows.base import Squeeze, Transform, coupling_output_parameters, gaussian_log_prob
from flowtame.flows.glow import ActNorm, ChannelPermutation, GlowCoupling, InvConv1x1, InvConv1x1LU
from flowtame.flows.nice import DiagonalScaling, NICESpec
from flowtame.flows.realnvp import AffineCoupling, RealNVPSpec
from flowtame.flows.tarflow import Patchify, ScaleData, TarFlowBlock
from flowtame.flows.vector import MAFLayer, MAFSpec, MLPCoupling, VectorRealNVPSpec
from flowtame.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny: one thread is faster than two, especially on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb(module: nn.Module, std: float = 0.2) -> nn.Module:
    """Add noise to every parameter and mark every ActNorm initialized; returns ``module``.

    The noise std is ``std``, divided by sqrt(fan-in) for weights: each layer's output moves by about ``std``.
    """
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param[0].numel() if param.dim() >= 2 else 1
            param.add_(torch.randn_like(param) * std / math.sqrt(fan_in))
        for sub in module.modules():
            if isinstance(sub, ActNorm):
                sub.initialized.fill_(1.0)
    return module


def jacobian_log_abs_det(fn: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
    """log|det J| per sample of ``fn`` (a map of one-sample batches, flattened), inputs [B, ...] -> [B]."""
    values = []
    for sample in inputs:
        jac = jacobian(lambda v: fn(v.unsqueeze(0)).flatten(), sample, vectorize=True)
        sign, log_abs_det = torch.linalg.slogdet(jac.reshape(jac.shape[0], -1))
        assert sign != 0, "the Jacobian is singular"
        values.append(log_abs_det)
    return torch.stack(values)


def flat_latents(latents: list[Tensor]) -> Tensor:
    return torch.cat([z.flatten(1) for z in latents], 1)


def unflatten_latents(flat: Tensor, shapes: tuple[tuple[int, ...], ...]) -> list[Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [part.reshape(flat.shape[0], *s) for part, s in zip(flat.split(sizes, 1), shapes, strict=True)]


# ----------------------------------------------------------------------------------------------- layers

LAYERS: dict[str, tuple[Callable[[], Transform], tuple[int, ...]]] = {
    "actnorm": (lambda: ActNorm(3), (3, 4, 4)),
    "invconv": (lambda: InvConv1x1(4), (4, 2, 2)),
    "invconv-lu": (lambda: InvConv1x1LU(4), (4, 2, 2)),
    "glow-coupling-additive": (lambda: GlowCoupling(4, 8, affine=False), (4, 3, 3)),
    "glow-coupling-affine": (lambda: GlowCoupling(4, 8, affine=True), (4, 3, 3)),
    "glow-coupling-y0ast-affine": (lambda: GlowCoupling(4, 8, True, net_actnorm=True, log_actnorm=True,
                                                        interleaved=True, pad_value=0.0), (4, 3, 3)),
    "glow-coupling-y0ast-additive": (lambda: GlowCoupling(4, 8, False, net_actnorm=True, log_actnorm=True,
                                                          interleaved=True, pad_value=0.0), (4, 3, 3)),
    "actnorm-log-scale": (lambda: ActNorm(3, log_scale=True), (3, 4, 4)),
    "permutation-reverse": (lambda: ChannelPermutation(4, shuffle=False), (4, 2, 2)),
    "permutation-shuffle": (lambda: ChannelPermutation(5, shuffle=True), (5, 2, 2)),
    "tarflow-block": (lambda: TarFlowBlock(4, 8, 3, 2, 2, 2, flip=False), (3, 4)),
    "tarflow-block-flipped": (lambda: TarFlowBlock(4, 8, 3, 1, 2, 2, flip=True), (3, 4)),
    "tarflow-block-volume-preserving": (lambda: TarFlowBlock(4, 8, 3, 1, 2, 2, flip=False, nvp=False), (3, 4)),
    "tarflow-block-class-conditional": (lambda: TarFlowBlock(4, 8, 3, 1, 1, 2, flip=True, num_classes=3), (3, 4)),
    "patchify": (lambda: Patchify(2, (2, 4, 6)), (2, 4, 6)),
    "scale-data": (lambda: ScaleData(2.0), (2, 3, 3)),
    "squeeze": (Squeeze, (2, 4, 4)),
    "realnvp-checkerboard-0": (lambda: AffineCoupling(2, 8, 1, "checkerboard", 0), (2, 3, 3)),
    "realnvp-checkerboard-1": (lambda: AffineCoupling(2, 8, 1, "checkerboard", 1), (2, 3, 3)),
    "realnvp-channel-0": (lambda: AffineCoupling(4, 8, 1, "channel", 0), (4, 2, 2)),
    "realnvp-channel-1": (lambda: AffineCoupling(4, 8, 1, "channel", 1), (4, 2, 2)),
    "nice-coupling-even": (lambda: MLPCoupling(9, 0, 8, 2, affine=False), (1, 3, 3)),
    "nice-coupling-odd": (lambda: MLPCoupling(9, 1, 8, 2, affine=False), (1, 3, 3)),
    "nice-scaling": (lambda: DiagonalScaling(9), (1, 3, 3)),
    "vector-coupling-even": (lambda: MLPCoupling(2, 0, 8, 2, affine=True), (2,)),
    "vector-coupling-odd": (lambda: MLPCoupling(5, 1, 8, 2, affine=True), (5,)),
    "maf-layer": (lambda: MAFLayer(3, 8, 2, reverse=False), (3,)),
    "maf-layer-reversed": (lambda: MAFLayer(4, 8, 2, reverse=True), (4,)),
}


def make_layer(name: str, dtype: torch.dtype) -> tuple[Transform, Tensor]:
    factory, shape = LAYERS[name]
    layer = perturb(factory()).to(dtype).eval()
    return layer, torch.randn(3, *shape, dtype=dtype)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_layer_round_trip_and_contract(name: str, dtype: torch.dtype, tol: float) -> None:
    layer, x = make_layer(name, dtype)
    y, log_det = layer(x)
    assert y.shape == (x.shape[0], *layer.output_shape(tuple(x.shape[1:])))
    assert log_det.shape == (x.shape[0],) and log_det.dtype == dtype and log_det.device == x.device
    assert (layer.inverse(y) - x).abs().max() < tol


@pytest.mark.parametrize("name", LAYERS)
def test_layer_log_det_matches_autograd_jacobian(name: str) -> None:
    layer, x = make_layer(name, torch.float64)
    _, log_det = layer(x)
    expected = jacobian_log_abs_det(lambda v: layer(v)[0], x)
    torch.testing.assert_close(log_det, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["realnvp-checkerboard-0", "realnvp-channel-1", "nice-coupling-odd",
                                  "vector-coupling-even"])
def test_fresh_coupling_is_identity(name: str) -> None:
    layer = LAYERS[name][0]()
    x = torch.randn(2, *LAYERS[name][1])
    y, log_det = layer(x)
    assert torch.equal(y, x) and torch.equal(log_det, torch.zeros(2))


@pytest.mark.parametrize("reverse", [False, True])
def test_maf_layer_is_autoregressive_in_its_order(reverse: bool) -> None:
    dim = 4
    layer = perturb(MAFLayer(dim, 8, 2, reverse=reverse)).double()
    jac = jacobian(lambda v: layer(v.unsqueeze(0))[0][0], torch.randn(dim, dtype=torch.float64))
    order = torch.arange(dim).flip(0) if reverse else torch.arange(dim)
    jac_in_order = jac[order][:, order]
    assert torch.equal(jac_in_order, torch.tril(jac_in_order)), "z_i may depend only on earlier x_j"


# ----------------------------------------------------------------------------------------------- ActNorm


def shifted_batch() -> Tensor:
    """[32, 3, 4, 4] with per-channel means (1, -2, 3) and stds (0.5, 2, 5)."""
    return (torch.randn(32, 3, 4, 4) * torch.tensor([0.5, 2.0, 5.0]).view(1, 3, 1, 1)
            + torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1))


def assert_standardized(y: Tensor) -> None:
    flat = y.transpose(0, 1).reshape(y.shape[1], -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(flat.std(1), torch.ones(3), rtol=0, atol=1e-4)


def test_actnorm_initializes_from_the_first_training_batch_only() -> None:
    layer = ActNorm(3).train()
    y, _ = layer(shifted_batch())
    assert_standardized(y)
    assert layer.initialized.item() == 1.0
    loc, scale = layer.loc.detach().clone(), layer.scale.detach().clone()
    layer(shifted_batch() * 3)
    assert torch.equal(layer.loc, loc) and torch.equal(layer.scale, scale)


def test_actnorm_with_initialized_buffer_is_never_reinitialized() -> None:
    trained = ActNorm(3).train()
    trained(shifted_batch())
    loaded = ActNorm(3)
    loaded.load_state_dict(trained.state_dict())
    loaded.train()(torch.randn(8, 3, 4, 4) * 10)
    assert torch.equal(loaded.loc, trained.loc) and torch.equal(loaded.scale, trained.scale)
    marked = ActNorm(3)
    marked.initialized.fill_(1.0)
    x = shifted_batch()
    y, _ = marked.train()(x)
    assert torch.equal(y, x)


def test_actnorm_never_initializes_in_eval_mode() -> None:
    layer = ActNorm(3).eval()
    x = shifted_batch()
    y, log_det = layer(x)
    assert torch.equal(y, x) and torch.equal(log_det, torch.zeros(32))
    assert layer.initialized.item() == 0.0
    y, _ = layer.train()(x)
    assert_standardized(y)


def test_actnorm_load_of_uninitialized_state_resets_cached_flag() -> None:
    layer = ActNorm(3).train()
    layer(torch.randn(16, 3, 4, 4))
    layer.load_state_dict(ActNorm(3).state_dict())
    assert layer.initialized.item() == 0.0
    y, _ = layer(shifted_batch())
    assert_standardized(y)
    assert layer.initialized.item() == 1.0


# ----------------------------------------------------------------------------------------------- LU 1x1 conv


def test_lu_invconv_stays_consistent_after_adam_steps() -> None:
    layer = InvConv1x1LU(4)
    initial_weight = layer.weight_matrix().detach().double()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(16, 4, 3, 3) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1)
    for _ in range(10):
        y, log_det = layer(x)
        loss = -(gaussian_log_prob(y).flatten(1).sum(1) + log_det).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weight = layer.weight_matrix().detach().double()
    torch.testing.assert_close(torch.linalg.slogdet(weight)[1], layer.w_s.detach().double().sum(),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(weight, initial_weight), "the Adam steps should have changed W"
    y, _ = layer(x)
    assert (layer.inverse(y) - x).abs().max() < 1e-4
    with torch.no_grad():
        layer.w_l.add_(torch.randn(4, 4) * (1 - layer.l_mask))
        layer.w_u.add_(torch.randn(4, 4) * (1 - layer.u_mask))
    assert torch.equal(layer.weight_matrix().detach(), weight.float())


# ------------------------------------------------------------------------------------------- architectures

TINY_GLOW = dict(image_size=4, n_flow=2, n_block=2, hidden=8)
Y0AST_LAYOUT = dict(log_actnorm=True, net_actnorm=True, interleaved=True, zero_pad=True, top_prior="buffer")
IMAGE_ARCHS: dict[str, tuple[str, dict]] = {
    "glow-additive-lu": ("glow", dict(TINY_GLOW, channels=1, affine=False)),
    "glow-affine-lu": ("glow", dict(TINY_GLOW, channels=3, affine=True)),
    "glow-additive-plain": ("glow", dict(TINY_GLOW, channels=1, affine=False, conv_lu=[False] * 4)),
    "glow-affine-plain": ("glow", dict(TINY_GLOW, channels=1, affine=True, conv_lu=[False] * 4)),
    "glow-y0ast-affine-lu": ("glow", dict(TINY_GLOW, channels=3, affine=True, **Y0AST_LAYOUT)),
    "glow-y0ast-additive-shuffle": ("glow", dict(TINY_GLOW, channels=1, affine=False, permutation="shuffle",
                                                 **{**Y0AST_LAYOUT, "top_prior": "standard"})),
    "glow-y0ast-affine-reverse": ("glow", dict(TINY_GLOW, channels=1, affine=True, permutation="reverse",
                                               **Y0AST_LAYOUT)),
    "tarflow": ("tarflow", dict(channels=1, image_size=4, patch_size=2, width=8, n_block=2, layers_per_block=1,
                                heads=2, expansion=2)),
    "tarflow-conditional": ("tarflow", dict(channels=3, image_size=6, patch_size=3, width=8, n_block=3,
                                            layers_per_block=2, heads=1, expansion=2, num_classes=3,
                                            class_label=2)),
    "realnvp": ("realnvp", dict(channels=3, image_size=4, n_scales=2, hidden=8, n_res_blocks=1)),
    "nice": ("nice", dict(channels=1, image_size=4, n_couplings=4, hidden=16, n_hidden_layers=2)),
}
VECTOR_ARCHS: dict[str, tuple[str, dict]] = {
    "vector-realnvp": ("vector-realnvp", dict(dim=2, n_couplings=4, hidden=16, n_hidden_layers=2)),
    "maf": ("maf", dict(dim=3, n_layers=3, hidden=16, n_hidden_layers=2)),
}
ARCHS = {**IMAGE_ARCHS, **VECTOR_ARCHS}


def make_model(name: str, dtype: torch.dtype = torch.float32) -> MultiScaleFlow:
    architecture, hyperparameters = ARCHS[name]
    return perturb(build_model(architecture, make_spec(architecture, hyperparameters))).to(dtype).eval()


def test_every_registered_architecture_is_tested() -> None:
    assert {arch for arch, _ in ARCHS.values()} == set(ARCHITECTURES)
    assert {ARCHITECTURES[arch].kind for arch, _ in VECTOR_ARCHS.values()} == {"vector"}
    assert {ARCHITECTURES[arch].kind for arch, _ in IMAGE_ARCHS.values()} == {"image"}


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_model_round_trip_and_shapes(name: str, dtype: torch.dtype, tol: float) -> None:
    model = make_model(name, dtype)
    x = torch.randn(3, *model.event_shape, dtype=dtype)
    latents, log_det = model.encode(x)
    assert [tuple(z.shape[1:]) for z in latents] == list(model.latent_shapes)
    assert sum(math.prod(s) for s in model.latent_shapes) == model.num_dims
    assert log_det.shape == (3,) and log_det.dtype == dtype
    assert (model.decode(latents) - x).abs().max() < tol
    log_prob = model.log_prob(x)
    assert log_prob.shape == (3,) and log_prob.dtype == dtype and torch.isfinite(log_prob).all()
    assert model.sample(2).shape == (2, *model.event_shape)
    noise = model.sample_noise(4, temperature=0.7)
    assert [tuple(n.shape) for n in noise] == [(4, *s) for s in model.latent_shapes]
    assert model.decode_noise(noise).shape == (4, *model.event_shape)


@pytest.mark.parametrize("name", ARCHS)
def test_model_log_det_matches_autograd_jacobian(name: str) -> None:
    model = make_model(name, torch.float64)
    x = torch.randn(2, *model.event_shape, dtype=torch.float64)
    _, log_det = model.encode(x)
    expected = jacobian_log_abs_det(lambda v: flat_latents(model.encode(v)[0]), x)
    torch.testing.assert_close(log_det, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ARCHS)
def test_log_prob_agrees_with_decode_noise_change_of_variables(name: str) -> None:
    """log p(g(eps)) = log N(eps; 0, I) - log|det dg/deps|, g = decode_noise: checks the (learned) priors."""
    model = make_model(name, torch.float64)

    def decode_flat_noise(flat: Tensor) -> Tensor:
        return model.decode_noise(unflatten_latents(flat, model.latent_shapes))

    noise = flat_latents(model.sample_noise(2))
    x = decode_flat_noise(noise)
    log_abs_det = jacobian_log_abs_det(decode_flat_noise, noise)
    expected = gaussian_log_prob(noise).sum(1) - log_abs_det
    torch.testing.assert_close(model.log_prob(x), expected, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("name", ARCHS)
def test_coupling_output_parameters_are_each_conditioners_zero_initialized_last_layer(name: str) -> None:
    architecture, hyperparameters = ARCHS[name]
    model = build_model(architecture, make_spec(architecture, hyperparameters))  # freshly initialized
    names = coupling_output_parameters(model)
    conditioners = [m for m in model.modules() if isinstance(m, Transform) and m.coupling_output() is not None]
    assert conditioners
    assert len(names) == sum(len(list(m.coupling_output().parameters())) for m in conditioners)
    params = dict(model.named_parameters())
    assert all(torch.count_nonzero(params[n]) == 0 for n in names)


@pytest.mark.parametrize("name", VECTOR_ARCHS)
def test_vector_log_prob_is_the_change_of_variables(name: str) -> None:
    model = make_model(name, torch.float64)
    x = torch.randn(4, *model.event_shape, dtype=torch.float64)
    latent = model.encode(x)[0][0]
    expected = (-0.5 * math.log(2 * math.pi) - 0.5 * latent.square()).sum(1)
    expected = expected + jacobian_log_abs_det(lambda v: model.encode(v)[0][0], x)
    torch.testing.assert_close(model.log_prob(x), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["realnvp", "nice", "vector-realnvp", "maf"])
def test_fresh_model_has_zero_log_det_and_exact_inverse(name: str) -> None:
    architecture, hyperparameters = ARCHS[name]
    model = build_model(architecture, make_spec(architecture, hyperparameters))
    x = torch.randn(2, *model.event_shape)
    latents, log_det = model.encode(x)
    assert torch.equal(log_det, torch.zeros(2))
    assert torch.equal(model.decode(latents), x)


@pytest.mark.parametrize("name", ARCHS)
def test_same_generator_seed_gives_same_samples(name: str) -> None:
    model = make_model(name)
    first = model.sample(3, temperature=0.8, generator=torch.Generator().manual_seed(7))
    again = model.sample(3, temperature=0.8, generator=torch.Generator().manual_seed(7))
    other = model.sample(3, temperature=0.8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", ARCHS)
def test_gradients_reach_every_parameter(name: str) -> None:
    model = make_model(name).train()
    model.log_prob(torch.randn(4, *model.event_shape)).mean().neg().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        if param_name.endswith("prior.conv.conv.weight"):  # y0ast's top prior: a conv of a zero buffer (by design)
            continue
        assert param.grad.abs().sum() > 0, f"no gradient reaches {param_name}"


@pytest.mark.parametrize("name", ARCHS)
def test_checkpoint_round_trip_keeps_log_prob(name: str, tmp_path) -> None:
    architecture, hyperparameters = ARCHS[name]
    spec = make_spec(architecture, hyperparameters)
    model = perturb(build_model(architecture, spec)).eval()
    data_spec = DataSpec(spec.image_size, spec.channels, 5) if name in IMAGE_ARCHS else None
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, Checkpoint(model, architecture, spec, data_spec, provenance={"notes": "test"}))
    loaded = load_checkpoint(path)
    assert loaded.architecture == architecture and loaded.spec == spec and loaded.data_spec == data_spec
    x = torch.randn(3, *model.event_shape)
    with torch.no_grad():
        assert torch.equal(loaded.model.log_prob(x), model.log_prob(x))


# ----------------------------------------------------------------------------------------------- specs


@pytest.mark.parametrize("spec_class, hyperparameters", [
    (RealNVPSpec, dict(channels=3, image_size=8)),
    (NICESpec, dict(channels=1, image_size=4)),
    (VectorRealNVPSpec, dict(dim=2)),
    (MAFSpec, dict(dim=5)),
])
def test_spec_to_dict_rebuilds_the_spec(spec_class: type, hyperparameters: dict) -> None:
    spec = spec_class(**hyperparameters)
    assert spec_class(**spec.to_dict()) == spec


@pytest.mark.parametrize("spec_class, hyperparameters, message", [
    (RealNVPSpec, dict(channels=3, image_size=6, n_scales=3), "divisible"),
    (RealNVPSpec, dict(channels=3, image_size=8, hidden=0), "positive"),
    (RealNVPSpec, dict(channels=3, image_size=8, n_res_blocks=-1), "non-negative"),
    (NICESpec, dict(channels=1, image_size=1), "at least 2"),
    (NICESpec, dict(channels=1, image_size=4, n_couplings=0), "positive"),
    (VectorRealNVPSpec, dict(dim=1), "at least 2"),
    (VectorRealNVPSpec, dict(dim=2, n_hidden_layers=0), "positive"),
    (MAFSpec, dict(dim=1), "at least 2"),
    (MAFSpec, dict(dim=3, n_layers=0), "positive"),
])
def test_spec_rejects_bad_hyperparameters(spec_class: type, hyperparameters: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec_class(**hyperparameters)


def test_realnvp_layout() -> None:
    spec = RealNVPSpec(channels=1, image_size=8, n_scales=3, hidden=4, n_res_blocks=0)
    model = build_model("realnvp", spec)
    assert model.latent_shapes == ((2, 4, 4), (4, 2, 2), (4, 2, 2))
    first, last = model.levels[0], model.levels[-1]
    assert isinstance(first.steps[3], Squeeze)
    couplings = first.steps[:3] + first.steps[4:]
    expected = [("checkerboard", 0), ("checkerboard", 1), ("checkerboard", 0), ("channel", 0), ("channel", 1),
                ("channel", 0)]
    assert [(s.mask_type, s.parity) for s in couplings] == expected
    assert first.split and first.prior is None
    assert [(s.mask_type, s.parity) for s in last.steps] == [("checkerboard", k % 2) for k in range(4)]
    assert not last.split and last.prior is None
