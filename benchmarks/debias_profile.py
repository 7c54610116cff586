"""Where one ``debias`` iteration's time goes on a zoo model (issue 22), before and after the issue's changes.

For a zoo model (benchmarks/zoo_models.py, built and cached there) and the groups zero and one of its digits,
times each part that :class:`flowtame.methods.debias.DebiasMethod` runs, on the CPU with the configured
threads, all in one process so that the columns share the machine's load:

- ``decode``: the fixed draw decoded by the model being debiased (eval mode, no grad): all ``samples``
  (1024), and the screen prefix (``screen_samples``, 256);
- ``classify``: those samples assigned by the latent logistic classifier (encoded by the base model);
- ``refresh``: mu_R, sigma_R re-estimated on the refresh subset (``refresh_size`` remember images);
- ``step``: one training iteration (forward/backward over the groups' and the remember batch, Adam's step),
  the mean of ``--steps`` iterations run by the engine.

Per iteration, before (every measurement decodes the whole draw and refreshes):
``step + (decode + classify + refresh) / measure_every``; after, far from the target (screen measurements,
refresh every ``refresh_every``): ``step + (decode_screen + classify_screen) / measure_every + refresh /
refresh_every``; after, near the target (whole draw): the same with the whole draw's decode and classify.

    python benchmarks/debias_profile.py --models wide-glow tuning-glow --threads 1 --json profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_models import DEFAULT_CACHE, ZOO, build, digits_source  # noqa: E402

from flowtame.data.images import open_images  # noqa: E402
from flowtame.engine.devices import loop_generator, trainable_copy  # noqa: E402
from flowtame.engine.loop import Engine, EngineConfig  # noqa: E402
from flowtame.io.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from flowtame.jobs.debias import make_config  # noqa: E402
from flowtame.likelihood.nll import batched_nll  # noqa: E402
from flowtame.methods.debias import (  # noqa: E402
    DebiasMethod,
    FrequencyMeter,
    fit_latent_classifier,
    frequency_table,
    prepare_data,
)

GROUP_DIGITS = {"zero": 0, "one": 1}


def group_pixels(name: str, split: str, cache: Path, base: Checkpoint) -> list[torch.Tensor]:
    """The zoo model's digits 0 and 1 of ``split`` (uint8 [N, C, H, W] each)."""
    template = digits_source(name, cache)
    return [open_images(template.format(split=split, digit=d), base.data_spec).load_tensor()[0]
            for d in GROUP_DIGITS.values()]


def timed(fn, repeats: int = 1) -> tuple[float, Any]:
    """(median seconds of ``repeats`` calls of ``fn()``, the last result)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def profile(name: str, cache: Path, override: dict[str, Any], steps: int) -> dict[str, Any]:
    """The parts of one debias iteration on zoo model ``name`` (seconds), as described in the module docstring."""
    base = load_checkpoint(build(name, cache))
    config = make_config(override)
    spec = base.data_spec
    groups = group_pixels(name, "train", cache, base)
    remember = torch.cat(group_pixels(name, "train", cache, base))
    keys = [str(i) for i in range(remember.shape[0])]
    base_model = base.model.eval()
    classifier = fit_latent_classifier(base_model, groups, spec.n_bits, held_out_fraction=0.2, weight_decay=1e-2,
                                       max_iter=300, seed=0)
    meter = FrequencyMeter.draw(base_model, config.samples, config.temperature, 0, classifier, spec.n_bits)
    generator = torch.Generator().manual_seed(0)
    data, _ = prepare_data(base_model, groups, remember, keys, spec, config, generator, torch.device("cpu"))
    model = trainable_copy(base, torch.device("cpu"))
    parts = {}
    for label, count in (("", config.samples), ("_screen", config.screen_samples)):
        parts[f"decode{label}_s"], samples = timed(lambda count=count: _decode(model, meter, count))
        parts[f"classify{label}_s"], labels = timed(lambda samples=samples: _classify(meter, samples))
        if not label:
            before = frequency_table(labels, list(GROUP_DIGITS))
    parts["refresh_s"], _ = timed(lambda: batched_nll(model.eval(), data.refresh, spec))
    batches = loop_generator(generator, torch.device("cpu"), 0)
    method = DebiasMethod(data, meter, list(GROUP_DIGITS), {"zero": 0.5, "one": 0.5}, config, batches, before)
    method.after_step = lambda *_: False  # time the steps alone
    engine = Engine(model, method, EngineConfig(lr=config.lr, max_iters=steps, warmup=0))
    step = parts["step_s"] = engine.run().wall_seconds / steps
    every, full = config.measure_every, parts["decode_s"] + parts["classify_s"]
    screen = parts["decode_screen_s"] + parts["classify_screen_s"]
    return {"model": name, "parameters": base.num_parameters, "samples": config.samples,
            "screen_samples": config.screen_samples, "refresh_size": int(data.refresh.shape[0]),
            "measure_every": every, "refresh_every": config.refresh_every, **parts,
            "before_per_iteration_s": step + (full + parts["refresh_s"]) / every,
            "after_far_per_iteration_s": step + screen / every + parts["refresh_s"] / config.refresh_every,
            "after_near_per_iteration_s": step + full / every + parts["refresh_s"] / config.refresh_every}


@torch.no_grad()
def _decode(model: torch.nn.Module, meter: FrequencyMeter, count: int) -> list[torch.Tensor]:
    model.eval()
    return [model.decode_noise([eps[i:min(i + 256, count)] for eps in meter.noise]) for i in range(0, count, 256)]


@torch.no_grad()
def _classify(meter: FrequencyMeter, samples: list[torch.Tensor]) -> torch.Tensor:
    from flowtame.methods.debias import bin_centres

    return torch.cat([meter.classifier.logits(bin_centres(x, meter.n_bits)).argmax(1) for x in samples])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["wide-glow", "tuning-glow"], choices=list(ZOO))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--override", type=json.loads, default={}, help="JSON of DebiasConfig keys")
    parser.add_argument("--label", default="", help="a name for this profile (kept in the JSON)")
    parser.add_argument("--json", type=Path, default=None, help="append the results to this JSON list")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        row = {"label": args.label, "override": args.override, "threads": args.threads,
               **profile(name, args.cache, args.override, args.steps)}
        rows.append(row)
        print(f"{name:13s} decode {row['decode_s']:5.2f} / {row['decode_screen_s']:5.2f} s  classify "
              f"{row['classify_s']:5.2f} / {row['classify_screen_s']:5.2f} s  refresh {row['refresh_s']:5.2f} s  "
              f"step {row['step_s']:5.2f} s  per iteration: before {row['before_per_iteration_s']:5.2f} s, after "
              f"{row['after_far_per_iteration_s']:5.2f} s far / {row['after_near_per_iteration_s']:5.2f} s near",
              flush=True)
    if args.json:
        previous = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(previous + rows, indent=1))


if __name__ == "__main__":
    main()
