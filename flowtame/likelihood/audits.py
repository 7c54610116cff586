"""Audits a privacy officer accepts: membership inference, forget quality, generation share, the holdout target.

NumPy/SciPy only, on per-image NLL (nats) or latent distances, so every figure can be checked by hand
(docs/audits.md explains each one and how to read it).

- **Scores** follow one convention: a higher score means "more likely a member" (trained on). The loss
  attack's score is ``-NLL`` under the audited model; the reference (likelihood-ratio) attack's is
  ``-(NLL_model - NLL_base)``, the audited model's NLL relative to the base model's on the same image.
- **ROC AUC** ``= P(s_member > s_nonmember) + ½ P(s_member = s_nonmember)`` over all member/non-member pairs:
  the Mann–Whitney U statistic of the members divided by ``n_members · n_nonmembers``. 0.5: the two sets are
  indistinguishable; above 0.5 the members look more likely (remembered); below 0.5 they look *less* likely
  than never-seen images (over-suppressed: an attacker looking for outliers finds them).
- **TPR at FPR α**: the attacker flags ``score >= t`` and picks the threshold t that maximizes the true
  positive rate while at most ``floor(α · n_nonmembers)`` non-members are flagged:
  ``TPR = mean(s_member > v)`` with ``v`` the ``(floor(α n_0) + 1)``-th largest non-member score (1 when
  ``floor(α n_0) >= n_0``). With fewer than 100 non-members, α = 1% allows no false positive at all.
  ``tpr_outlier`` is the same with the scores negated: the attacker who flags the *least* likely images.
- **Bootstrap intervals**: members and non-members resampled with replacement separately (stratified),
  ``n_boot`` times from ``numpy.random.default_rng(seed)``; 95% percentile intervals.
- **Relative leakage** (MUSE's PrivLeak): ``(AUC_model - AUC_retrained) / AUC_retrained``.
- **Forget quality** (TOFU): the two-sample KS p-value between the audited and the retrained model's NLL on
  the same images; high p: the NLL distributions cannot be told apart.
- **Generation share**: the fraction of samples whose nearest training image (forget ∪ remember, latent
  distance) is a forget image lying within a radius calibrated on held-out images, with a Clopper–Pearson
  interval; base vs tamed (same latents, paired) with McNemar's exact test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

#: False-positive rates at which the true-positive rate is reported.
FPR_LEVELS: tuple[float, ...] = (0.01, 0.05)
#: Confidence level of every interval in the audits.
LEVEL = 0.95
#: Held-out images fall within the generation audit's radius of their nearest training image this often.
DEFAULT_RADIUS_QUANTILE = 0.05
#: The holdout target's band: the held-out NLL between these quantiles (the interquartile range).
TARGET_BAND = (0.25, 0.75)


def _scores(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty one-dimensional array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def roc_auc(members: ArrayLike, nonmembers: ArrayLike) -> float:
    """ROC AUC of scores [N1] vs [N0] (higher = member): Mann–Whitney U of the members / (N1·N0)."""
    first, second = _scores(members, "members"), _scores(nonmembers, "nonmembers")
    u = stats.mannwhitneyu(first, second, alternative="two-sided", method="asymptotic").statistic
    return float(u) / (first.size * second.size)


def _auc_fast(members: np.ndarray, nonmembers_sorted: np.ndarray) -> float:
    """The same AUC by binary search (``nonmembers_sorted`` ascending): used inside the bootstrap."""
    below = np.searchsorted(nonmembers_sorted, members, side="left")
    not_above = np.searchsorted(nonmembers_sorted, members, side="right")
    return float((below + not_above).sum()) / (2.0 * members.size * nonmembers_sorted.size)


def tpr_at_fpr(members: ArrayLike, nonmembers: ArrayLike, fpr: float) -> float:
    """Best true-positive rate of ``score >= t`` with at most ``floor(fpr · N0)`` non-members flagged."""
    first, second = _scores(members, "members"), _scores(nonmembers, "nonmembers")
    if not 0 <= fpr <= 1:
        raise ValueError(f"a false-positive rate lies in [0, 1], got {fpr}")
    return _tpr_sorted(first, np.sort(second)[::-1], fpr)


def _tpr_sorted(members: np.ndarray, nonmembers_descending: np.ndarray, fpr: float) -> float:
    allowed = math.floor(fpr * nonmembers_descending.size + 1e-9)
    if allowed >= nonmembers_descending.size:
        return 1.0
    return float(np.mean(members > nonmembers_descending[allowed]))


def _interval(samples: np.ndarray) -> tuple[float, float]:
    tail = 50.0 * (1.0 - LEVEL)
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def attack_summary(members: ArrayLike, nonmembers: ArrayLike, *, n_boot: int = 1000, seed: int = 0,
                   fprs: tuple[float, ...] = FPR_LEVELS) -> dict:
    """AUC, TPR at each FPR (flagging high scores) and TPR of the outlier attacker (flagging low scores),
    each with its stratified bootstrap 95% interval.

    Returns ``{"auc", "auc_ci_low", "auc_ci_high", "tpr": {str(fpr): {"value", "ci_low", "ci_high"}},
    "tpr_outlier": {...}}``.
    """
    first, second = _scores(members, "members"), _scores(nonmembers, "nonmembers")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    rng = np.random.default_rng(seed)
    boot_auc = np.empty(n_boot)
    boot_tpr = np.empty((2, len(fprs), n_boot))
    for b in range(n_boot):
        m = first[rng.integers(0, first.size, first.size)]
        n = np.sort(second[rng.integers(0, second.size, second.size)])
        boot_auc[b] = _auc_fast(m, n)
        for i, fpr in enumerate(fprs):
            boot_tpr[0, i, b] = _tpr_sorted(m, n[::-1], fpr)
            boot_tpr[1, i, b] = _tpr_sorted(-m, -n, fpr)
    auc_low, auc_high = _interval(boot_auc)
    tprs: list[dict] = [{}, {}]
    for side, sign in enumerate((1.0, -1.0)):
        for i, fpr in enumerate(fprs):
            low, high = _interval(boot_tpr[side, i])
            tprs[side][f"{fpr:g}"] = {"value": tpr_at_fpr(sign * first, sign * second, fpr),
                                      "ci_low": low, "ci_high": high}
    return {"auc": roc_auc(first, second), "auc_ci_low": auc_low, "auc_ci_high": auc_high,
            "tpr": tprs[0], "tpr_outlier": tprs[1]}


def relative_leakage(auc_model: float, auc_retrained: float) -> float | None:
    """MUSE's privacy leakage ``(AUC_model - AUC_retrained) / AUC_retrained``: 0 = as private as retraining,
    positive = remembers more, negative = over-unlearned (the forget set stands out as unlikely); None when
    the retrained model's AUC is 0 (undefined)."""
    if auc_retrained <= 0:
        return None
    return (auc_model - auc_retrained) / auc_retrained


def membership_audit(forget: Mapping[str, ArrayLike], holdout: Mapping[str, ArrayLike], *, n_boot: int = 1000,
                     seed: int = 0) -> dict:
    """Loss and reference attacks on forget (members) vs held-out (non-members) images.

    ``forget``, ``holdout``: model name -> NLL (nats) [N_F], [N_H]; "base" and "tamed" required, "retrained"
    optional; entry i of every model is the same image. The loss attack runs on every model; the reference
    attack (score ``-(NLL_model - NLL_base)``) on every model but the base. With "retrained", the relative
    leakage of the tamed (and base) model per attack. Returns the report's ``audits.membership`` block
    without its set names.
    """
    for required in ("base", "tamed"):
        if required not in forget or required not in holdout:
            raise ValueError(f"the membership audit needs the {required} model's NLL on both sets")
    f = {m: _scores(v, f"forget NLL ({m})") for m, v in forget.items()}
    h = {m: _scores(v, f"holdout NLL ({m})") for m, v in holdout.items()}
    loss = {m: attack_summary(-f[m], -h[m], n_boot=n_boot, seed=seed) for m in f}
    reference = {m: attack_summary(-(f[m] - f["base"]), -(h[m] - h["base"]), n_boot=n_boot, seed=seed)
                 for m in f if m != "base"}
    leakage = None
    if "retrained" in f:
        leakage = {attack: {m: relative_leakage(models[m]["auc"], models["retrained"]["auc"])
                            for m in models if m != "retrained"}
                   for attack, models in (("loss", loss), ("reference", reference))}
    return {"n_members": int(f["base"].size), "n_nonmembers": int(h["base"].size), "n_boot": int(n_boot),
            "fpr_levels": list(FPR_LEVELS),
            "attacks": {"loss": loss, "reference": reference}, "relative_leakage": leakage}


def reading_of_auc(auc_low: float, auc_high: float) -> str:
    """``indistinguishable`` when the AUC interval holds 0.5, ``remembered`` above it, ``over-suppressed``
    below it (the forget images look less likely than never-seen ones)."""
    if auc_low > 0.5:
        return "remembered"
    if auc_high < 0.5:
        return "over-suppressed"
    return "indistinguishable"


def goals_block(forgotten_fraction: float, loss_attack: dict, retrained_auc: float | None = None) -> dict:
    """Both goals side by side: suppression (every forget image beyond the threshold) and looking never
    trained on (the loss attack's AUC interval holds 0.5), with a sentence when they pull apart."""
    reading = reading_of_auc(loss_attack["auc_ci_low"], loss_attack["auc_ci_high"])
    suppressed = forgotten_fraction >= 1.0
    tension = None
    if suppressed and reading == "over-suppressed":
        tension = (f"every forget image is beyond the threshold, but that makes them stand out: the loss attack's "
                   f"AUC is {loss_attack['auc']:.3f} (an attacker flagging the least likely images finds "
                   f"{loss_attack['tpr_outlier']['0.05']['value']:.0%} of them at 5% false positives)"
                   + ("" if retrained_auc is None else
                      f", where a model retrained without them gives {retrained_auc:.3f}")
                   + "; ask for --target holdout to forget to the level of never-seen images instead")
    elif not suppressed and reading == "indistinguishable":
        tension = ("the forget images look like never-seen images to the loss attack, but they are not beyond the "
                   "suppression threshold: a sampler can still produce them about as often as unseen data")
    return {"suppression": {"forgotten_fraction": float(forgotten_fraction), "met": bool(suppressed)},
            "never_trained_on": {"auc": loss_attack["auc"], "auc_ci_low": loss_attack["auc_ci_low"],
                                 "auc_ci_high": loss_attack["auc_ci_high"], "reading": reading,
                                 "met": reading == "indistinguishable"},
            "tension": tension}


def forget_quality(model_nll: ArrayLike, retrained_nll: ArrayLike) -> dict[str, float]:
    """TOFU's forget quality: two-sample KS test of the audited vs the retrained model's NLL on one set."""
    result = stats.ks_2samp(_scores(model_nll, "model NLL"), _scores(retrained_nll, "retrained NLL"))
    return {"statistic": float(result.statistic), "pvalue": float(result.pvalue)}


def clopper_pearson(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact (Clopper–Pearson) interval of a binomial proportion ``successes / trials``."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    interval = stats.binomtest(successes, trials).proportion_ci(confidence_level=level, method="exact")
    return float(interval.low), float(interval.high)


def mcnemar_exact(before: ArrayLike, after: ArrayLike) -> dict:
    """Exact McNemar test of paired booleans [M]: a binomial test of the discordant pairs against ½."""
    first, second = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    only_before, only_after = int((first & ~second).sum()), int((~first & second).sum())
    discordant = only_before + only_after
    pvalue = 1.0 if discordant == 0 else float(stats.binomtest(only_before, discordant).pvalue)
    return {"only_before": only_before, "only_after": only_after, "pvalue": pvalue}


@dataclass(frozen=True)
class NearestDistances:
    """Distances [M] from each query to its nearest forget image and its nearest remember image."""

    forget: np.ndarray
    remember: np.ndarray

    def nearest_is_forget(self) -> np.ndarray:
        """Boolean [M]: the nearest training image is a forget image (ties go to the remember set)."""
        return self.forget < self.remember

    def nearest(self) -> np.ndarray:
        return np.minimum(self.forget, self.remember)


def generation_radius(holdout: NearestDistances, quantile: float = DEFAULT_RADIUS_QUANTILE) -> float:
    """The radius within which a held-out image lies of its nearest training image ``quantile`` of the time."""
    if not 0 < quantile <= 1:
        raise ValueError(f"the radius quantile lies in (0, 1], got {quantile}")
    return float(np.quantile(holdout.nearest(), quantile))


def generation_share(samples: dict[str, NearestDistances], radius: float) -> dict:
    """Per model: samples whose nearest training image is a forget image (``nearest_forget``) and, of them,
    those within ``radius`` (``within_radius``), as counts, shares and Clopper–Pearson intervals; and
    McNemar's test of each model against the first (the base) on the paired flags (same latents)."""
    if len({d.forget.size for d in samples.values()}) > 1:
        raise ValueError("every model needs the same number of samples (drawn from the same latents)")
    flags = {m: d.nearest_is_forget() & (d.forget <= radius) for m, d in samples.items()}
    models = {}
    for name, dist in samples.items():
        m = dist.forget.size
        nearest, within = int(dist.nearest_is_forget().sum()), int(flags[name].sum())
        low, high = clopper_pearson(within, m)
        nearest_low, nearest_high = clopper_pearson(nearest, m)
        models[name] = {"samples": m, "within_radius": within, "share": within / m, "ci_low": low,
                        "ci_high": high, "nearest_forget": nearest, "share_nearest": nearest / m,
                        "nearest_ci_low": nearest_low, "nearest_ci_high": nearest_high}
    first = next(iter(samples))
    change = {m: mcnemar_exact(flags[first], flags[m]) for m in samples if m != first}
    return {"radius": float(radius), "models": models, "change_vs_base": change}


@dataclass(frozen=True)
class HoldoutTarget:
    """``--target holdout`` as the stopping rule's δ and ε (σ_R units of the base model's remember normal):
    the band ``[Q25, Q75]`` of the held-out NLL is ``μ_R + (δ ± ε) σ_R``."""

    delta: float
    epsilon: float
    median_nats: float
    low_nats: float
    high_nats: float
    holdout_n: int

    def to_dict(self) -> dict:
        return {"kind": "holdout", **asdict(self)}


def holdout_target(remember_nll: ArrayLike, holdout_nll: ArrayLike, band: tuple[float, float] = TARGET_BAND
                   ) -> HoldoutTarget:
    """δ, ε that put the stopping band |d| < ε on the held-out images' NLL band under the base model.

    ``δ = (mid - μ_R)/σ_R`` and ``ε = (high - low) / (2σ_R)``, with low, high the held-out NLL's ``band``
    quantiles and mid their midpoint; ``μ_R, σ_R`` the remember NLL's mean and std (ddof 1). δ may be
    negative or zero: held-out images of one kind (a digit class, a person) can be more likely than the
    remember set's average, and the rule |d| < ε does not need δ > 0. Raises ValueError on an empty band.
    """
    remember, holdout = _scores(remember_nll, "remember NLL"), _scores(holdout_nll, "holdout NLL")
    if remember.size < 2 or holdout.size < 2:
        raise ValueError("the holdout target needs at least 2 remember and 2 held-out images")
    mu, sigma = float(remember.mean()), float(remember.std(ddof=1))
    low, high = (float(v) for v in np.quantile(holdout, band))
    mid = (low + high) / 2.0
    if not high > low or not sigma > 0:
        raise ValueError(f"the held-out images' NLL band [{low:.1f}, {high:.1f}] nats is empty: the held-out set "
                         "cannot serve as a target")
    return HoldoutTarget(delta=(mid - mu) / sigma, epsilon=(high - low) / (2.0 * sigma),
                         median_nats=float(np.median(holdout)), low_nats=low, high_nats=high,
                         holdout_n=int(holdout.size))
