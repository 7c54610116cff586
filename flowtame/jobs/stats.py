"""The stats job as a library call: the per-image likelihood distribution of a model on image sources.

:func:`likelihood_stats` builds the report ``flowtame stats --json`` writes and the demo's ``stats.json`` is
(one shape, :data:`REPORT_SCHEMA_VERSION`): the model, the data spec, the noise seed, and per source the
:func:`~flowtame.likelihood.statistics.summarize_nll` block (nats and BPD) with its skipped files and throughput.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from flowtame.data.images import open_images
from flowtame.errors import InputError
from flowtame.io.checkpoint import Checkpoint
from flowtame.likelihood.nll import NLLResult, compute_nll
from flowtame.likelihood.statistics import summarize_nll

REPORT_SCHEMA_VERSION = 1

#: ``progress(source_name, files_done, files_total)``, called after each batch of each source.
SourceProgress = Callable[[str, int, int], None]


@dataclass
class StatsResult:
    """The stats report (JSON-ready) and the per-source :class:`~flowtame.likelihood.nll.NLLResult` behind it,
    in source order."""

    report: dict[str, Any]
    results: list[NLLResult]


def likelihood_stats(checkpoint: Checkpoint, model_name: str, sources: Sequence[str], *, seed: int = 0,
                     batch_size: int = 256, device: str = "auto", precision: str = "fp32", strict: bool = False,
                     per_image_csv: TextIO | None = None, progress: SourceProgress | None = None) -> StatsResult:
    """Per-image NLL of ``checkpoint``'s model on each image source, summarized (the stats report).

    ``model_name``: how the report names the model (the argument the user gave). ``sources``: image sources
    (:func:`~flowtame.data.images.open_images`), opened with ``strict``. ``per_image_csv``: an open stream that
    receives one row per image (:func:`~flowtame.likelihood.nll.per_image_csv_file`). Raises InputError for a
    model without an image data spec and for a non-finite NLL.
    """
    spec = checkpoint.data_spec
    if spec is None:
        raise InputError(f"{model_name}: a {checkpoint.architecture} model has no image data spec; stats needs an "
                         "image model")
    image_sets = [open_images(source, spec, strict=strict) for source in sources]
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "command": "stats",
        "model": {"name": model_name, "path": str(checkpoint.path), "sha256": checkpoint.sha256,
                  "architecture": checkpoint.architecture},
        "data": spec.to_dict(),
        "num_dims": spec.num_dims,
        "seed": seed,
        "precision": precision,
        "sources": [],
    }
    results = []
    for image_set in image_sets:
        def report_progress(done: int, total: int, name: str = image_set.name) -> None:
            if progress is not None:
                progress(name, done, total)

        result = compute_nll(checkpoint.model, image_set, seed=seed, batch_size=batch_size, device=device,
                             precision=precision, progress=report_progress, per_image_csv=per_image_csv)
        bad = ~np.isfinite(result.nll)
        if bad.any():
            raise InputError(f"{model_name}: non-finite NLL for {int(bad.sum())} image(s) of {image_set.name} "
                             f"(first: {result.paths[int(np.argmax(bad))]})")
        results.append(result)
        report["sources"].append({
            "name": image_set.name,
            **summarize_nll(result.nll, result.num_dims),
            "skipped": len(result.skipped),
            "skipped_files": [{"path": path, "reason": reason} for path, reason in result.skipped],
            "images_per_second": result.images_per_second,
        })
    return StatsResult(report=report, results=results)
