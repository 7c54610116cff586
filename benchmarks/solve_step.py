"""Probe (issue 23, round 8): taming by a SOLVED step instead of a balance of loss terms. A prototype, not the
product's step (docs/benchmarks.md "Round 8 (probe): a solved step").

Each iteration linearizes per image: J = the per-image NLL gradients (nats) over the trained values (default
freeze rule ``coupling-outputs``) of (a) the k forget images (each the mean over ``--forget-draws`` fresh noise
draws), (b) the 16 look-alikes (the anchor's rows, :func:`flowtame.likelihood.evaluation.nearest_rows`), (c) the
remember set's mean NLL: ``--mean-batch`` random remember images' mean gradient, with ``--control-variate``
(default) minus the same batch's under the base model plus the whole set's under the base model (once).
Targets r (nats): (a) the gap to the band's middle, (``--target-d`` - d) sigma_R, capped at ``--cap``
sigma_R; (b) back to the look-alike's base NLL (its quantile against a remember normal that kept its place);
(c) back to the base mean (no drift). The step is the shortest under the remember metric M (the tame job's
K-FAC metric, :func:`~flowtame.methods.curvature.remember_metric`, at ``--metric-damping``):
v = M^-1 J^T (K + lambda diag K)^-1 r, K = J M^-1 J^T (:func:`~flowtame.methods.curvature.constrained_step`),
times ``--fraction``, shrunk so that the metric's estimate of its remember RMS change sqrt(v^T F v) stays
within ``--rms`` sigma_R.

Every iteration prints: each forget image's d on the 8 keyed check draws against the current model's remember
normal (a fixed subset of ``--monitor`` remember images on the evaluation's noise, corrected to the whole set
as the tame job's refresh is), the look-alikes' QD, the remember drift (relative mean NLL rise), seconds.
The loop stops when every d is in (-epsilon, 2 epsilon) (the threshold target's band), drift <= 0.3%
(``--max-drift``) and the look-alike QD <= 0.018 on the subset, confirmed on the whole remember set. The
result is then scored like a zoo row (:func:`zoo.reference_scores`: QD on every set, holdout BPD change,
``evaluate --neighbours 16 --check``); wall seconds count the setup (base pass over the remember set,
look-alikes, metric, the control variate's whole-set gradient) and the loop, not the protocol's loading.
``--reference`` then runs the authors' loop on the same cell for the time ratio; ``--diagnose`` compares 128
remember images' NLL change per step with its first-order prediction.

    python benchmarks/solve_step.py --model embedded-glow --k 4 --cap 2 --reference
    python benchmarks/solve_step.py --model realnvp --k 15 --cap 1 --json /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo import REFERENCE_ITERS, add_cell_arguments, load_cell, reference_row, reference_scores  # noqa: E402

from flowtame.data.images import dequantization_noise  # noqa: E402
from flowtame.engine.devices import trainable_copy  # noqa: E402
from flowtame.jobs.tame import freeze_parameters, make_config  # noqa: E402
from flowtame.likelihood.evaluation import nearest_rows  # noqa: E402
from flowtame.likelihood.nll import batched_nll, dequantized, nll_nats, pixel_nll  # noqa: E402
from flowtame.likelihood.statistics import NormalFit  # noqa: E402
from flowtame.methods.baselines import per_sample_gradients  # noqa: E402
from flowtame.methods.curvature import DAMPING, constrained_step, remember_metric  # noqa: E402
from flowtame.methods.lookalikes import quantile_drop  # noqa: E402

CPU = torch.device("cpu")


class Cell:
    """The fixed pieces of one run: sets, keyed check noise, base NLLs, look-alikes, monitor subset, metric."""

    def __init__(self, base: Any, proto: Any, args: argparse.Namespace):
        self.spec, self.config = base.data_spec, make_config({})
        clock, self.timings = time.perf_counter(), {}
        self.forget, self.remember = proto.forget.pixels, proto.remember.pixels
        self.remember_keys = proto.remember.keys
        seed, n_bits = self.config.eval_seed, self.spec.n_bits
        shape = tuple(self.forget.shape[1:])
        self.check = [dequantized(self.forget, dequantization_noise(proto.forget.keys, seed, shape, draw), n_bits)
                      for draw in range(self.config.forget_draws)]
        self.base_remember = pixel_nll(base.model, self.remember, self.remember_keys, self.spec, seed, CPU)
        self.base_fit = NormalFit(float(self.base_remember.mean()), float(self.base_remember.std(ddof=1)))
        self.timings["base pass"], clock = time.perf_counter() - clock, time.perf_counter()
        self.looks = nearest_rows(base, self.forget, self.remember, 16, device=CPU)
        self.look_x = self.on_eval_noise(self.looks)
        self.timings["look-alikes"], clock = time.perf_counter() - clock, time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        self.monitor = torch.randperm(self.remember.shape[0], generator=generator)[:args.monitor].sort().values
        self.monitor_x = self.on_eval_noise(self.monitor)
        self.model = trainable_copy(base, CPU)
        freeze_parameters(self.model, self.config.freeze)
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.metric = remember_metric(base.model, self.remember, self.monitor, self.spec, self.names, 0,
                                      args.metric_damping)
        self.timings["metric"], clock = time.perf_counter() - clock, time.perf_counter()
        self.generator = torch.Generator().manual_seed(1)
        #: with ``--control-variate``: the base model (its trained values' gradients taken too) and its mean NLL
        #: gradient over the whole remember set on fresh noise (name -> shape), else None
        self.base_model, self.base_gradient = None, None
        if args.control_variate:
            self.base_model = trainable_copy(base, CPU).eval()
            self.base_gradient = self.mean_gradient(self.base_model, self.fresh(self.remember))
        self.timings["base gradient"] = time.perf_counter() - clock

    def mean_gradient(self, model: torch.nn.Module, x: torch.Tensor, chunk: int = 256) -> dict[str, torch.Tensor]:
        """Gradient of the mean NLL of inputs ``x`` over the trained values (name -> shape), in chunks."""
        params = dict(model.named_parameters())
        total = {n: torch.zeros_like(params[n]) for n in self.names}
        for start in range(0, x.shape[0], chunk):
            nll = nll_nats(model, x[start:start + chunk], self.spec).sum() / x.shape[0]
            for n, g in zip(self.names, torch.autograd.grad(nll, [params[n] for n in self.names]), strict=True):
                total[n] += g
        return total

    def on_eval_noise(self, rows: torch.Tensor) -> torch.Tensor:
        noise = dequantization_noise([self.remember_keys[i] for i in rows.tolist()], self.config.eval_seed,
                                     tuple(self.remember.shape[1:]))
        return dequantized(self.remember[rows], noise, self.spec.n_bits)

    def fresh(self, pixels: torch.Tensor) -> torch.Tensor:
        return dequantized(pixels, torch.rand(pixels.shape, generator=self.generator), self.spec.n_bits)


@torch.no_grad()
def measure(cell: Cell, whole: bool = False) -> dict[str, Any]:
    """The stop's figures under the current weights: d [F] (8 check draws), remember normal, drift, look-alike
    QD, on the monitor subset corrected to the whole set (``whole``: on the whole remember set)."""
    model, spec, config = cell.model.eval(), cell.spec, cell.config
    forget = torch.stack([batched_nll(model, x, spec) for x in cell.check]).double().mean(0).numpy()
    if whole:
        remember = pixel_nll(model, cell.remember, cell.remember_keys, spec, config.eval_seed, CPU)
        fit, drift = NormalFit(float(remember.mean()), float(remember.std(ddof=1))), None
        looks = remember[cell.looks.numpy()]
        remember_qd = quantile_drop(cell.base_remember, remember, cell.base_fit, fit)
    else:
        sub = batched_nll(model, cell.monitor_x, spec).double().numpy()
        base_sub = cell.base_remember[cell.monitor.numpy()]
        fit = NormalFit(cell.base_fit.mean + float(sub.mean() - base_sub.mean()),
                        cell.base_fit.std * float(sub.std(ddof=1) / base_sub.std(ddof=1)))
        looks = batched_nll(model, cell.look_x, spec).double().numpy()
        remember_qd = quantile_drop(base_sub, sub, cell.base_fit, fit)
    drift = fit.mean / cell.base_fit.mean - 1
    d = (forget - fit.mean - config.delta * fit.std) / fit.std
    look_qd = quantile_drop(cell.base_remember[cell.looks.numpy()], looks, cell.base_fit, fit)
    return {"d": d, "forget_nll": forget, "fit": fit, "drift": drift, "look_qd": look_qd, "looks": looks,
            "remember_qd": remember_qd}


def in_band(m: dict[str, Any], epsilon: float, max_drift: float) -> bool:
    return bool(((m["d"] > -epsilon) & (m["d"] < 2 * epsilon)).all() and m["drift"] <= max_drift
                and m["look_qd"] <= 0.018)


def jacobian_inputs(cell: Cell, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh inputs of the rows: (forget images x draws then look-alikes, the mean row's remember batch)."""
    x = torch.cat([cell.fresh(cell.forget.repeat(args.forget_draws, 1, 1, 1)),
                   cell.fresh(cell.remember[cell.looks])])
    batch = torch.randint(0, cell.remember.shape[0], (args.mean_batch,), generator=cell.generator)
    return x, cell.fresh(cell.remember[batch])


def jacobian(cell: Cell, inputs: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace
             ) -> dict[str, torch.Tensor]:
    """Rows' NLL gradients on ``inputs`` (:func:`jacobian_inputs`), name -> [k + 16 + 1, *shape]: forget images
    (mean over the draws), look-alikes, the mean NLL of the remember batch (with ``--control-variate``: minus
    the same batch's under the base model, plus the whole set's under the base model: the batch's sampling
    noise, nearly the same under both weights, cancels)."""
    k = cell.forget.shape[0]
    x, batch = inputs
    chunks = list(per_sample_gradients(cell.model, x, cell.spec, vectorized=True, chunk_size=None,
                                       names=cell.names))
    rows = {n: torch.cat([c[n] for c in chunks]) for n in cell.names}
    mean = cell.mean_gradient(cell.model, batch)
    if cell.base_model is not None:  # the batch's own noise, measured on the base model, taken out
        at_base = cell.mean_gradient(cell.base_model, batch)
        mean = {n: mean[n] - at_base[n] + cell.base_gradient[n] for n in mean}
    out = {}
    for (n, g), mean_g in zip(rows.items(), mean.values(), strict=True):
        forget = g[:k * args.forget_draws].reshape(args.forget_draws, k, *g.shape[1:]).mean(0)
        out[n] = torch.cat([forget, g[k * args.forget_draws:], mean_g[None]])
    return out


def shifted(cell: Cell, step: dict[str, torch.Tensor], scale: float) -> None:
    """Add ``scale`` x ``step`` to the trained values."""
    params = dict(cell.model.named_parameters())
    with torch.no_grad():
        for n, v in step.items():
            params[n].add_((scale * v).to(params[n].dtype))


def targets(cell: Cell, m: dict[str, Any], args: argparse.Namespace) -> torch.Tensor:
    """r [k + 16 + 1] (nats): forget gaps to the band's middle (capped), look-alikes and the mean back to base
    (the gap to the base mean x (1 + ``--mean-target``), times ``--mean-gain``)."""
    sigma = m["fit"].std
    forget = np.clip((args.target_d - m["d"]) * sigma, -args.cap * sigma, args.cap * sigma)
    looks = cell.base_remember[cell.looks.numpy()] - m["looks"]
    mean = args.mean_gain * (cell.base_fit.mean * (1 + args.mean_target) - m["fit"].mean)
    return torch.from_numpy(np.concatenate([forget, looks, [mean]])).double()


def step(cell: Cell, m: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Solve and apply one step; returns its predicted figures and timings. With ``--secant``: solve, take the
    rows' gradients again at the solved point (same inputs), solve again with their mean (the secant rows: exact
    for a quadratic NLL along the step)."""
    cell.model.eval()
    clock = time.perf_counter()
    inputs = jacobian_inputs(cell, args)
    jac = jacobian(cell, inputs, args)
    jacobian_s = time.perf_counter() - clock
    r = args.fraction * targets(cell, m, args)
    solved = constrained_step(cell.metric, jac, r, damping=args.ridge)
    if args.secant:
        shifted(cell, solved.step, 1.0)
        far = jacobian(cell, inputs, args)
        shifted(cell, solved.step, -1.0)
        jac = {n: (jac[n] + far[n]) / 2 for n in jac}
        solved = constrained_step(cell.metric, jac, r, damping=args.ridge)
    energy = float(solved.weights @ solved.gram @ solved.weights)  # v^T M v (M = F / scale + damping)
    rms = (cell.metric.scale * max(energy, 0.0)) ** 0.5  # >= sqrt(v^T F v), the remember images' RMS change
    shrink = min(1.0, args.rms * m["fit"].std / rms) if rms > 0 else 1.0
    if args.diagnose:
        diagnosis = diagnose(cell, solved.step, shrink)
    else:
        diagnosis = {}
        shifted(cell, solved.step, shrink)
    achieved = shrink * (solved.gram @ solved.weights)  # first-order J v
    return {"rms_sigma": rms / m["fit"].std, "shrink": shrink, "predicted_mean_change": float(achieved[-1]),
            "predicted_forget_change": achieved[:cell.forget.shape[0]].tolist(),
            "solve_residual": float((achieved - shrink * r).norm() / (shrink * r).norm().clamp_min(1e-12)),
            "jacobian_s": jacobian_s, "step_s": time.perf_counter() - clock, **diagnosis}


def diagnose(cell: Cell, step: dict[str, torch.Tensor], shrink: float, rows: int = 128) -> dict[str, float]:
    """Apply ``shrink`` x ``step`` and compare the first ``rows`` monitor images' NLL change (their eval noise)
    with its first-order prediction g_n . v (per-image gradients at the weights before the step): mean and RMS
    of both (nats), and the RMS of their difference."""
    x = cell.monitor_x[:rows]
    with torch.no_grad():
        before = batched_nll(cell.model, x, cell.spec).double()
    predicted = torch.zeros(rows, dtype=torch.float64)
    start = 0
    for chunk in per_sample_gradients(cell.model, x, cell.spec, vectorized=True, chunk_size=32,
                                      names=cell.names):
        n = next(iter(chunk.values())).shape[0]
        predicted[start:start + n] = sum((chunk[k].double() * step[k]).flatten(1).sum(1) for k in cell.names)
        start += n
    predicted *= shrink
    shifted(cell, step, shrink)
    with torch.no_grad():
        actual = batched_nll(cell.model, x, cell.spec).double() - before
    return {"monitor_mean_predicted": float(predicted.mean()), "monitor_mean_actual": float(actual.mean()),
            "monitor_rms_predicted": float(predicted.square().mean().sqrt()),
            "monitor_rms_actual": float(actual.square().mean().sqrt()),
            "monitor_rms_error": float((actual - predicted).square().mean().sqrt())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    base, proto = load_cell(args)
    load_s = time.perf_counter() - start
    cell = Cell(base, proto, args)
    setup_s = time.perf_counter() - start - load_s
    epsilon = cell.config.epsilon
    print(f"{args.model} k={args.k}: remember mean {cell.base_fit.mean:.2f} nats, sigma_R {cell.base_fit.std:.2f}; "
          f"{len(cell.names)} trained tensors, "
          f"{sum(p.numel() for n, p in cell.model.named_parameters() if p.requires_grad):,} values; load "
          f"{load_s:.1f} s (protocol), setup {setup_s:.1f} s (" +
          ", ".join(f"{name} {seconds:.1f} s" for name, seconds in cell.timings.items()) + ")", flush=True)
    trace, iteration, confirm_refusals = [], 0, 0
    loop_start = time.perf_counter()
    while True:
        clock = time.perf_counter()
        m = measure(cell)
        measure_s = time.perf_counter() - clock
        seconds = time.perf_counter() - loop_start
        print(f"{iteration:3d} d [{' '.join(f'{d:+.2f}' for d in m['d'])}] mean {m['fit'].mean:.2f} "
              f"look QD {m['look_qd']:+.4f} "
              f"drift {100 * m['drift']:+.3f}% QD_R(sub) {m['remember_qd']:+.4f} {seconds:.1f} s "
              f"(measure {measure_s:.2f} s)", flush=True)
        row = {"iteration": iteration, "d": m["d"].tolist(), "look_qd": m["look_qd"], "drift": m["drift"],
               "remember_qd_subset": m["remember_qd"], "seconds": seconds}
        trace.append(row)
        if in_band(m, epsilon, args.max_drift):
            whole = measure(cell, whole=True)
            print(f"    whole set: d [{' '.join(f'{d:+.2f}' for d in whole['d'])}] look QD "
                  f"{whole['look_qd']:+.4f} drift {100 * whole['drift']:+.3f}% QD_R {whole['remember_qd']:+.4f}")
            if in_band(whole, epsilon, args.max_drift):
                converged = True
                break
            confirm_refusals += 1
            m = whole
        if iteration >= args.max_iters:
            converged = False
            break
        row.update(step(cell, m, args))
        print(f"    step: predicted RMS {row['rms_sigma']:.2f} sigma_R, shrink {row['shrink']:.2f}, "
              f"solve residual {row['solve_residual']:.3f}, predicted mean change "
              f"{row['predicted_mean_change']:+.2f} nats, forget [" +
              " ".join(f"{c:+.1f}" for c in row["predicted_forget_change"]) +
              f"] ({row['jacobian_s']:.2f} s of {row['step_s']:.2f} s in the Jacobian)", flush=True)
        if args.diagnose:
            print("    monitor (nats): mean predicted {monitor_mean_predicted:+.3f} actual {monitor_mean_actual:+.3f}; "
                  "RMS predicted {monitor_rms_predicted:.3f} actual {monitor_rms_actual:.3f}; RMS error "
                  "{monitor_rms_error:.3f}".format(**row), flush=True)
        iteration += 1
    loop_s = time.perf_counter() - loop_start
    total = time.perf_counter() - start - load_s
    result = SimpleNamespace(converged=converged, iterations=iteration, wall_seconds=loop_s)
    scores = reference_scores(base, proto, cell.model, result, total)
    print(f"{args.model} k={args.k}: converged {converged}, {iteration} iterations, wall {total:.1f} s (setup "
          f"{setup_s:.1f} + loop {loop_s:.1f}); QD D_R {scores['qd_remember']:+.4f}, QD D_R^NN "
          f"{scores['qd_neighbours']:+.4f}, holdout {100 * scores['holdout_bpd_change']:+.2f}%, forgotten "
          f"{scores['forgotten']:.2f}, evaluate --check {'pass' if scores['evaluate_passed'] else 'FAIL'} "
          f"{scores['failed_checks']}", flush=True)
    out = {"args": {k: v for k, v in vars(args).items() if k not in ("cache", "json")}, "converged": converged,
           "iterations": iteration, "setup_seconds": setup_s, "setup_timings": cell.timings,
           "loop_seconds": loop_s, "total_seconds": total,
           "confirm_refusals": confirm_refusals, "scores": scores, "trace": trace}
    if args.reference:
        ref = reference_row(base, proto, REFERENCE_ITERS)
        out["reference"] = ref
        print(f"the authors' loop on the same cell, right after: {ref['iterations']} iterations, "
              f"{ref['total_seconds']:.1f} s, converged {ref['converged']}, check "
              f"{'pass' if ref['scores']['evaluate_passed'] else 'FAIL'}; ratio (solved / reference) "
              f"{total / ref['total_seconds']:.3f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser, model="embedded-glow", k=4)
    parser.add_argument("--target-d", type=float, default=0.3, help="the forget images' target d [0.3]")
    parser.add_argument("--cap", type=float, default=2.0, help="largest forget target per step, sigma_R [2]")
    parser.add_argument("--fraction", type=float, default=1.0, help="step fraction of the targets [1]")
    parser.add_argument("--rms", type=float, default=1.0,
                        help="largest predicted remember RMS change per step, sigma_R [1]")
    parser.add_argument("--ridge", type=float, default=1e-3, help="the solve's relative ridge [1e-3]")
    parser.add_argument("--forget-draws", type=int, default=2, help="fresh draws per forget row [2]")
    parser.add_argument("--mean-gain", type=float, default=1.0,
                        help="the mean row's target: this many times the drift back [1]")
    parser.add_argument("--mean-target", type=float, default=0.0,
                        help="the mean row's aim, relative to the base mean (-0.001: 0.1%% below) [0]")
    parser.add_argument("--mean-batch", type=int, default=256, help="remember images of the mean row [256]")
    parser.add_argument("--monitor", type=int, default=256, help="remember images of the per-iteration check")
    parser.add_argument("--metric-damping", type=float, default=1e-3,
                        help=f"the remember metric's relative damping [1e-3; the tame job's: {DAMPING}]")
    parser.add_argument("--control-variate", action=argparse.BooleanOptionalAction, default=True,
                        help="the mean row as batch(now) - batch(base) + whole set(base) [on]")
    parser.add_argument("--reference", action="store_true",
                        help=f"then run the authors' loop ({REFERENCE_ITERS} iterations) on the same cell")
    parser.add_argument("--diagnose", action="store_true",
                        help="per step: 128 monitor images' NLL change against its first-order prediction")
    parser.add_argument("--secant", action="store_true",
                        help="re-solve with the rows' gradients averaged over the step's two ends")
    parser.add_argument("--max-drift", type=float, default=0.003,
                        help="the stop's bound on the remember drift (relative) [0.003, the tame job's]")
    parser.add_argument("--max-iters", type=int, default=60)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = run(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
