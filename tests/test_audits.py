"""Audits: AUC, TPR at fixed FPR, intervals, leakage, generation share and the holdout target, by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flowtame.data.images import open_images
from flowtame.data.quantization import DataSpec
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint
from flowtame.likelihood import audits as au
from flowtame.likelihood.auditing import AuditSets, generation_audit, nearest_training_distances
from flowtame.likelihood.evaluation import nearest_distance


def test_auc_by_hand():
    # pairs (member, non-member): (3,0) 1, (3,2) 1, (1,0) 1, (1,2) 0, (2,0) 1, (2,2) 1/2 -> 4.5 / 6
    assert au.roc_auc([3, 1, 2], [0, 2]) == pytest.approx(0.75)
    assert au.roc_auc([0, 2], [3, 1, 2]) == pytest.approx(0.25)
    assert au.roc_auc([1, 1], [1, 1, 1]) == pytest.approx(0.5)


def test_fast_auc_agrees_with_mann_whitney_on_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        members, nonmembers = rng.integers(0, 6, 7).astype(float), rng.integers(0, 6, 11).astype(float)
        pairs = np.mean((members[:, None] > nonmembers) + 0.5 * (members[:, None] == nonmembers))
        assert au.roc_auc(members, nonmembers) == pytest.approx(pairs)
        assert au._auc_fast(members, np.sort(nonmembers)) == pytest.approx(pairs)


def test_tpr_at_fpr_by_hand():
    members, nonmembers = [5, 4, 3, 2], [4.5, 3.5, 1, 0]
    assert au.tpr_at_fpr(members, nonmembers, 0.0) == 0.25      # no false positive: only 5 > 4.5
    assert au.tpr_at_fpr(members, nonmembers, 0.01) == 0.25     # floor(0.04) = 0 false positives allowed
    assert au.tpr_at_fpr(members, nonmembers, 0.25) == 0.5      # one allowed: threshold above 3.5
    assert au.tpr_at_fpr(members, nonmembers, 0.5) == 1.0       # two allowed: threshold above 1
    assert au.tpr_at_fpr(members, nonmembers, 1.0) == 1.0


def _tpr_brute_force(members, nonmembers, fpr):
    """Every threshold t among the scores (and +inf): flag score >= t; best TPR with FPR <= fpr."""
    best = 0.0
    for t in [*members, *nonmembers, math.inf]:
        if np.mean(np.asarray(nonmembers) >= t) <= fpr + 1e-12:
            best = max(best, float(np.mean(np.asarray(members) >= t)))
    return best


def test_tpr_matches_brute_force_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(30):
        members, nonmembers = rng.integers(0, 8, 9).astype(float), rng.integers(0, 8, 23).astype(float)
        for fpr in (0.0, 0.01, 0.05, 0.1, 0.3):
            assert au.tpr_at_fpr(members, nonmembers, fpr) == _tpr_brute_force(members, nonmembers, fpr)


def test_attack_summary_intervals():
    separated = au.attack_summary([10, 11, 12], [0, 1, 2, 3], n_boot=200, seed=0)
    assert separated["auc"] == 1.0 and separated["auc_ci_low"] == separated["auc_ci_high"] == 1.0
    assert separated["tpr"]["0.01"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    assert separated["tpr_outlier"]["0.05"]["value"] == 0.0  # flagging the lowest scores finds no member
    rng = np.random.default_rng(2)
    members, nonmembers = rng.normal(0.5, 1, 40), rng.normal(0, 1, 60)
    summary = au.attack_summary(members, nonmembers, n_boot=300, seed=3)
    assert summary["auc_ci_low"] <= summary["auc"] <= summary["auc_ci_high"]
    assert summary == au.attack_summary(members, nonmembers, n_boot=300, seed=3)  # seeded
    assert summary != au.attack_summary(members, nonmembers, n_boot=300, seed=4)


def test_membership_audit_and_leakage_by_hand():
    forget = {"base": np.array([1.0, 2.0]), "tamed": np.array([5.0, 6.0]), "retrained": np.array([3.0, 4.0])}
    holdout = {"base": np.array([3.0, 4.0]), "tamed": np.array([3.0, 4.0]), "retrained": np.array([3.0, 4.0])}
    block = au.membership_audit(forget, holdout, n_boot=50)
    loss = block["attacks"]["loss"]
    assert loss["base"]["auc"] == 1.0          # lower NLL than every held-out image: all recognised
    assert loss["tamed"]["auc"] == 0.0         # higher than every held-out image: over-suppressed
    assert loss["retrained"]["auc"] == 0.5     # the same NLL as the held-out images
    # reference score -(NLL - NLL_base): forget +4 for tamed, held-out 0
    assert block["attacks"]["reference"]["tamed"]["auc"] == 0.0
    assert set(block["attacks"]["reference"]) == {"tamed", "retrained"}
    assert block["relative_leakage"]["loss"] == {"base": 1.0, "tamed": -1.0}
    assert block["relative_leakage"]["reference"] == {"tamed": None}  # the retrained AUC is 0: undefined
    assert au.relative_leakage(0.6, 0.5) == pytest.approx(0.2)
    goals = au.goals_block(1.0, loss["tamed"], loss["retrained"]["auc"])
    assert goals["never_trained_on"]["reading"] == "over-suppressed" and "stand out" in goals["tension"]
    assert au.goals_block(1.0, loss["retrained"])["tension"] is None


def test_clopper_pearson_and_mcnemar_by_hand():
    low, high = au.clopper_pearson(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10))
    low, high = au.clopper_pearson(10, 10)
    assert low == pytest.approx(0.025 ** (1 / 10)) and high == 1.0
    test = au.mcnemar_exact([1, 1, 1, 0, 1], [0, 0, 0, 0, 1])
    assert test == {"only_before": 3, "only_after": 0, "pvalue": pytest.approx(2 * 0.5 ** 3)}


def test_generation_share_by_hand():
    holdout = au.NearestDistances(forget=np.array([9.0, 9, 9, 9]), remember=np.array([1.0, 2, 3, 4]))
    radius = au.generation_radius(holdout, 0.5)
    assert radius == pytest.approx(2.5)
    base = au.NearestDistances(forget=np.array([1.0, 2.0, 3.0, 1.0]), remember=np.array([5.0, 5.0, 5.0, 0.5]))
    tamed = au.NearestDistances(forget=np.array([6.0, 2.0, 6.0, 6.0]), remember=np.array([5.0, 5.0, 5.0, 0.5]))
    share = au.generation_share({"base": base, "tamed": tamed}, radius)
    # base: nearest is forget for samples 0, 1, 2; within 2.5 for 0, 1. tamed: only sample 1.
    assert share["models"]["base"]["nearest_forget"] == 3 and share["models"]["base"]["within_radius"] == 2
    assert share["models"]["tamed"]["share"] == 0.25
    assert share["change_vs_base"]["tamed"] == {"only_before": 1, "only_after": 0, "pvalue": 1.0}


def test_holdout_target_by_hand():
    target = au.holdout_target([0.0, 2.0], [4.0, 5.0, 6.0, 7.0, 8.0])
    # mu 1, sigma sqrt(2); band [5, 7] -> delta = (6 - 1)/sqrt 2, epsilon = 1/sqrt 2
    assert target.delta == pytest.approx(5 / math.sqrt(2)) and target.epsilon == pytest.approx(1 / math.sqrt(2))
    assert (target.low_nats, target.high_nats, target.median_nats) == (5.0, 7.0, 6.0)
    below = au.holdout_target([10.0, 12.0], [4.0, 5.0, 6.0])  # held-out images more likely than D_R: delta < 0
    assert below.delta == pytest.approx((5 - 11) / math.sqrt(2)) and below.epsilon == pytest.approx(0.5 / math.sqrt(2))
    with pytest.raises(ValueError, match="cannot serve as a target"):
        au.holdout_target([10.0, 12.0], [4.0, 4.0, 4.0])


def test_generation_audit_of_a_model_that_samples_only_forget_images():
    """Samples that are the forget images themselves: every one is a forget image's copy (share 1);
    samples that are remember images: none is."""
    spec = DataSpec(image_size=16, channels=1, n_bits=5)
    torch.manual_seed(0)
    base = Checkpoint(model=build_glow(GlowSpec(channels=1, image_size=16, n_flow=1, n_block=2, hidden=8)).eval(),
                      architecture="glow", spec=None, data_spec=spec)  # spec unused here
    forget = open_images("embedded:digits:test:3", spec)
    remember = open_images("embedded:digits:test", spec)  # holds the forget images: they are left out
    holdout = open_images("embedded:digits:train:3", spec)
    sets = AuditSets(forget=[forget], remember=remember, holdout=[holdout])
    remember_pixels = open_images("embedded:digits:test:5", spec).load_tensor()[0].numpy()
    m = min(len(forget), len(remember_pixels))
    forget_pixels, remember_pixels = forget.load_tensor()[0].numpy()[:m], remember_pixels[:m]
    block = generation_audit(base, {"base": forget_pixels, "tamed": remember_pixels}, sets, device="cpu")
    assert block["models"]["base"]["share"] == 1.0
    assert block["models"]["base"]["ci_low"] == pytest.approx(0.025 ** (1 / m))  # Clopper-Pearson, m of m
    assert block["models"]["tamed"]["share"] == 0.0
    assert block["change_vs_base"]["tamed"]["only_before"] == m


def test_nearest_distance_is_exact_whatever_the_chunks():
    """Exact Euclidean distances: 0 from an equal row (the matrix-product shortcut gave ~1e-6 in float64 and a
    few thousandths in float32), brute force to float64 rounding, and the same bits however the reference
    rows are chunked."""
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(200, 768, generator=gen, dtype=torch.float64) * 3 + 1
    query = torch.cat([reference[::5], torch.randn(40, 768, generator=gen, dtype=torch.float64) * 3 + 1])
    whole = nearest_distance(query, reference)
    assert torch.equal(whole[:40], torch.zeros(40, dtype=torch.float64))
    brute = np.sqrt(((query.numpy()[:, None] - reference.numpy()[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(whole.numpy(), brute, rtol=1e-13, atol=0)
    for size in (1, 7, 64):
        chunked = torch.stack([nearest_distance(query, part) for part in reference.split(size)]).min(0).values
        assert torch.equal(chunked, whole)


def test_generation_distances_are_zero_for_copies_and_do_not_depend_on_the_batch_size():
    """A query image equal to a forget image is 0 from it (not 0.006 as the float32 matrix-product distances
    gave); the remember set, streamed batch_size files at a time, gives the same distances at every batch size
    (this small model's latents are the same bits at every batch shape)."""
    spec = DataSpec(image_size=16, channels=1, n_bits=5)
    torch.manual_seed(0)
    base = Checkpoint(model=build_glow(GlowSpec(channels=1, image_size=16, n_flow=1, n_block=2, hidden=8)).eval(),
                      architecture="glow", spec=None, data_spec=spec)
    forget, remember = open_images("embedded:digits:test:3", spec), open_images("embedded:digits:train:8", spec)
    sets = AuditSets(forget=[forget], remember=remember, holdout=[])
    queries = {"copies": forget.load_tensor()[0], "fives": open_images("embedded:digits:test:5", spec).load_tensor()[0]}
    runs = {size: nearest_training_distances(base, queries, sets, device="cpu", batch_size=size) for size in (256, 7)}
    assert runs[256]["copies"].forget.tolist() == [0.0] * len(forget)
    assert np.median(runs[256]["fives"].forget) > 1  # typical distances on this model: ~4
    for name in queries:
        np.testing.assert_array_equal(runs[7][name].forget, runs[256][name].forget)
        np.testing.assert_array_equal(runs[7][name].remember, runs[256][name].remember)


@pytest.mark.slow
def test_evaluate_runs_the_audits_on_the_embedded_model(run_cli, tmp_path, assert_valid_report):
    """The embedded Glow against itself: members are train threes, non-members test threes. The same model as
    tamed and retrained: reference attack at exactly 0.5, forget quality p = 1, leakage 0; the base model
    recognises its training images a little (AUC above 0.5), so an opt-in AUC-gap bound of 0.05 fails."""
    path = tmp_path / "audit.json"
    result = run_cli("evaluate", "embedded:glow-digits", "embedded:glow-digits", "--forget", "embedded:digits:train:3",
                     "--remember", "embedded:digits:test", "--holdout", "embedded:digits:test:3",
                     "--retrained", "embedded:glow-digits", "--generation-audit", "64", "--forget-draws", "1",
                     "--n-boot", "200", "--device", "cpu", "--json", path, "--quiet", "--audit-plot",
                     tmp_path / "roc.png",
                     "--max-membership-auc-gap", "0.05", "--max-privacy-leakage", "0.01", "--check")
    assert result.exit_code == 1, result.stderr
    report = json.loads(path.read_text())
    assert_valid_report(report, "evaluation.schema.json")
    audits = report["evaluation"]["audits"]
    loss = audits["membership"]["attacks"]["loss"]
    assert 0.55 < loss["base"]["auc"] < 0.8 and loss["tamed"] == loss["base"] == loss["retrained"]
    assert audits["membership"]["attacks"]["reference"]["tamed"]["auc"] == 0.5
    assert audits["membership"]["relative_leakage"]["loss"]["tamed"] == 0.0
    assert audits["retrained"]["forget_quality"] == 1.0
    shares = {m: g["share_nearest"] for m, g in audits["generation"]["models"].items()}
    assert shares["base"] == shares["tamed"] == shares["retrained"]  # the same model decodes the same latents
    failed = {c["name"] for c in report["evaluation"]["checks"] if not c["passed"]}
    assert failed == {"forget.forgotten_fraction", "membership.auc_gap"}
    assert "membership.auc_gap" in result.stderr
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audits_need_a_holdout(run_cli, tmp_path):
    result = run_cli("evaluate", "embedded:glow-digits", "embedded:glow-digits", "--forget", "embedded:digits:test:3",
                     "--remember", "embedded:digits:test", "--retrained", "embedded:glow-digits", "--quiet")
    assert result.exit_code == 2 and "need --holdout" in result.stderr and "Traceback" not in result.stderr


def test_sample_command_audits_generation(run_cli, tmp_path):
    """Two rows from the same model decode the same latents: identical shares, no discordant sample."""
    out = tmp_path / "audit.json"
    result = run_cli("sample", "embedded:glow-digits", "embedded:glow-digits", "-n", "24", "-o", tmp_path / "grid.png",
                     "--device", "cpu", "--audit-forget", "embedded:digits:train:3", "--audit-remember",
                     "embedded:digits:train", "--audit-holdout", "embedded:digits:test", "--audit-json", out)
    assert result.exit_code == 0, result.stderr
    block = json.loads(out.read_text())
    first, second = block["models"].values()
    assert first == second and first["samples"] == 24 and block["holdout_n"] > 100
    assert list(block["change_vs_base"].values()) == [{"only_before": 0, "only_after": 0, "pvalue": 1.0}]
    assert "within" in result.stdout
    partial = run_cli("sample", "embedded:glow-digits", "-o", tmp_path / "g2.png", "--audit-forget", "x")
    assert partial.exit_code == 2 and "together" in partial.stderr


def test_roc_curve_by_hand():
    from flowtame.figures.audit_plots import roc_curve

    fpr, tpr = roc_curve(np.array([3.0, 1.0]), np.array([2.0, 0.0]))
    # thresholds 3, 2, 1, 0: flagged members 1/2, 1/2, 1, 1; non-members 0, 1/2, 1/2, 1
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    area = float(np.sum(np.diff(fpr) * tpr[1:]))
    assert area == pytest.approx(au.roc_auc([3.0, 1.0], [2.0, 0.0]))  # the step curve's area is the AUC
