"""The model passes behind the audits (:mod:`flowtame.likelihood.audits` holds the statistics).

:func:`add_audits` extends an evaluation block (``evaluate``'s or ``tame``'s) with ``audits``: the membership
audit (forget vs held-out images), the retrained gold standard, the generation audit and both goals, and
appends the opt-in audit checks. Every NLL here uses the evaluation's keyed noise (``seed``), so the three
models are compared on identical draws. Fields and units: docs/report-schema.md; how to read them:
docs/audits.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from flowtame.data.images import ImageSet
from flowtame.data.quantization import nats_to_bpd
from flowtame.engine.devices import resolve_device
from flowtame.errors import InputError
from flowtame.io.checkpoint import Checkpoint
from flowtame.likelihood import audits as au
from flowtame.likelihood import statistics as st
from flowtame.likelihood.evaluation import _check, _latent_rows, nearest_distance
from flowtame.likelihood.nll import compute_nll

GENERATION_METRIC = ("euclidean distance between the base model's concatenated, flattened latents, every image "
                     "(sample, training or held-out) encoded at the centre of its quantization bins")


@dataclass(frozen=True)
class AuditTolerances:
    """Opt-in bounds on the audits (``None`` skips a check).

    - ``max_membership_auc_gap``: ``|AUC - 0.5|`` of the loss attack on the tamed model, at most.
    - ``max_privacy_leakage``: ``|relative leakage|`` of the tamed model's loss attack (needs a retrained model).
    - ``min_forget_quality``: KS p-value of tamed vs retrained NLL on the forget set, at least.
    - ``max_generation_share``: the tamed model's share of samples within the radius of a forget image.
    """

    max_membership_auc_gap: float | None = None
    max_privacy_leakage: float | None = None
    min_forget_quality: float | None = None
    max_generation_share: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass(frozen=True)
class AuditSets:
    """The images the audits use: the forget sources (pooled as members), the remember set, held-out images
    (pooled as non-members; they should come from D_F's distribution and never have been trained on) and
    optionally D'_F."""

    forget: Sequence[ImageSet]
    remember: ImageSet
    holdout: Sequence[ImageSet]
    forget_unseen: ImageSet | None = None


def _pooled_nll(model: Checkpoint, image_sets: Sequence[ImageSet], *, draws: int, seed: int, device: str,
                batch_size: int, precision: str) -> tuple[np.ndarray, list[str]]:
    """NLL (nats [N]) and keys of several sets, concatenated in order."""
    results = [compute_nll(model.model, s, seed=seed, device=device, batch_size=batch_size, precision=precision,
                           draws=draws) for s in image_sets]
    return np.concatenate([r.nll for r in results]), [k for r in results for k in r.keys]


def _retrained_sets(nll: Mapping[str, np.ndarray], tamed: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                    fit: st.NormalFit, delta: float, epsilon: float, num_dims: int) -> dict[str, Any]:
    """Per set: the retrained model's own figures and the forget quality (KS) of tamed and base against it."""
    out = {}
    for name, values in nll.items():
        distance = st.threshold_distance(values, fit, delta)
        out[name] = {"n": int(values.size), "mean_nll": float(values.mean()),
                     "mean_bpd": float(nats_to_bpd(values.mean(), num_dims)),
                     "q": float(st.likelihood_quantile(values, fit).mean()),
                     "forgotten_fraction": float(np.mean(distance > -epsilon)),
                     "d": {"min": float(distance.min()), "median": float(np.median(distance)),
                           "max": float(distance.max())},
                     "forget_quality": {"tamed": au.forget_quality(tamed[name], values),
                                        "base": au.forget_quality(base[name], values)}}
    return out


def nearest_training_distances(base: Checkpoint, queries: Mapping[str, torch.Tensor], sets: AuditSets, *,
                               device: str = "auto", batch_size: int = 256) -> dict[str, au.NearestDistances]:
    """For each query set (uint8 pixels [M, C, H, W]): the distance of every image to its nearest forget and its
    nearest remember image (remember images with a forget image's pixels left out), in the base model's
    latent space (:data:`GENERATION_METRIC`, float64, :func:`nearest_distance`). The remember set is streamed
    once; queries stay in memory ([M, D] float64)."""
    dev = resolve_device(device)
    model_was_on = next(base.model.parameters()).device
    base.model.to(dev)
    try:
        forget_pixels, forget_keys = [], set()
        for image_set in sets.forget:
            pixels, keys = image_set.load_tensor()
            forget_pixels.append(pixels)
            forget_keys.update(keys)
        forget = _latent_rows(base, torch.cat(forget_pixels), dev, batch_size)
        names = list(queries)
        query = torch.cat([_latent_rows(base, queries[n], dev, batch_size) for n in names])
        to_forget = nearest_distance(query, forget)
        to_remember = torch.full_like(to_forget, float("inf"))
        for batch in sets.remember.iter_batches(batch_size):
            keep = [i for i, key in enumerate(batch.keys) if key not in forget_keys]
            if keep:
                latents = _latent_rows(base, batch.pixels[keep], dev, batch_size)
                to_remember = torch.minimum(to_remember, nearest_distance(query, latents))
    finally:
        base.model.to(model_was_on)
    out, start = {}, 0
    for name in names:
        stop = start + queries[name].shape[0]
        out[name] = au.NearestDistances(forget=to_forget[start:stop].numpy(),
                                        remember=to_remember[start:stop].numpy())
        start = stop
    return out


def generation_audit(base: Checkpoint, samples: Mapping[str, np.ndarray], sets: AuditSets, *,
                     radius_quantile: float = au.DEFAULT_RADIUS_QUANTILE, device: str = "auto",
                     batch_size: int = 256) -> dict[str, Any]:
    """The generation audit of uint8 samples [M, C, H, W] per model (drawn from the same latents): see
    :func:`flowtame.likelihood.audits.generation_share`; the radius is the ``radius_quantile`` of the held-out
    images' distance to their nearest training image."""
    holdout = torch.cat([s.load_tensor()[0] for s in sets.holdout])
    queries = {"holdout": holdout, **{m: torch.from_numpy(np.asarray(p)) for m, p in samples.items()}}
    distances = nearest_training_distances(base, queries, sets, device=device, batch_size=batch_size)
    radius = au.generation_radius(distances.pop("holdout"), radius_quantile)
    return {"metric": GENERATION_METRIC, "radius_quantile": float(radius_quantile),
            "holdout_n": int(holdout.shape[0]), **au.generation_share(distances, radius)}


def _membership_nll(models: Mapping[str, Checkpoint], sets: AuditSets, known: Mapping[tuple[str, str], np.ndarray],
                    **passes) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Single-draw NLL of the pooled forget and pooled held-out images under every model (``known`` holds the
    pooled arrays already computed, keyed ``(model, "forget@1" | "holdout")``)."""
    forget: dict[str, np.ndarray] = {}
    holdout: dict[str, np.ndarray] = {}
    for name, ckpt in models.items():
        value = known.get((name, "forget@1"))
        forget[name] = value if value is not None else _pooled_nll(ckpt, sets.forget, draws=1, **passes)[0]
        value = known.get((name, "holdout"))
        holdout[name] = value if value is not None else _pooled_nll(ckpt, sets.holdout, draws=1, **passes)[0]
    return forget, holdout


def add_audits(block: dict[str, Any], base: Checkpoint, tamed: Checkpoint, sets: AuditSets, *,
               retrained: Checkpoint | None = None, samples: Mapping[str, np.ndarray] | None = None,
               sampling: Mapping[str, Any] | None = None, known: Mapping[tuple[str, str], np.ndarray] | None = None,
               n_boot: int = 1000, radius_quantile: float = au.DEFAULT_RADIUS_QUANTILE,
               tolerances: AuditTolerances | None = None, device: str = "auto", batch_size: int = 256,
               precision: str = "fp32", membership_nll: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add ``audits`` to an evaluation ``block`` (in place; also returned) and its checks to ``block["checks"]``.

    ``sets.holdout`` is required (the non-members). ``known``: NLL already computed, keyed ``(model, name)``
    with model base|tamed|retrained and name ``forget@1`` (pooled forget, one draw), ``holdout`` (pooled
    held-out, one draw), ``forget``/``forget_unseen`` (``block["forget_draws"]`` draws) or ``remember`` (after
    excluding forget images). ``samples``: model name -> uint8 samples [M, C, H, W] from shared latents, for the
    generation audit (``sampling`` records how they were drawn). Costs: a likelihood pass per model and set
    not known; with ``retrained``, its passes over the remember, forget and held-out sets; with ``samples``,
    one base-model encoding of every sample, the forget, held-out and remember images. ``membership_nll``: a
    dict filled with the membership audit's NLL, ``{"forget": {model: [N_F]}, "holdout": {model: [N_H]}}``.
    """
    if not sets.holdout:
        raise InputError("the membership audit needs held-out images (--holdout): the forget images are "
                         "compared with images the model never saw")
    known = dict(known or {})
    seed, draws = block["seed"], block["forget_draws"]
    passes = dict(seed=seed, device=device, batch_size=batch_size, precision=precision)
    models = {"base": base, "tamed": tamed, **({"retrained": retrained} if retrained is not None else {})}
    if draws == 1:
        known.update({(m, "forget@1"): known[(m, "forget")] for m in models if (m, "forget") in known})
    forget, holdout = _membership_nll(models, sets, known, **passes)
    if membership_nll is not None:
        membership_nll.update(forget=forget, holdout=holdout)
    membership = au.membership_audit(forget, holdout, n_boot=n_boot, seed=seed)
    membership["nonmembers"] = [s.name for s in sets.holdout]
    audits: dict[str, Any] = {"membership": membership, "retrained": None, "generation": None}
    if retrained is not None:
        audits["retrained"] = _retrained_audit(block, retrained, sets, known, holdout, passes)
    if samples:
        audits["generation"] = {**dict(sampling or {}), **generation_audit(
            base, samples, sets, radius_quantile=radius_quantile, device=device, batch_size=batch_size)}
    loss = membership["attacks"]["loss"]
    audits["goals"] = au.goals_block(block["sets"]["forget"]["forgotten_fraction"], loss["tamed"],
                                     loss["retrained"]["auc"] if "retrained" in loss else None)
    tol = tolerances or AuditTolerances()
    audits["tolerances"] = tol.to_dict()
    block["audits"] = audits
    block["checks"] = list(block["checks"]) + audit_checks(audits, tol)
    block["passed"] = all(check["passed"] for check in block["checks"])
    return block


def _retrained_audit(block: dict[str, Any], retrained: Checkpoint, sets: AuditSets,
                     known: Mapping[tuple[str, str], np.ndarray], holdout: Mapping[str, np.ndarray],
                     passes: dict[str, Any]) -> dict[str, Any]:
    """The retrained model's figures per set (its own μ_R, σ_R), and TOFU's forget quality of tamed and base."""
    draws, forget_keys = block["forget_draws"], set()
    nll: dict[str, np.ndarray] = {}
    forget_nll = known.get(("retrained", "forget"))
    if forget_nll is None:
        forget_nll, keys = _pooled_nll(retrained, sets.forget, draws=draws, **passes)
        forget_keys.update(keys)
    else:
        forget_keys.update(k for s in sets.forget for k in s.keys)
    nll["forget"] = forget_nll
    if sets.forget_unseen is not None:
        unseen = known.get(("retrained", "forget_unseen"))
        nll["forget_unseen"] = (unseen if unseen is not None
                                else _pooled_nll(retrained, [sets.forget_unseen], draws=draws, **passes)[0])
    nll["holdout"] = holdout["retrained"]
    remember = known.get(("retrained", "remember"))
    if remember is None:
        values, keys = _pooled_nll(retrained, [sets.remember], draws=1, **passes)
        remember = values[[k not in forget_keys for k in keys]]
    fit = st.fit_normal(remember)
    threshold = block["threshold"]
    others = {m: {name: _evaluated(block, m, name, known, holdout) for name in nll} for m in ("base", "tamed")}
    figures = _retrained_sets(nll, others["tamed"], others["base"], fit, threshold["delta"], threshold["epsilon"],
                              block["num_dims"])
    return {"model": {"path": str(retrained.path) if retrained.path else None, "sha256": retrained.sha256},
            "remember": {"mu_nats": fit.mean, "sigma_nats": fit.std, "n": int(remember.size)},
            "sets": figures, "forget_quality": figures["forget"]["forget_quality"]["tamed"]["pvalue"]}


def _evaluated(block: dict[str, Any], model: str, name: str, known: Mapping[tuple[str, str], np.ndarray],
               holdout: Mapping[str, np.ndarray]) -> np.ndarray:
    """The base or tamed model's NLL of a set, as the evaluation computed it (passed in ``known``)."""
    if name == "holdout":
        return holdout[model]
    values = known.get((model, name))
    if values is None:
        raise ValueError(f"add_audits needs the {model} model's NLL of {name!r} in known= for the retrained audit")
    return values


def audit_checks(audits: Mapping[str, Any], tol: AuditTolerances) -> list[dict[str, Any]]:
    """The opt-in checks: ``membership.auc_gap``, ``membership.privacy_leakage``, ``retrained.forget_quality``,
    ``generation.share``; a check whose figure is missing (no retrained model, no samples) fails."""
    checks = []
    loss = audits["membership"]["attacks"]["loss"]
    if tol.max_membership_auc_gap is not None:
        checks.append(_check("membership.auc_gap", abs(loss["tamed"]["auc"] - 0.5), tol.max_membership_auc_gap,
                             "<="))
    if tol.max_privacy_leakage is not None:
        leakage = audits["membership"]["relative_leakage"]
        value = None if leakage is None else abs(leakage["loss"]["tamed"])
        checks.append(_check("membership.privacy_leakage", value, tol.max_privacy_leakage, "<="))
    if tol.min_forget_quality is not None:
        value = None if audits["retrained"] is None else audits["retrained"]["forget_quality"]
        checks.append(_check("retrained.forget_quality", value, tol.min_forget_quality, ">="))
    if tol.max_generation_share is not None:
        value = None if audits["generation"] is None else audits["generation"]["models"]["tamed"]["share"]
        checks.append(_check("generation.share", value, tol.max_generation_share, "<="))
    return checks
