"""The 2-D toy (paper Fig. 2): mixture and mode assignment, the vector taming method's stopping rule on known
NLLs, and a small end-to-end taming run that forgets the middle mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from flowtame.engine.loop import Engine, EngineConfig
from flowtame.flows import build_model, make_spec
from flowtame.methods.toy import (
    NO_MODE,
    GaussianMixture,
    VectorTamingMethod,
    fit_flow,
    five_gaussians,
    replay_anchor_points,
)

torch.set_num_threads(1)


class KnownNLL(nn.Module):
    """A stand-in flow whose NLL of a point is ``scale * x[0] + shift`` nats (the second coordinate is ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.shift = nn.Parameter(torch.tensor(0.0))

    def log_prob(self, x: Tensor) -> Tensor:
        return -(self.scale * x[:, 0] + self.shift)


def points(nll: list[float] | Tensor) -> Tensor:
    """2-D points whose first coordinate is the given NLL under an untouched :class:`KnownNLL`."""
    first = torch.as_tensor(nll, dtype=torch.float32)
    return torch.stack([first, torch.zeros_like(first)], 1)


def standard_remember(n: int = 200) -> Tensor:
    """Remember points whose NLLs have mean exactly 0 and (ddof 1) std exactly 1."""
    values = torch.randn(n, generator=torch.Generator().manual_seed(0))
    return points((values - values.mean()) / values.std())


def stopping_method(model: KnownNLL, forget_nll: list[float]) -> VectorTamingMethod:
    return VectorTamingMethod(model, points(forget_nll), standard_remember(), delta=4.0,
                              generator=torch.Generator().manual_seed(1))


def screen_then_judge(method: VectorTamingMethod, model: KnownNLL, iteration: int = 0) -> bool:
    """One engine-style iteration without an optimizer step: the loss's forward screens, after_step judges."""
    _, metrics = method.loss(model, iteration)
    return method.after_step(model, iteration, {k: float(v.detach()) for k, v in metrics.items()})


def test_five_gaussians_layout():
    mixture = five_gaussians(half_side=1.5, std=0.2)
    assert mixture.names == ("upper-left", "upper-right", "lower-left", "lower-right", "middle")
    assert mixture.centres.tolist() == [[-1.5, 1.5], [1.5, 1.5], [-1.5, -1.5], [1.5, -1.5], [0.0, 0.0]]
    x, labels = mixture.sample(20_000, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels, minlength=5) / 20_000
    assert torch.allclose(counts, torch.full((5,), 0.2), atol=0.015)  # equal weights
    assert (x - mixture.centres[labels]).std().item() == pytest.approx(0.2, rel=0.03)
    # log density integrates to 1 (Riemann sum on a fine grid covering every mode)
    axis = torch.linspace(-3, 3, 601)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    assert mixture.log_prob(grid).exp().sum().item() * 0.01 ** 2 == pytest.approx(1.0, abs=1e-3)


def test_mode_assignment_on_hand_placed_points():
    mixture = five_gaussians(half_side=1.5, std=0.2)  # default radius 4 std = 0.8
    x = torch.tensor([
        [-1.5, 1.5],   # upper-left centre
        [1.5, 1.5],    # upper-right centre
        [-1.4, -1.6],  # near lower-left
        [2.25, -1.5],  # 0.75 right of lower-right: inside the radius
        [0.5, -0.5],   # 0.71 from the middle, 1.41 from lower-right
        [0.7, 0.7],    # 0.99 from the middle, 1.13 from upper-right: beyond the radius
        [0.0, 2.0],    # between the top modes, 1.58 from both
        [9.0, 9.0],    # far away
    ])
    assert mixture.assign(x).tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    assert mixture.assign(x, radius=1.1).tolist() == [0, 1, 2, 3, 4, 4, -1, -1]  # the nearer centre wins
    shares = mixture.fractions(x)
    assert list(shares) == [*mixture.names, NO_MODE]
    assert shares == pytest.approx({"upper-left": 1 / 8, "upper-right": 1 / 8, "lower-left": 1 / 8,
                                    "lower-right": 1 / 8, "middle": 1 / 8, NO_MODE: 3 / 8})


def test_mixture_rejects_bad_definitions():
    with pytest.raises(ValueError, match="one name per centre"):
        GaussianMixture(torch.zeros(2, 2), 0.1, ("a",))
    with pytest.raises(ValueError, match="distinct"):
        GaussianMixture(torch.zeros(2, 2), 0.1, ("a", NO_MODE))
    with pytest.raises(ValueError, match="unknown mode"):
        five_gaussians().index("centre")


def test_base_statistics_and_threshold_distance_from_known_nll():
    model = KnownNLL()
    method = stopping_method(model, [4.0, 3.0, 5.2])
    assert method.base_mean.item() == pytest.approx(0.0, abs=1e-6)
    assert method.base_std.item() == pytest.approx(1.0, abs=1e-6)
    assert method.epsilon == pytest.approx(0.6)  # 0.15 delta by default
    assert method.check_distances(model).tolist() == pytest.approx([0.0, -1.0, 1.2], abs=1e-5)


@pytest.mark.parametrize(("forget_nll", "stops"), [
    ([4.0, 4.5, 3.5], True),     # d = 0, +0.5, -0.5: all within epsilon = 0.6
    ([4.0, 4.5, 3.3], False),    # one point 0.7 std short of the threshold
    ([4.0, 4.7], False),         # one point 0.7 std beyond it: the rule is two-sided, |d| < epsilon
    ([4.59, 3.41], True),
])
def test_stopping_rule_on_known_nll(forget_nll, stops):
    model = KnownNLL()
    method = stopping_method(model, forget_nll)
    assert screen_then_judge(method, model) is stops
    assert method.confirmations == (1 if stops else 0)  # a failing screen costs no confirmation pass


def test_stopping_rule_uses_the_current_models_remember_statistics():
    model = KnownNLL()
    method = stopping_method(model, [1.0, 1.2])  # d = -3, -2.8 under the base model
    with torch.no_grad():
        model.shift.fill_(3.0)  # every NLL rises by 3 nats: forget points now sit at 4.0 and 4.2 ...
    # ... which passes against the stale statistics (mean 0, std 1), so the screen asks for a confirmation,
    # and the confirmation, against the current statistics (mean 3, std 1), refuses: d = -3, -2.8 again.
    assert not screen_then_judge(method, model)
    assert method.confirmations == 1
    assert method.mu_r.item() == pytest.approx(3.0, abs=1e-5)
    assert method.confirmed_d.tolist() == pytest.approx([-3.0, -2.8], abs=1e-5)


def test_loss_pulls_forget_nll_up_and_keeps_gradients_through_every_term():
    model = KnownNLL()
    method = stopping_method(model, [1.0])  # d = -3: the forget loss wants a larger NLL
    loss, metrics = method.loss(model, 0)
    loss.backward()
    assert math.isfinite(loss.item())
    assert metrics["max_abs_d"].item() == pytest.approx(3.0, abs=1e-5)
    assert model.scale.grad is not None and model.shift.grad is not None
    # shifting every NLL up moves the forget point toward the threshold (forget term) but the remember
    # mean away from the base (remember terms); the forget term's pull is the stronger at d = -3
    assert model.shift.grad.item() < 0


def test_likelihood_anchor_matches_its_formula_and_leaves_the_paper_loss_alone():
    """anchor * mean(((NLL_T - NLL_B) / sigma_B)²) on top of the paper's remember loss, weighted by 1 - alpha."""
    model = KnownNLL()
    anchors = points([0.5, -1.0, 2.0])  # base NLLs 0.5, -1, 2 (nats)

    def method(anchor: float) -> VectorTamingMethod:
        return VectorTamingMethod(model, points([1.0]), standard_remember(), delta=4.0, alpha=0.6, anchor=anchor,
                                  anchor_points=anchors, generator=torch.Generator().manual_seed(1))

    paper, anchored = method(0.0), method(2.5)
    with torch.no_grad():
        model.shift.fill_(0.4)  # every NLL rises by 0.4 nats = 0.4 base remember stds (sigma_B = 1)
    loss_paper, metrics_paper = paper.loss(model, 0)
    loss_anchored, metrics_anchored = anchored.loss(model, 0)
    assert "anchor" not in metrics_paper
    assert metrics_anchored["anchor"].item() == pytest.approx(0.4 ** 2, rel=1e-5)
    # same forget and remember batches (the anchor rows are drawn after them), so only the anchor term differs
    assert metrics_anchored["loss_forget"].item() == pytest.approx(metrics_paper["loss_forget"].item(), rel=1e-6)
    assert loss_anchored.item() - loss_paper.item() == pytest.approx((1 - 0.6) * 2.5 * 0.4 ** 2, rel=1e-4)
    with pytest.raises(ValueError, match="anchor must be >= 0"):
        method(-1.0)


class FixedSamples:
    """A stand-in base flow whose ``sample`` returns given points."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self.x[:n]


def test_replay_anchor_points_keep_samples_nearer_the_remember_set():
    forget = torch.tensor([[0.0, 0.0], [0.2, 0.0]])
    remember = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    replay = torch.tensor([[0.1, 0.0], [1.2, 0.0], [0.9, 0.0], [0.0, 1.8], [0.0, 1.4], [5.0, 5.0]])
    kept = replay_anchor_points(FixedSamples(replay), forget, remember, 6, torch.Generator())
    # [1.2, 0] is 0.8 from remember vs 1.0 from forget; [0, 1.8] 1.2 vs 1.8; [5, 5] 5.4 vs 6.9; the others are
    # nearer a forget point
    assert torch.equal(kept, replay[[1, 3, 5]])


def test_taming_forgets_the_middle_mode():
    """Small seeded end-to-end run: a 6-coupling RealNVP fitted to the five Gaussians, tamed on 48 middle points
    with the example's settings (delta 6, alpha = gamma = 0.6, Adam 1e-4 with warm-up, 400 iterations).

    Measured (torch 2.13, CPU): middle 19.7% -> 4.2% of samples; mean d of D_F -5.8 -> -2.0 remember stds;
    remembered modes 20.2/18.6/18.9/19.1% -> 17.9/8.8/13.7/10.4%, the rest in no mode. So the remembered modes
    are only asserted to survive: the paper's remember loss holds the *pooled* NLL distribution of D_R (its mean
    and std), not each mode's share, and the share of a mode moves by up to 10 points here (examples/toy2d
    documents the same collateral at full size).
    """
    mixture = five_gaussians()
    gen = torch.Generator().manual_seed(0)
    train, labels = mixture.sample(2000, gen)
    torch.manual_seed(0)
    model = build_model("vector-realnvp", make_spec("vector-realnvp", {"dim": 2, "n_couplings": 6, "hidden": 32}))
    fit_flow(model, train, steps=800, batch_size=256, lr=5e-3, generator=gen)
    latent_seed = 1  # the same latent draws before and after: paired shares
    with torch.no_grad():
        before = mixture.fractions(model.sample(4000, generator=torch.Generator().manual_seed(latent_seed)))
    forget = mixture.sample_mode("middle", 48, gen)
    remember = train[labels != mixture.index("middle")]
    tgen = torch.Generator().manual_seed(2)
    method = VectorTamingMethod(model, forget, remember, generator=tgen, delta=6.0, batch_size=512)
    d_before = method.check_distances(model)
    Engine(model, method, EngineConfig(lr=1e-4, warmup=50, max_iters=400), generators={"t": tgen}).run()
    method.refresh(model)
    d_after = method.check_distances(model)
    with torch.no_grad():
        after = mixture.fractions(model.sample(4000, generator=torch.Generator().manual_seed(latent_seed)))

    assert before["middle"] > 0.15  # the base flow learned the middle mode
    assert after["middle"] < 0.35 * before["middle"]
    assert d_after.mean().item() > d_before.mean().item() + 3.0  # D_F moved toward the threshold
    for name in mixture.names[:4]:
        assert after[name] > 0.4 * before[name], name
