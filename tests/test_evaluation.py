"""flowtame.likelihood.evaluation and ``flowtame evaluate``: figures by hand, checks, the JSON schema, end to end.

The end-to-end models are built here: a tiny Glow trained on synthetic 8x8 images (a main mode, the remember
set, plus a few images of a second mode), and a tamed copy fine-tuned until the forget images lie beyond
the threshold. Evaluation must not depend on how a model was tamed, so the fine-tuning is deliberately
simple and independent of flowtame's taming code.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from flowtame.data.images import open_images
from flowtame.data.quantization import DataSpec, dequantize, quantize
from flowtame.errors import InputError, OutputExistsError
from flowtame.flows import GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from flowtame.likelihood import evaluation as ev
from flowtame.likelihood import statistics as st
from flowtame.likelihood.nll import nll_nats

PHI_1, PHI_1_5, PHI_2 = 0.8413447460685429, 0.9331927987311419, 0.9772498680518208
SF_4, SF_5 = 3.1671241833119921e-05, 2.8665157187919391e-07
ROOT3 = math.sqrt(3.0)


# --------------------------------------------------------------------------------------------------------
# The block from NLL arrays, by hand


def _hand_table() -> dict[tuple[str, str], np.ndarray]:
    """Remember NLL 10 ± √3 (mean 10, std 2 with ddof=1) under base; everything +10 nats under tamed,
    except the forget images, which the tamed model puts at and beyond its own threshold 20 + 4·2 = 28."""
    remember = np.array([10 - ROOT3, 10 + ROOT3, 10 - ROOT3, 10 + ROOT3])
    return {
        ("base", "remember"): remember, ("tamed", "remember"): remember + 10.0,
        ("base", "forget"): np.array([12.0, 14.0]), ("tamed", "forget"): np.array([28.0, 30.0]),
        ("base", "holdout:x"): np.array([10.0, 12.0]), ("tamed", "holdout:x"): np.array([20.0, 23.0]),
    }


def test_block_by_hand():
    num_dims = 4
    bpd = 1.0 / (num_dims * math.log(2.0))
    block = ev.summarize_evaluation(_hand_table(), num_dims, delta=4.0, n_boot=200, seed=0,
                                    neighbours=ev.Neighbours(np.array([1, 3]), np.array([0.5, 0.7])))
    threshold = block["threshold"]
    assert threshold["epsilon"] == pytest.approx(0.6)  # 0.15 δ
    assert threshold["quantile"] == pytest.approx(SF_4, rel=1e-12)
    assert threshold["base"]["mu_nats"] == pytest.approx(10.0)
    assert threshold["base"]["sigma_nats"] == pytest.approx(2.0)
    assert threshold["base"]["threshold_nats"] == pytest.approx(18.0)
    assert threshold["tamed"]["threshold_bpd"] == pytest.approx(28.0 * bpd)
    assert threshold["tamed"]["sigma_bpd"] == pytest.approx(2.0 * bpd)
    # KL(N(10, 2²) ‖ N(20, 2²)) = log 1 + (4 + 100) / 8 - 1/2
    assert threshold["kl_base_tamed"] == pytest.approx(12.5)
    assert threshold["kl_tamed_base"] == pytest.approx(12.5)

    forget = block["sets"]["forget"]
    assert forget["role"] == "forget" and forget["n"] == 2
    assert forget["q_base"] == pytest.approx(((1 - PHI_1) + (1 - PHI_2)) / 2, rel=1e-12)
    assert forget["q_tamed"] == pytest.approx((SF_4 + SF_5) / 2, rel=1e-12)
    assert forget["qd"] == pytest.approx(forget["q_base"] - forget["q_tamed"], rel=1e-12)
    assert forget["qd_ci_low"] <= forget["qd"] <= forget["qd_ci_high"]
    # d under the tamed fit: (28 - 28)/2 = 0 and (30 - 28)/2 = 1, both > -ε; under base: -3 and -2.
    assert forget["d"]["tamed"] == pytest.approx({"min": 0.0, "median": 0.5, "max": 1.0})
    assert forget["d"]["base"] == pytest.approx({"min": -3.0, "median": -2.5, "max": -2.0})
    assert forget["forgotten_fraction"] == 1.0 and forget["forgotten_fraction_base"] == 0.0
    assert forget["base_mean_nll"] == 13.0 and forget["tamed_mean_bpd"] == pytest.approx(29.0 * bpd)
    # Two-sample KS of [12, 14] vs [28, 30]: D = 1; exact p = 2 / C(4, 2) (either sample entirely first).
    assert forget["ks_base_vs_tamed"] == pytest.approx({"statistic": 1.0, "pvalue": 1 / 3})

    holdout = block["sets"]["holdout:x"]
    assert holdout["role"] == "holdout"
    assert holdout["q_base"] == pytest.approx((0.5 + (1 - PHI_1)) / 2, rel=1e-12)
    assert holdout["q_tamed"] == pytest.approx((0.5 + (1 - PHI_1_5)) / 2, rel=1e-12)

    # The uniform shift: remember QD is exactly 0 (each model against its own fit) while mean BPD doubled.
    remember = block["sets"]["remember"]
    assert remember["q_base"] == pytest.approx(0.5) and remember["qd"] == pytest.approx(0.0, abs=1e-15)
    assert remember["bpd_change_relative"] == pytest.approx(1.0)
    neighbours = block["sets"]["neighbours"]
    assert neighbours["role"] == "neighbours" and neighbours["n"] == 2
    assert neighbours["base_mean_nll"] == pytest.approx(10 + ROOT3)
    assert block["neighbours"]["k"] == 2 and block["neighbours"]["distance_max"] == 0.7
    assert list(block["sets"]) == ["forget", "remember", "neighbours", "holdout:x"]
    assert block["normality"]["base"]["dagostino"] is None  # n = 4 < 8

    checks = {c["name"]: c for c in block["checks"]}
    assert set(checks) == {"forget.forgotten_fraction", "remember.qd", "holdout:x.qd", "neighbours.qd",
                           "remember.bpd_increase", "remember.normality_p"}
    assert checks["forget.forgotten_fraction"]["passed"]
    assert checks["remember.qd"]["passed"]
    assert not checks["remember.bpd_increase"]["passed"]  # QD hides the shift; the absolute check does not
    assert checks["holdout:x.qd"]["value"] == pytest.approx(holdout["qd"])
    assert checks["holdout:x.qd"]["passed"] == (holdout["qd"] <= 0.02)
    assert block["passed"] is False


def test_tolerances_are_overridable():
    loose = ev.Tolerances(max_remember_bpd_increase=None, max_holdout_qd=1.0, min_normality_p=0.0)
    block = ev.summarize_evaluation(_hand_table(), 4, tolerances=loose, n_boot=50)
    names = [c["name"] for c in block["checks"]]
    assert "remember.bpd_increase" not in names
    assert block["passed"] is True
    strict = ev.run_checks(block, dataclasses.replace(loose, max_remember_qd=-0.1))
    assert [c["name"] for c in strict if not c["passed"]] == ["remember.qd"]


def test_epsilon_decides_forgotten():
    table = _hand_table()
    table[("tamed", "forget")] = np.array([27.0, 30.0])  # d = -0.5 and 1
    assert ev.summarize_evaluation(table, 4, epsilon=0.6, n_boot=10)["sets"]["forget"]["forgotten_fraction"] == 1
    assert ev.summarize_evaluation(table, 4, epsilon=0.4, n_boot=10)["sets"]["forget"]["forgotten_fraction"] == 0.5


def test_bad_tables_are_refused():
    table = _hand_table()
    with pytest.raises(InputError, match="not paired"):
        ev.summarize_evaluation({**table, ("tamed", "forget"): np.array([1.0])}, 4)
    with pytest.raises(InputError, match="'forget'"):
        ev.summarize_evaluation({k: v for k, v in table.items() if k[1] != "forget"}, 4)
    with pytest.raises(InputError, match="σ_R = 0"):
        ev.summarize_evaluation({**table, ("base", "remember"): np.full(4, 3.0)}, 4)


def test_normality_warning():
    table = _hand_table()
    skewed = np.concatenate([np.full(40, 10.0) + np.linspace(0, 0.1, 40), [60.0, 80.0]])
    table[("base", "remember")] = skewed
    table[("tamed", "remember")] = skewed + 1
    block = ev.summarize_evaluation(table, 4, n_boot=10)
    assert block["normality"]["base"]["warning"] and "does not look normal" in block["warnings"][0]
    assert not {c["name"]: c for c in block["checks"]}["remember.normality_p"]["passed"]


# --------------------------------------------------------------------------------------------------------
# JSON schema (validated with jsonschema, tests/conftest.py::assert_valid_report)


def _report_for(block: dict) -> dict:
    from flowtame.io.fileio import json_safe

    return json_safe({"schema_version": 1, "kind": "evaluation", "flowtame_version": "0",
                      "models": {"base": {"path": "b", "sha256": None}, "tamed": {"path": None, "sha256": "x"}},
                      "evaluation": block})


def test_block_validates_against_the_schema(assert_valid_report):
    import jsonschema

    block = ev.summarize_evaluation(_hand_table(), 4, n_boot=20,
                                    neighbours=ev.Neighbours(np.array([0]), np.array([1.0])))
    report = _report_for(block)
    assert_valid_report(report, "evaluation.schema.json")
    broken = copy.deepcopy(report)
    del broken["evaluation"]["sets"]["forget"]["qd"]
    with pytest.raises(jsonschema.ValidationError, match="'qd' is a required property"):
        assert_valid_report(broken, "evaluation.schema.json")
    broken = copy.deepcopy(report)
    broken["evaluation"]["sets"]["remember"]["q_base"] = 1.5
    with pytest.raises(jsonschema.ValidationError, match="1.5 is greater than the maximum of 1"):
        assert_valid_report(broken, "evaluation.schema.json")


# --------------------------------------------------------------------------------------------------------
# End to end: real models, real image folders, the CLI (the shared fixture trains two tiny models: ~3 s)

DATA_SPEC = DataSpec(image_size=8, channels=1, n_bits=5)


def _synthetic_images(rng: np.random.Generator, n: int, second_mode: bool) -> np.ndarray:
    """uint8 [n, 8, 8]: smooth random patterns around grey; the second mode adds a faint checkerboard."""
    y, x = np.mgrid[0:8, 0:8] / 7.0
    patterns = (np.sin(np.pi * x), np.cos(np.pi * y), x * y)
    coefficients = rng.normal(size=(n, len(patterns)))
    images = 128 + sum(40 * coefficients[:, i, None, None] * p for i, p in enumerate(patterns))
    images = images + rng.normal(0, 10, (n, 8, 8))
    if second_mode:
        images = images + 12 * ((np.indices((8, 8)).sum(0) % 2) * 2 - 1)
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def _write_folder(folder, images: np.ndarray) -> str:
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image, "L").save(folder / f"{index:03d}.png")
    return str(folder)


def _nll(model, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return nll_nats(model, dequantize(x, DATA_SPEC.n_bits, torch.rand(x.shape, generator=generator)), DATA_SPEC)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Folders of images, a base model trained on them, an untamed copy and a tamed model (paths)."""
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    remember, holdout = _synthetic_images(rng, 160, False), _synthetic_images(rng, 96, False)
    second = _synthetic_images(rng, 20, True)
    folders = {"remember": _write_folder(root / "remember", remember),
               "holdout": _write_folder(root / "holdout", holdout),
               "forget": _write_folder(root / "forget", second[:4]),
               "forget_unseen": _write_folder(root / "forget_unseen", second[16:])}
    as_x = lambda a: quantize(torch.from_numpy(a)[:, None], DATA_SPEC.n_bits)  # noqa: E731
    x_remember, x_forget = as_x(remember), as_x(second[:4])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        spec = GlowSpec(channels=1, image_size=8, n_flow=1, n_block=2, hidden=16)
        model = build_glow(spec).train()
        train = torch.cat([x_remember, as_x(second[:16])])  # the forget images are training images
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(150):
            loss = _nll(model, train, generator).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        base = Checkpoint(model=model.eval(), architecture="glow", spec=spec, data_spec=DATA_SPEC)
        save_checkpoint(root / "base.safetensors", base)
        save_checkpoint(root / "copy.safetensors", base)

        # Taming, as simply as possible: keep fitting the remember set, push the forget images past
        # mu_R + 5.5 sigma_R (hinge), learning rate warmed up over 10 steps.
        tamed = copy.deepcopy(model).train()
        optimizer = torch.optim.Adam(tamed.parameters(), lr=1e-3)
        for step in range(120):
            remember_nll = _nll(tamed, x_remember, generator)
            forget_nll = _nll(tamed, x_forget, generator)
            mu, sigma = remember_nll.mean().detach(), remember_nll.std().detach()
            distance = (forget_nll.detach() - (mu + 4.0 * sigma)) / sigma
            if step > 10 and bool((distance > 1.0).all()):
                break
            loss = remember_nll.mean() + 0.15 * torch.relu(mu + 5.5 * sigma - forget_nll).mean()
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * min(1.0, (step + 1) / 10)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        save_checkpoint(root / "tamed.safetensors", Checkpoint(model=tamed.eval(), architecture="glow", spec=spec,
                                                               data_spec=DATA_SPEC))
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "base": str(root / "base.safetensors"), "copy": str(root / "copy.safetensors"),
            "tamed": str(root / "tamed.safetensors"), **folders}


def _set_args(world) -> list[str]:
    return ["--forget", world["forget"], "--remember", world["remember"], "--forget-unseen",
            world["forget_unseen"], "--holdout", world["holdout"], "--device", "cpu"]


def test_untamed_copy_fails_the_check(world, run_cli, assert_valid_report):
    report_path = world["root"] / "copy.json"
    result = run_cli("evaluate", world["base"], world["copy"], *_set_args(world), "--json", report_path,
                     "--check")
    assert result.exit_code == 1, result.stderr
    assert "forget.forgotten_fraction" in result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(report_path.read_text())  # written before failing
    assert_valid_report(report, "evaluation.schema.json")
    block = report["evaluation"]
    assert block["passed"] is False
    failed = [c["name"] for c in block["checks"] if not c["passed"]]
    assert failed == ["forget.forgotten_fraction"]
    # The same weights under the same paired noise: identical NLL, so QD is exactly 0 on every set.
    for set_block in block["sets"].values():
        assert set_block["qd"] == 0.0 and set_block["base_mean_nll"] == set_block["tamed_mean_nll"]
        assert set_block["ks_base_vs_tamed"]["statistic"] == 0.0


def test_tamed_model_passes_the_check(world, run_cli, assert_valid_report):
    report_path, plot_path = world["root"] / "tamed.json", world["root"] / "nll.png"
    result = run_cli("evaluate", world["base"], world["tamed"], *_set_args(world), "--json", report_path,
                     "--plot", plot_path, "--check")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "forget_unseen" in result.stdout and "all checks passed" in result.stdout
    report = json.loads(report_path.read_text())
    assert_valid_report(report, "evaluation.schema.json")
    block = report["evaluation"]
    assert block["passed"] is True
    assert block["sets"]["forget"]["forgotten_fraction"] == 1.0
    assert block["sets"]["forget"]["forgotten_fraction_base"] < 1.0
    # Every forget image has d > -ε, i.e. z = (NLL - μ_R)/σ_R > δ - ε = 3.4, so q_tamed < 1 - Φ(3.4).
    forget = block["sets"]["forget"]
    assert forget["q_tamed"] < 3.4e-4 and forget["qd"] == pytest.approx(forget["q_base"] - forget["q_tamed"])
    assert forget["qd_ci_low"] <= forget["qd"] <= forget["qd_ci_high"]
    assert abs(block["sets"]["remember"]["bpd_change_relative"]) < 0.01
    assert list(block["sets"]) == ["forget", "forget_unseen", "remember", f"holdout:{world['holdout']}"]
    assert report["models"]["tamed"]["sha256"] == load_checkpoint(world["tamed"]).sha256
    with Image.open(plot_path) as image:
        assert image.format == "PNG" and image.width > 500
    # Outputs are not overwritten without --force.
    again = run_cli("evaluate", world["base"], world["tamed"], *_set_args(world), "--json", report_path)
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_json_to_stdout_and_overridden_bounds(world, run_cli):
    result = run_cli("evaluate", world["base"], world["tamed"], *_set_args(world), "--json", "-", "--check",
                     "--max-remember-qd", "-1")
    assert result.exit_code == 1
    assert "remember.qd" in result.stderr and "forget.forgotten_fraction" not in result.stderr
    report = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert report["evaluation"]["tolerances"]["max_remember_qd"] == -1


def test_library_reuses_precomputed_nll_and_finds_neighbours(world, monkeypatch):
    base, tamed = load_checkpoint(world["base"]), load_checkpoint(world["tamed"])
    sets = {name: open_images(world[name], DATA_SPEC) for name in ("forget", "remember")}
    nll = ev.collect_nll(base, tamed, sets, seed=3, device="cpu", batch_size=64)
    reference = ev.evaluate_models(base, tamed, sets, seed=3, device="cpu", neighbours=5, n_boot=100,
                                   precomputed=nll)

    import flowtame.likelihood.nll

    def refuse(*args, **kwargs):
        raise AssertionError("compute_nll called although every NLL was given")

    monkeypatch.setattr(flowtame.likelihood.nll, "compute_nll", refuse)
    again = ev.evaluate_models(base, tamed, sets, seed=3, device="cpu", neighbours=5, n_boot=100,
                               precomputed=nll)
    assert again == reference
    neighbours = reference["sets"]["neighbours"]
    assert neighbours["n"] == 5 and reference["neighbours"]["k"] == 5
    # The neighbours are the remember images nearest the forget set: by hand, with the documented metric.
    n_bits = DATA_SPEC.n_bits
    with torch.no_grad():
        def latents(image_set):
            pixels, _ = image_set.load_tensor()
            z, _ = base.model.encode(quantize(pixels, n_bits) + 0.5 / 2 ** n_bits)
            return torch.cat([t.flatten(1) for t in z], 1).double()
        distance = torch.cdist(latents(sets["remember"]), latents(sets["forget"])).min(1).values.numpy()
    nearest = np.argsort(distance, kind="stable")[:5]
    assert neighbours["base_mean_nll"] == pytest.approx(nll[("base", "remember")][nearest].mean())
    assert reference["neighbours"]["distance_max"] == pytest.approx(np.sort(distance)[4])


def test_paired_noise_is_independent_of_batch_size(world):
    base = load_checkpoint(world["base"])
    sets = {name: open_images(world[name], DATA_SPEC) for name in ("forget", "remember")}
    small = ev.collect_nll(base, base, sets, seed=1, device="cpu", batch_size=7)
    large = ev.collect_nll(base, base, sets, seed=1, device="cpu", batch_size=256)
    for key in small:
        np.testing.assert_allclose(small[key], large[key], rtol=1e-5)
    np.testing.assert_array_equal(small[("base", "remember")], small[("tamed", "remember")])
    other = ev.collect_nll(base, base, sets, seed=2, device="cpu")
    assert not np.allclose(other[("base", "remember")], small[("base", "remember")])


def test_remember_images_that_are_forget_images_are_excluded(world, tmp_path):
    base = load_checkpoint(world["base"])
    listing = tmp_path / "remember.txt"
    forget_files = sorted(p for p in (world["root"] / "forget").iterdir())
    remember_files = sorted(p for p in (world["root"] / "remember").iterdir())[:30]
    listing.write_text("\n".join(map(str, remember_files + forget_files[:2])) + "\n")
    sets = {"forget": open_images(world["forget"], DATA_SPEC), "remember": open_images(listing, DATA_SPEC)}
    nll = ev.collect_nll(base, base, sets, device="cpu")
    assert nll[("base", "remember")].shape == (30,)
    block = ev.evaluate_models(base, base, sets, device="cpu", precomputed=nll, n_boot=10)
    assert block["sets"]["remember"]["n"] == 30


def test_mismatched_models_and_bad_neighbours(world, tmp_path, run_cli):
    spec = GlowSpec(channels=1, image_size=16, n_flow=1, n_block=2, hidden=8)
    other = Checkpoint(model=build_glow(spec).eval(), architecture="glow", spec=spec,
                       data_spec=DataSpec(image_size=16, channels=1, n_bits=5))
    save_checkpoint(tmp_path / "other.safetensors", other)
    result = run_cli("evaluate", world["base"], tmp_path / "other.safetensors", "--forget", world["forget"],
                     "--remember", world["remember"], "--device", "cpu")
    assert result.exit_code == 2 and "disagree" in result.stderr
    result = run_cli("evaluate", world["base"], world["copy"], "--forget", world["forget"],
                     "--remember", world["remember"], "--neighbours", "1000", "--device", "cpu")
    assert result.exit_code == 2 and "neighbours 1000" in result.stderr and "[--neighbours]" in result.stderr


def test_nll_statistics_agree_with_the_block(world):
    base, tamed = load_checkpoint(world["base"]), load_checkpoint(world["tamed"])
    sets = {name: open_images(world[name], DATA_SPEC) for name in ("forget", "remember")}
    nll = ev.collect_nll(base, tamed, sets, device="cpu")
    block = ev.summarize_evaluation(nll, DATA_SPEC.num_dims, n_boot=10)
    fit = st.fit_normal(nll[("tamed", "remember")])
    assert block["threshold"]["tamed"]["mu_nats"] == fit.mean
    expected = st.forgotten_fraction(nll[("tamed", "forget")], fit, 4.0, 0.6)
    assert block["sets"]["forget"]["forgotten_fraction"] == expected


def test_histogram_plot(tmp_path):
    from flowtame.figures.plots import plot_nll_histograms

    rng = np.random.default_rng(0)
    path = tmp_path / "hist.png"
    panels = {"base": {"remember": rng.normal(100, 5, 200), "forget": np.array([104.0, 108.0])},
              "tamed": {"remember": rng.normal(101, 5, 200), "forget": np.array([125.0, 130.0])}}
    fits = {"base": st.NormalFit(100, 5), "tamed": st.NormalFit(101, 5)}
    plot_nll_histograms(path, panels, fits=fits, delta=4.0, epsilon=0.6)
    with Image.open(path) as image:
        assert image.format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["hist.png"]  # no temporary file left behind
    with pytest.raises(OutputExistsError):
        plot_nll_histograms(path, panels)
    plot_nll_histograms(path, panels, num_dims=64, force=True)
