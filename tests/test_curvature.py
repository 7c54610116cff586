"""The remember curvature metric (flowtame.methods.curvature): K-FAC factors against autograd in float64, the
preconditioned update against its formula, and its place in a tame run."""

from __future__ import annotations

import pytest
import torch
from test_baselines import DATA_SPEC, FAST, REMEMBER, forget_folder, tiny_glow  # noqa: F401 (a fixture)

from flowtame.data.images import open_images
from flowtame.io.checkpoint import Checkpoint
from flowtame.jobs.tame import make_config, tame
from flowtame.likelihood.nll import nll_nats
from flowtame.methods import taming
from flowtame.methods.baselines import diagonal_fisher
from flowtame.methods.curvature import DAMPING, MAX_STRETCH, KroneckerMetric, constrained_step, kfac_factors
from flowtame.methods.objective import forget_loss
from flowtame.methods.taming import TamingMethod


def _model_and_inputs(n: int = 3):
    model, _ = tiny_glow(affine=True)
    model = model.double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the zero initialization, so that every layer's output gradient is nonzero
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    x = (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5).double()
    return model, x


def _trained(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if "coupling.net.4" not in name]  # outputs frozen


def _convs(model, names) -> dict[str, torch.nn.Conv2d]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and f"{name}.weight" in set(names)}


def test_kfac_factors_are_the_patch_and_output_gradient_moments_and_rebuild_the_gradient():
    model, x = _model_and_inputs()
    layers = _convs(model, _trained(model))
    assert len(layers) >= 4
    factors = kfac_factors(model, x, DATA_SPEC, layers, chunk=2)
    hand_a = {name: 0.0 for name in layers}
    hand_g = {name: 0.0 for name in layers}
    outputs = {}
    for xi in x:
        outputs.clear()
        handles = [m.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, (inp[0], out)))
                   for name, m in layers.items()]
        try:
            nll = nll_nats(model, xi.unsqueeze(0), DATA_SPEC).sum()
        finally:
            for handle in handles:
                handle.remove()
        names = list(layers)
        grads = torch.autograd.grad(nll, [outputs[n][1] for n in names] + [layers[n].weight for n in names])
        for i, name in enumerate(names):
            module, (inp, _) = layers[name], outputs[name]
            g = grads[i][0].flatten(1)  # [out, T]
            patches = torch.nn.functional.unfold(inp, module.kernel_size, module.dilation, module.padding,
                                                 module.stride)[0]  # [in*kh*kw, T]
            patches = torch.cat([patches, torch.ones_like(patches[:1])])  # the bias column
            positions = patches.shape[1]
            hand_a[name] = hand_a[name] + sum(torch.outer(patches[:, t], patches[:, t])
                                              for t in range(positions)) / positions / x.shape[0]
            hand_g[name] = hand_g[name] + sum(torch.outer(g[:, t], g[:, t]) for t in range(positions)) / x.shape[0]
            # the layouts agree with the weight's: sum_t g_t a_t^T is this image's weight gradient
            rebuilt = (g @ patches[:-1].T).reshape(module.weight.shape)
            torch.testing.assert_close(rebuilt, grads[len(names) + i], rtol=1e-9, atol=1e-12)
    fisher = diagonal_fisher(model, x, DATA_SPEC)  # per-image gradients by torch.func, every parameter
    for name in layers:
        torch.testing.assert_close(factors[name].a, hand_a[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(factors[name].g, hand_g[name], rtol=1e-9, atol=1e-12)
        # the diagonal from each image's rebuilt weight gradient, as the per-image autograd pass has it
        torch.testing.assert_close(factors[name].weight_fisher, fisher[f"{name}.weight"], rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(factors[name].bias_fisher, fisher[f"{name}.bias"], rtol=1e-9, atol=1e-14)
    assert all(float(f.g.diagonal().sum()) > 0 and float(f.weight_fisher.sum()) > 0 for f in factors.values())


def test_apply_inverts_the_damped_kronecker_blocks_and_the_diagonal():
    model, x = _model_and_inputs()
    names = _trained(model)
    damping = 0.05
    metric = KroneckerMetric(model, x, DATA_SPEC, names, damping)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(2)
    vectors = {n: torch.randn(params[n].shape, generator=generator, dtype=torch.float64) for n in names}
    out = metric.apply(vectors)
    fisher = diagonal_fisher(model, x, DATA_SPEC)
    scale = float(torch.cat([fisher[n].flatten() for n in names]).mean())
    layers = _convs(model, names)
    factors = kfac_factors(model, x, DATA_SPEC, layers)
    in_blocks = set()
    for name, (a, g, _, _) in factors.items():
        pi = (float(a.diagonal().mean()) / float(g.diagonal().mean())) ** 0.5
        gamma = (damping * scale) ** 0.5
        weight, bias = f"{name}.weight", f"{name}.bias"
        u_in = torch.cat([vectors[weight].reshape(vectors[weight].shape[0], -1), vectors[bias].reshape(-1, 1)], 1)
        u_out = torch.cat([out[weight].reshape(out[weight].shape[0], -1), out[bias].reshape(-1, 1)], 1)
        # the block is (A + pi gamma) (x) (G + gamma / pi) / scale acting on U [out, in']: G~ U A~ / scale
        metric_times = (g + gamma / pi * torch.eye(g.shape[0], dtype=g.dtype)) @ u_out \
            @ (a + pi * gamma * torch.eye(a.shape[0], dtype=a.dtype)) / scale
        torch.testing.assert_close(metric_times, u_in, rtol=1e-7, atol=1e-9)
        in_blocks |= {weight, bias}
    rest = [n for n in names if n not in in_blocks]
    assert rest  # actnorms and 1x1 convolutions: the diagonal
    for n in rest:
        torch.testing.assert_close(out[n] * (fisher[n] / scale + damping), vectors[n], rtol=1e-9, atol=1e-12)

    rows = {n: torch.randn(3, *params[n].shape, generator=generator, dtype=torch.float64) for n in names}
    batched = metric.apply_rows(rows)  # three independent rows at once: each is apply's (checked above) of it
    assert list(batched) == names
    for i in range(3):
        single = metric.apply({n: rows[n][i] for n in names})
        for n in names:
            torch.testing.assert_close(batched[n][i], single[n], rtol=1e-6, atol=1e-9)


def test_update_keeps_the_forget_terms_first_order_change_within_the_stretch_cap():
    model, x = _model_and_inputs()
    names = _trained(model)
    metric = KroneckerMetric(model, x, DATA_SPEC, names)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(3)
    update = {n: 1e-3 * torch.randn(params[n].shape, generator=generator, dtype=torch.float64) for n in names}
    gradient = {n: -u * 50 + torch.randn(u.shape, generator=generator, dtype=torch.float64) * 1e-3
                for n, u in update.items()}  # the update lowers the forget term

    def dot(a, b):
        return sum(float((a[n] * b[n]).sum()) for n in names)

    new = metric.update(update, gradient, max_stretch=1e6)
    assert dot(gradient, new) == pytest.approx(dot(gradient, update), rel=1e-10)
    pre = metric.apply(update)
    assert dot(new, pre) == pytest.approx((dot(new, new) * dot(pre, pre)) ** 0.5, rel=1e-10)  # along M^-1 u
    stretch = (dot(new, new) / dot(update, update)) ** 0.5
    capped = metric.update(update, gradient, max_stretch=stretch / 2)
    assert dot(capped, capped) ** 0.5 == pytest.approx(stretch / 2 * dot(update, update) ** 0.5, rel=1e-10)
    assert dot(capped, pre) == pytest.approx((dot(capped, capped) * dot(pre, pre)) ** 0.5, rel=1e-10)
    kept = metric.update(update, {n: -g for n, g in gradient.items()})  # u raises the forget term: kept as is
    assert all(torch.equal(kept[n], update[n]) for n in names)


def test_tame_preconditions_every_update_by_default_and_precondition_none_does_not(monkeypatch,
                                                                                     forget_folder):  # noqa: F811
    model, spec = tiny_glow()
    base = Checkpoint(model=model, architecture="glow", spec=spec, data_spec=DATA_SPEC)
    calls = []
    transform = TamingMethod.transform_update

    def counted(self, model, before):
        calls.append(self.metric is not None)
        return transform(self, model, before)

    monkeypatch.setattr(TamingMethod, "transform_update", counted)
    remember = open_images(REMEMBER, DATA_SPEC)
    forget = open_images(forget_folder, DATA_SPEC)
    runs = {}
    for precondition in (None, "none"):  # None: the default
        calls.clear()
        outcome = tame(base, [forget], remember, make_config(FAST, {"max_iters": 6, "precondition": precondition}))
        runs[precondition or "default"] = (outcome, list(calls))
    kfac, none = runs["default"], runs["none"]
    assert kfac[0].report["iterations"] == 6 and kfac[1] == [True] * 6
    assert none[1] == []
    assert kfac[0].report["config"]["precondition"] == "kfac"  # the report shows the resolved value
    assert none[0].report["config"]["precondition"] == "none"
    changed = max(float((a - b).abs().max()) for a, b in zip(kfac[0].checkpoint.model.state_dict().values(),
                                                             none[0].checkpoint.model.state_dict().values(),
                                                             strict=True))
    assert changed > 1e-6


def test_precondition_defaults_to_the_methods_own_and_kfac_is_refused_for_the_baselines():
    """With Adam's step the taming method's default is the curvature step (an explicit kfac is the same config);
    the baselines and ``--preset paper`` run as published, with Adam's update, and asking for the metric there is
    a usage error."""
    from flowtame.errors import InputError
    from flowtame.jobs.tame import TameConfig, preset

    assert TameConfig().precondition == "kfac" and TameConfig(target="holdout").precondition == "kfac"
    assert make_config(FAST, {"precondition": "kfac"}) == make_config(FAST)
    assert make_config(FAST, {"precondition": "none"}).precondition == "none"
    assert make_config(preset("paper")).precondition == "none" and make_config(preset("paper")).step == "adam"
    assert make_config(preset("paper"), {"precondition": "kfac"}).precondition == "kfac"  # flags win
    for method in ("neggrad", "selective-amnesia"):
        assert make_config(FAST, {"method": method}).precondition == "none"
        with pytest.raises(InputError, match="taming method only"):
            make_config(FAST, {"method": method, "precondition": "kfac"})
    with pytest.raises(InputError, match="precondition must be one of kfac, none"):
        make_config({"precondition": "diagonal"})


def _reference_metric(model, x, names, damping=DAMPING):
    """The metric as built before round 7b: the diagonal Fisher from per-image gradients of every parameter
    (torch.func), the factors as float64 products; (scale, weight -> (G~^-1, A~^-1), name -> diagonal)."""
    fisher = diagonal_fisher(model, x, DATA_SPEC)
    scale = float(torch.cat([fisher[n].flatten() for n in names]).double().mean())
    blocks, in_blocks = {}, set()
    for name, layer in _convs(model, names).items():
        a, g = _float64_factors(model, x, name, layer)
        pi = (float(a.diagonal().mean()) / float(g.diagonal().mean())) ** 0.5
        gamma = (damping * scale) ** 0.5
        blocks[f"{name}.weight"] = (scale * torch.linalg.inv(g + gamma / pi * torch.eye(g.shape[0], dtype=g.dtype)),
                                    torch.linalg.inv(a + pi * gamma * torch.eye(a.shape[0], dtype=a.dtype)))
        in_blocks |= {f"{name}.weight", f"{name}.bias"}
    diagonal = {n: 1.0 / (fisher[n].double() / scale + damping) for n in names if n not in in_blocks}
    return scale, blocks, diagonal


def _float64_factors(model, x, name, layer):
    """One layer's K-FAC factors with the products in float64 (the pre-7b code's einsums)."""
    seen = {}
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0].detach(), out=out))
    try:
        nll = nll_nats(model, x, DATA_SPEC).sum()
    finally:
        handle.remove()
    g = torch.autograd.grad(nll, seen["out"])[0].double().flatten(2)
    a = torch.nn.functional.unfold(seen["inp"], layer.kernel_size, layer.dilation, layer.padding,
                                   layer.stride).double()
    a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
    return (torch.einsum("nit,njt->ij", a, a) / a.shape[2] / x.shape[0],
            torch.einsum("nit,njt->ij", g, g) / x.shape[0])


def _reference_update(blocks, diagonal, update, gradient, max_stretch=MAX_STRETCH):
    """The pre-7b update: per tensor, in float64."""
    pre = {n: u.double() * diagonal[n] for n, u in update.items() if n in diagonal}
    for weight, (g_inv, a_inv) in blocks.items():
        bias = weight.replace(".weight", ".bias")
        w = update[weight].double()
        u = torch.cat([w.reshape(w.shape[0], -1), update[bias].double().reshape(-1, 1)], 1)
        u = g_inv @ u @ a_inv
        pre[weight], pre[bias] = u[:, :w[0].numel()].reshape(w.shape), u[:, -1]
    first = sum(float((gradient[n].double() * update[n].double()).sum()) for n in update)
    first_pre = sum(float((gradient[n].double() * pre[n]).sum()) for n in update)
    length = sum(float(u.double().square().sum()) for u in update.values()) ** 0.5
    length_pre = sum(float(p.square().sum()) for p in pre.values()) ** 0.5
    c = min(first / first_pre, max_stretch * length / length_pre)
    return {n: c * pre[n] if first < 0 and first_pre < 0 else update[n].double() for n in update}


def _relative(new, old) -> float:
    a = torch.cat([v.flatten() for v in new.values()])
    b = torch.cat([old[n].flatten() for n in new])
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_one_pass_metric_is_the_reference_metric(dtype):
    """The diagonal from the K-FAC pass (only the values outside the blocks per image by torch.func) and the
    flat update equal the pre-7b construction: to float64 rounding on a float64 model; on a float32 model the
    factors' float32 products move the update by < 1e-5 relative."""
    model, x = _model_and_inputs(n=5)
    model, x = model.to(dtype), x.to(dtype)
    names = _trained(model)
    metric = KroneckerMetric(model, x, DATA_SPEC, names)
    scale, blocks, diagonal = _reference_metric(model, x, names)
    tight = dtype == torch.float64
    assert set(metric.blocks) == set(blocks) and set(metric.diagonal) == set(diagonal)
    for n, d in diagonal.items():
        torch.testing.assert_close(metric.diagonal[n], d, rtol=1e-9 if tight else 1e-5, atol=0)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(4)
    update = {n: 1e-3 * torch.randn(params[n].shape, generator=generator, dtype=dtype) for n in names}
    gradient = {n: -u * 50 + torch.randn(u.shape, generator=generator, dtype=dtype) * 1e-3
                for n, u in update.items()}
    assert _relative(metric.update(update, gradient), _reference_update(blocks, diagonal, update, gradient)) \
        < (1e-10 if tight else 1e-5)
    stretched = metric.update(update, gradient, max_stretch=1.5)  # the cap binds
    assert _relative(stretched, _reference_update(blocks, diagonal, update, gradient, 1.5)) < (1e-10 if tight
                                                                                                else 1e-5)


def _two_pass_forward(self, model, x, forget_idx, n_forget):
    """TamingMethod._forward_keeping_forget_gradient before round 7b: the forget rows' graph kept and walked
    again by the loss's backward."""
    nll_forget = nll_nats(model, x[:n_forget], self.data.data_spec)
    term = self.alpha * forget_loss(nll_forget, self.mu_r, self.sigma_r, delta=self.delta,
                                    kind=self.forget_loss_kind, unit=self.forget_unit,
                                    nats_per_bpd=self.nats_per_bpd, weight=self.forget_weight[forget_idx])
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    gradient = torch.autograd.grad(term, [p for _, p in trained], retain_graph=True)
    self.forget_gradient = {name: g for (name, _), g in zip(trained, gradient, strict=True)}
    return torch.cat([nll_forget, nll_nats(model, x[n_forget:], self.data.data_spec)])


def test_the_forget_rows_gradient_reused_in_the_loss_takes_the_two_pass_steps(monkeypatch, forget_folder):  # noqa: F811
    """With the anchor on (the default), the loss's backward takes the forget rows' share from the forget
    gradient already computed instead of walking their graph again: the same steps to float rounding."""
    model, spec = tiny_glow()
    base = Checkpoint(model=model, architecture="glow", spec=spec, data_spec=DATA_SPEC)
    remember = open_images(REMEMBER, DATA_SPEC)
    forget = open_images(forget_folder, DATA_SPEC)
    config = make_config(FAST, {"max_iters": 8, "precondition": "kfac", "anchor": 0.2})
    fused = tame(base, [forget], remember, config)
    monkeypatch.setattr(TamingMethod, "_forward_keeping_forget_gradient", _two_pass_forward)
    monkeypatch.setattr(taming, "_gradient_surrogate", lambda model, gradient: torch.zeros(()))
    two_pass = tame(base, [forget], remember, config)
    assert fused.report["iterations"] == two_pass.report["iterations"] == 8
    start, reference = dict(model.state_dict()), two_pass.checkpoint.model.state_dict()
    moved = max(float((reference[n] - start[n]).abs().max()) for n in start)
    differ = max(float((p - reference[n]).abs().max()) for n, p in fused.checkpoint.model.state_dict().items())
    assert moved > 1e-3 and differ < 1e-5 * moved


def test_a_prior_convolving_one_stored_buffer_takes_the_per_image_diagonal_not_a_kronecker_block():
    """y0ast's top prior convolves one stored buffer and expands it to the batch: the batched pass sees one row
    there, so no per-image factors exist; the layer is left out of the blocks and its values take the
    per-image diagonal Fisher (before: the square of the batch's summed gradient, ~5x the Fisher)."""
    model, _ = tiny_glow(affine=True, top_prior="buffer")
    model = model.double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    x = (torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5).double()
    names = _trained(model)
    layers = _convs(model, names)
    buffered = "levels.1.prior.conv.conv"
    assert buffered in layers
    factors = kfac_factors(model, x, DATA_SPEC, layers, chunk=6)
    assert buffered not in factors and "levels.0.prior.conv" in factors
    metric = KroneckerMetric(model, x, DATA_SPEC, names)
    assert f"{buffered}.weight" not in metric.blocks and f"{buffered}.weight" in metric.diagonal
    # its diagonal entries are those of the exact per-image Fisher, at the metric's normalization
    exact = diagonal_fisher(model, x, DATA_SPEC, names=[f"{buffered}.weight", "levels.0.prior.conv.weight"])
    inv = metric.diagonal[f"{buffered}.weight"]
    scale = exact[f"{buffered}.weight"].double() / (1.0 / inv - DAMPING)
    nonzero = exact[f"{buffered}.weight"] > 1e-12
    torch.testing.assert_close(scale[nonzero], torch.full_like(scale[nonzero], float(scale[nonzero][0])),
                               rtol=1e-6, atol=0)


def _row_nll(model, x: torch.Tensor) -> torch.Tensor:
    """Continuous NLL [N] in float64 (the discrete one differs by a constant and is cast to float32)."""
    return -model.log_prob(x)


def test_the_constrained_step_moves_its_rows_by_their_targets_to_first_order_and_holds_the_others():
    model, x = _model_and_inputs(n=6)
    names = _trained(model)
    metric = KroneckerMetric(model, x, DATA_SPEC, names)  # the remember metric on six images
    params = dict(model.named_parameters())
    rows = x[:3]  # one image to raise by 2 nats, two held
    jacobian = {n: [] for n in names}
    for xi in rows:
        grads = torch.autograd.grad(_row_nll(model, xi[None]).sum(), [params[n] for n in names])
        for n, g in zip(names, grads, strict=True):
            jacobian[n].append(g)
    jacobian = {n: torch.stack(g) for n, g in jacobian.items()}
    targets = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    solved = constrained_step(metric, jacobian, targets, damping=1e-12)
    first_order = sum((jacobian[n] * solved.step[n]).flatten(1).sum(1) for n in names)
    torch.testing.assert_close(first_order, targets, rtol=1e-8, atol=1e-8)
    # the model's own NLL along the step, by central differences: the same first-order change
    t = 1e-5
    with torch.no_grad():
        moved = []
        for sign in (1, -1):
            for n in names:
                params[n].add_(sign * t * solved.step[n])
            moved.append(_row_nll(model, rows))
            for n in names:
                params[n].sub_(sign * t * solved.step[n])
    torch.testing.assert_close((moved[0] - moved[1]) / (2 * t), targets, rtol=1e-5, atol=1e-5)
    # K is J M^-1 J^T (each row preconditioned on its own), and the step's energy v^T M v is w^T K w
    preconditioned = metric.apply_rows(jacobian)
    gram = sum(jacobian[n].flatten(1) @ preconditioned[n].flatten(1).T for n in names)
    torch.testing.assert_close(solved.gram, gram, rtol=1e-9, atol=1e-12)
    times = _metric_times(metric, solved.step)
    energy_direct = sum(float((solved.step[n] * times[n]).sum()) for n in names)
    torch.testing.assert_close(energy_direct, float(solved.weights @ solved.gram @ solved.weights), rtol=1e-7, atol=0)
    # a ridge shortens it and misses the targets
    ridged = constrained_step(metric, jacobian, targets, damping=1.0)
    energy = float(solved.weights @ solved.gram @ solved.weights)
    assert float(ridged.weights @ ridged.gram @ ridged.weights) < 0.5 * energy
    assert float(sum((jacobian[n][0] * ridged.step[n]).sum() for n in names)) < 1.9


def _metric_times(metric: KroneckerMetric, step: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """M v for a step v (the inverse of :meth:`KroneckerMetric.apply`, from its blocks' inverses and diagonal)."""
    out = {n: v / metric.diagonal[n] for n, v in step.items() if n in metric.diagonal}
    for weight, (g_inv, a_inv, bias) in metric.blocks.items():
        u = step[weight].reshape(step[weight].shape[0], -1)
        if bias is not None:
            u = torch.cat([u, step[bias].reshape(-1, 1)], 1)
        times = torch.linalg.inv(g_inv.double()) @ u @ torch.linalg.inv(a_inv.double())
        out[weight] = times[:, :step[weight][0].numel()].reshape(step[weight].shape)
        if bias is not None:
            out[bias] = times[:, -1]
    return out


def test_the_gram_matrix_of_a_float32_model_is_its_rows_dotted_with_their_preconditioned_rows():
    """gram sums each Kronecker block's products in the model's precision: on a float32 model it equals J M^-1 J^T
    formed in float64 from the same blocks to float32 rounding."""
    model, x = _model_and_inputs(n=6)
    model, x = model.float(), x.float()
    names = _trained(model)
    metric = KroneckerMetric(model, x, DATA_SPEC, names)
    assert metric.blocks and all(g.dtype == torch.float32 for g, _, _ in metric.blocks.values())
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(3)
    rows = {n: torch.randn(5, *params[n].shape, generator=generator) for n in names}
    preconditioned = metric.apply_rows({n: r.double() for n, r in rows.items()})  # float64 rows: float64 products
    reference = sum(rows[n].double().flatten(1) @ preconditioned[n].flatten(1).T for n in names)
    gram = metric.gram(rows)
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, reference, rtol=2e-5, atol=1e-6 * float(reference.diagonal().max()))


def test_a_kronecker_block_without_a_bias_is_preconditioned_and_dotted_as_its_weight_alone():
    """A Conv2d without a bias takes G~^-1 W A~^-1 over its weight's columns only (no appended bias column)."""
    generator = torch.Generator().manual_seed(4)
    out_channels, inputs = 3, 2 * 3 * 3

    def spd(n: int) -> torch.Tensor:
        a = torch.randn(n, n, generator=generator, dtype=torch.float64)
        return a @ a.T + n * torch.eye(n, dtype=torch.float64)

    g_inv, a_inv = spd(out_channels), spd(inputs)
    metric = KroneckerMetric.__new__(KroneckerMetric)
    metric.blocks = {"conv.weight": (g_inv, a_inv, None)}
    metric.diagonal = {"scale": torch.tensor([2.0], dtype=torch.float64)}
    metric._diagonal_names, metric._diagonal_flat = [], torch.zeros(0, dtype=torch.float64)
    rows = {"conv.weight": torch.randn(4, out_channels, 2, 3, 3, generator=generator, dtype=torch.float64),
            "scale": torch.randn(4, 1, generator=generator, dtype=torch.float64)}
    applied = metric.apply_rows(rows)
    for i in range(4):
        expected = g_inv @ rows["conv.weight"][i].reshape(out_channels, -1) @ a_inv
        torch.testing.assert_close(applied["conv.weight"][i].reshape(out_channels, -1), expected)
    torch.testing.assert_close(applied["scale"], 2.0 * rows["scale"])
    flat = torch.cat([rows[n].flatten(1) for n in rows], 1)
    flat_applied = torch.cat([applied[n].flatten(1) for n in rows], 1)
    torch.testing.assert_close(metric.gram(rows), flat @ flat_applied.T)


def test_a_damped_factors_inverse_is_the_general_inverse_and_survives_a_factor_that_is_not_positive_definite():
    """The Cholesky route agrees with torch.linalg.inv on a damped Gram matrix (rank-deficient before damping);
    a damped factor that is not positive definite takes the general inverse instead of failing."""
    from flowtame.methods.curvature import _damped_inverse

    generator = torch.Generator().manual_seed(0)
    patches = torch.randn(20, 30, generator=generator, dtype=torch.float64)
    gram = patches.T @ patches / 20  # rank 20 of 30
    torch.testing.assert_close(_damped_inverse(gram, 1e-3), torch.linalg.inv(gram + 1e-3 * torch.eye(30,
                               dtype=torch.float64)), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(_damped_inverse(-torch.eye(3, dtype=torch.float64), 0.5),
                               -2 * torch.eye(3, dtype=torch.float64))
