"""The paper's 2-D illustration (seed 000, Fig. 2): tame a RealNVP trained on five Gaussians to forget the middle one.

1. Sample a training set from :func:`flowtame.methods.toy.five_gaussians` (corners of a square plus the middle,
   20% each) and fit a ``vector-realnvp`` (or ``--arch maf``) by maximum likelihood
   (:func:`flowtame.methods.toy.fit_flow`).
2. D_F: ``--forget`` fresh samples of the middle mode, or ``--forget all``: every middle-mode point of the
   training set. D_R: the training points of the four other modes.
3. Tame with :class:`flowtame.methods.toy.VectorTamingMethod` (the paper's losses) run by
   :class:`flowtame.engine.loop.Engine`; ``--anchor λ`` adds flowtame's likelihood anchor on base-flow samples
   nearer D_R than D_F (README.md).
4. Draw ``--samples`` points from the base and the tamed flow from the *same* latent noise, assign each to its
   nearest mode centre (or "none" beyond 4 mixture standard deviations) and print the shares (also within
   3 standard deviations) and the target's verdict; save log-density heatmaps and sample scatter plots
   before/after to ``--out``/toy2d.png.

Run from the repository root: ``python examples/toy2d/toy2d.py`` (about 1 minute of CPU; 1-3 minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import norm
from torch import Tensor

from flowtame.engine.loop import Engine, EngineConfig
from flowtame.flows import build_model, make_spec
from flowtame.flows.base import MultiScaleFlow
from flowtame.jobs.tame import FREEZE_RULES, freeze_parameters
from flowtame.methods.toy import (
    NO_MODE,
    GaussianMixture,
    VectorTamingMethod,
    fit_flow,
    five_gaussians,
    replay_anchor_points,
    vector_set_nll,
)

FORGET_MODE = "middle"
MODE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the figure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-points", type=int, default=5000, help="training set size (all five modes)")
    parser.add_argument("--train-steps", type=int, default=3000, help="maximum-likelihood Adam steps")
    parser.add_argument("--arch", choices=("vector-realnvp", "maf"), default="vector-realnvp",
                        help="flow architecture (the paper's figure uses a RealNVP)")
    parser.add_argument("--layers", type=int, default=8, help="affine couplings (RealNVP) or MADE layers (MAF)")
    parser.add_argument("--hidden", type=int, default=64, help="width of each coupling's 2-layer MLP")
    parser.add_argument("--forget", default="48",
                        help="D_F: a number of fresh middle-mode samples, or 'all' (the training set's middle points)")
    parser.add_argument("--delta", type=float, default=6.0, help="threshold in remember std units (paper: 4)")
    parser.add_argument("--epsilon", type=float, default=None, help="stopping margin (default 0.15 delta)")
    parser.add_argument("--alpha", type=float, default=0.6, help="forget weight (paper: 0.6)")
    parser.add_argument("--gamma", type=float, default=0.6, help="KL share of the remember loss (paper: 0.6)")
    parser.add_argument("--forget-loss", choices=("squared", "sigmoid"), default="squared")
    parser.add_argument("--forget-unit", choices=("sigma", "bpd", "nats"), default="sigma")
    parser.add_argument("--lr", type=float, default=1e-4, help="taming Adam peak learning rate")
    parser.add_argument("--warmup", type=int, default=50, help="taming learning-rate warm-up iterations")
    parser.add_argument("--max-iters", type=int, default=800)
    parser.add_argument("--freeze", choices=FREEZE_RULES, default="none",
                        help="parameters held fixed while taming (flowtame tame's --freeze)")
    parser.add_argument("--anchor", type=float, default=0.0,
                        help="weight of the likelihood anchor (flowtame's extension; 0 = the paper's remember loss)")
    parser.add_argument("--anchor-on", choices=("replay", "remember"), default="replay",
                        help="anchor points: base-flow samples nearer D_R than D_F, or D_R itself")
    parser.add_argument("--replay", type=int, default=20_000, help="base-flow samples drawn for --anchor-on replay")
    parser.add_argument("--batch-size", type=int, default=1024, help="forget and remember batch size")
    parser.add_argument("--samples", type=int, default=10_000, help="samples counted per model")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def forget_set(args: argparse.Namespace, mixture: GaussianMixture, train: Tensor, labels: Tensor,
               generator: torch.Generator) -> Tensor:
    """D_F as chosen by ``--forget``."""
    if args.forget == "all":
        return train[labels == mixture.index(FORGET_MODE)]
    return mixture.sample_mode(FORGET_MODE, int(args.forget), generator)


@torch.no_grad()
def log_density_grid(model: MultiScaleFlow, limit: float, size: int) -> Tensor:
    """log p [size, size] in nats on a regular grid over [-limit, limit]², rows = y (bottom first)."""
    axis = torch.linspace(-limit, limit, size)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    return -vector_set_nll(model, grid).reshape(size, size)


def plot(path: Path, mixture: GaussianMixture, densities: dict[str, Tensor], samples: dict[str, Tensor],
         forget: Tensor, limit: float) -> None:
    """2x2 figure: log-density heatmaps (top) and samples coloured by assigned mode (bottom), base | tamed."""
    fig = Figure(figsize=(8, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True, sharey=True)
    top = max(d.max().item() for d in densities.values())
    extent = (-limit, limit, -limit, limit)
    for col, name in enumerate(densities):
        ax = axes[0, col]
        image = ax.imshow(densities[name].clamp(min=top - 12).numpy(), origin="lower", extent=extent,
                          vmin=top - 12, vmax=top, cmap="viridis")
        ax.scatter(*forget.T.numpy(), s=2, c="white", alpha=0.6, label="D_F")
        ax.set_title(f"{name}: log density (nats)")
        ax = axes[1, col]
        points = samples[name][:4000]
        assigned = mixture.assign(points)
        colours = [MODE_COLOURS[k] if k >= 0 else "lightgrey" for k in assigned.tolist()]
        ax.scatter(*points.T.numpy(), s=1, c=colours)
        ax.set_title(f"{name}: 4,000 samples by nearest mode")
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
    axes[0, 0].legend(loc="lower left", fontsize=7)
    fig.colorbar(image, ax=axes[0, :], shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    mixture = five_gaussians()
    data_gen = torch.Generator().manual_seed(args.seed)
    train, labels = mixture.sample(args.train_points, data_gen)
    torch.manual_seed(args.seed)
    depth = {"n_couplings" if args.arch == "vector-realnvp" else "n_layers": args.layers}
    model = build_model(args.arch, make_spec(args.arch, {"dim": 2, "hidden": args.hidden, **depth}))
    train_nll = fit_flow(model, train, steps=args.train_steps, batch_size=512, lr=3e-3, generator=data_gen)
    trained = time.perf_counter()
    print(f"base {args.arch}: {args.train_steps} steps in {trained - start:.0f} s, train NLL {train_nll:.3f} nats "
          f"(true mixture {-mixture.log_prob(train).mean().item():.3f})")

    forget = forget_set(args, mixture, train, labels, data_gen)
    remember = train[labels != mixture.index(FORGET_MODE)]
    held_out, held_labels = mixture.sample(5000, torch.Generator().manual_seed(args.seed + 1))
    held_remember = held_out[held_labels != mixture.index(FORGET_MODE)]
    latent_seed = args.seed + 2
    with torch.no_grad():
        before = model.sample(args.samples, generator=torch.Generator().manual_seed(latent_seed))
    density_before = log_density_grid(model, 3.0, 160)
    held_before = vector_set_nll(model, held_remember).mean().item()

    taming_gen = torch.Generator().manual_seed(args.seed + 3)
    anchor_points = None
    if args.anchor and args.anchor_on == "replay":
        anchor_points = replay_anchor_points(model, forget, remember, args.replay,
                                             torch.Generator().manual_seed(args.seed + 4))
        print(f"likelihood anchor x{args.anchor:g} on {anchor_points.shape[0]:,} of {args.replay:,} base-flow "
              f"samples (those nearer D_R than D_F)")
    method = VectorTamingMethod(model, forget, remember, generator=taming_gen, delta=args.delta,
                                epsilon=args.epsilon, alpha=args.alpha, gamma=args.gamma,
                                batch_size=args.batch_size, forget_loss_kind=args.forget_loss,
                                forget_unit=args.forget_unit, anchor=args.anchor, anchor_points=anchor_points)
    beyond = (method.base_remember_nll > method.base_mean + args.delta * method.base_std).float().mean().item()
    print(f"D_F {forget.shape[0]} points, D_R {remember.shape[0]} points; remember NLL under the base flow: "
          f"mean {method.base_mean.item():.3f}, std {method.base_std.item():.3f} nats; "
          f"threshold mean + {args.delta:g} std: "
          f"{beyond:.2%} of D_R beyond it (a normal would leave {norm.sf(args.delta):.1e})")
    d_before = method.check_distances(model)
    freeze_parameters(model, args.freeze)
    config = EngineConfig(lr=args.lr, warmup=args.warmup, max_iters=args.max_iters)
    result = Engine(model, method, config, generators={"taming": taming_gen}).run()
    d_after = method.check_distances(model)
    outcome = f"stopped, |d| < {method.epsilon:g} for every forget point" if result.converged else "not converged"
    print(f"taming: {result.iterations} iterations in {result.wall_seconds:.0f} s, {outcome}"
          f"; d of D_F (remember std): {d_before.min().item():+.2f}..{d_before.max().item():+.2f} before, "
          f"{d_after.min().item():+.2f}..{d_after.max().item():+.2f} after")
    with torch.no_grad():
        after = model.sample(args.samples, generator=torch.Generator().manual_seed(latent_seed))
    held_after = vector_set_nll(model, held_remember).mean().item()
    print(f"held-out remember-mode NLL: {held_before:.3f} -> {held_after:.3f} nats; "
          f"remember mean NLL {method.base_mean.item():.3f} -> {method.mu_r.item():.3f} nats")

    share_before, share_after = mixture.fractions(before), mixture.fractions(after)
    inner = 3 * mixture.std  # the shares within 3 std show where a mode's change sits: core or rim
    inner_before, inner_after = mixture.fractions(before, inner), mixture.fractions(after, inner)
    print(f"\nshare of {args.samples:,} samples (nearest centre within {4 * mixture.std:g} = 4 std, else {NO_MODE}; "
          f"last two columns: within {inner:g} = 3 std):")
    print(f"{'mode':<12} {'base %':>8} {'tamed %':>8} {'change':>8} {'<3std base':>11} {'<3std tamed':>12}")
    for name in (*mixture.names, NO_MODE):
        change = 100 * (share_after[name] - share_before[name])
        inner_shares = (f" {100 * inner_before[name]:11.2f} {100 * inner_after[name]:12.2f}"
                        if name != NO_MODE else "")
        print(f"{name:<12} {100 * share_before[name]:8.2f} {100 * share_after[name]:8.2f} {change:+8.2f}"
              f"{inner_shares}")
    kept = [name for name in mixture.names if name != FORGET_MODE]
    worst = max(abs(share_after[n] - share_before[n]) for n in kept)
    verdict = "met" if share_after[FORGET_MODE] < 0.01 and worst <= 0.02 else "missed"
    print(f"largest change of a remembered mode: {100 * worst:.2f} points; target ({FORGET_MODE} < 1%, every other "
          f"mode within 2 points): {verdict}")

    figure = args.out / "toy2d.png"
    plot(figure, mixture, {"base": density_before, "tamed": log_density_grid(model, 3.0, 160)},
         {"base": before, "tamed": after}, forget, 3.0)
    print(f"figure: {figure}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
