"""The tuning-zoo harness (benchmarks/zoo.py) on a tiny Glow: a scored row, an aborted run as a row, the
reference loop's row, and the table built from them; a stop signal ends the whole run, --resume continues."""

import copy
import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flowtame.data.images import open_images
from flowtame.data.quantization import DataSpec
from flowtame.errors import InterruptedRun, TrainingDivergedError
from flowtame.flows.glow import GlowSpec, build_glow
from flowtame.io.checkpoint import Checkpoint
from flowtame.likelihood.nll import dequantized

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo  # noqa: E402
from protocol import build_protocol  # noqa: E402

DATA_SPEC = DataSpec(image_size=8, channels=1, n_bits=5)
FAST = {"max_iters": 3, "refresh_size": 16}  # (the default step, the solved step: no Adam settings)


@pytest.fixture(scope="module")
def setup():
    """A tiny Glow (ActNorm initialized on digits) and the protocol's sets for k = 1."""
    torch.manual_seed(0)
    spec = GlowSpec(channels=1, image_size=8, n_flow=2, n_block=2, hidden=8)
    model = build_glow(spec)
    pixels, _ = open_images("embedded:digits:test:0", DATA_SPEC).load_tensor()
    model.train()
    with torch.no_grad():
        model.log_prob(dequantized(pixels, torch.rand(pixels.shape), DATA_SPEC.n_bits))
    base = Checkpoint(model=model.eval(), architecture="glow", spec=spec, data_spec=DATA_SPEC)
    return base, build_protocol(base, 3, 1, zoo.NEIGHBOURS)


def test_row_scores_a_written_run(setup, tmp_path):
    base, proto = setup
    row = zoo.tame_row(base, proto, FAST, tmp_path)
    assert "aborted" not in row
    assert 1 <= row["iterations"] <= 3 and row["config"]["max_iters"] == 3
    for name in ("forget", "forget_unseen", "remember", "neighbours", "holdout"):
        assert math.isfinite(row[f"qd_{name}"])
    assert row["evaluate_passed"] == (not row["failed_checks"])
    assert (tmp_path / "tamed.safetensors").exists()
    ref = zoo.reference_row(base, proto, 2)
    assert ref["iterations"] <= 2 and ref["total_seconds"] >= ref["loop_seconds"] > 0
    assert ref["scores"]["iterations"] == ref["iterations"] and ref["scores"]["holdout_bpd_change"] != 0
    line = zoo.table_lines([{"model": "tiny", "k": 1, "tame": row, "reference": ref}])[-1]
    assert line.startswith("| tiny | 1 | ") and f"{row['total_seconds'] / ref['total_seconds']:.2f}" in line
    assert f"holdout {100 * ref['scores']['holdout_bpd_change']:+.2f}%" in line


def test_reference_scores_of_the_untouched_base_are_zero(setup):
    """Scoring the base model as the reference's result: every paired change is exactly zero, nothing forgotten."""
    base, proto = setup
    untouched = SimpleNamespace(converged=False, iterations=0, wall_seconds=0.0)
    scores = zoo.reference_scores(base, proto, copy.deepcopy(base.model), untouched, 0.0)
    assert scores["holdout_bpd_change"] == 0 and scores["remember_bpd"] == scores["remember_bpd_base"]
    assert scores["qd_remember"] == 0 and scores["qd_holdout"] == 0
    assert scores["forgotten"] == 0 and "forget.forgotten_fraction" in scores["failed_checks"]


def test_library_error_becomes_an_aborted_row(setup, tmp_path, monkeypatch):
    base, proto = setup

    def exploding_tame(*args, callback, **kwargs):
        for iteration in (1, 2):
            callback(iteration, {})
        raise TrainingDivergedError("the remember batch's mean BPD jumped to 9.9 (base 1.3) at iteration 2, "
                                    "after 3 learning-rate reductions; try a smaller --lr")

    monkeypatch.setattr(zoo, "tame", exploding_tame)
    row = zoo.tame_row(base, proto, FAST, tmp_path)
    assert row["iterations"] == 2 and row["abort_reason"] == "remember jump"
    line = zoo.table_lines([{"model": "tiny", "k": 1, "tame": row, "reference": None}])[-1]
    assert "aborted at it. 2: remember jump | 2 | " in line and "| 3 |" in line and "not run" in line


def test_the_ratio_is_withheld_when_the_reference_stopped_on_a_model_it_broke():
    tame_row = {"total_seconds": 30.0}
    finished = {"converged": False, "iterations": 800, "total_seconds": 300.0,
                "scores": {"evaluate_passed": False}}
    broke = {"converged": True, "iterations": 14, "total_seconds": 28.0, "scores": {"evaluate_passed": False}}
    stopped_well = {"converged": True, "iterations": 300, "total_seconds": 120.0,
                    "scores": {"evaluate_passed": True}}
    assert zoo.ratio_text(tame_row, None) == "–"
    assert zoo.ratio_text(tame_row, finished) == "0.10"
    assert zoo.ratio_text(tame_row, broke) == "– (reference broke the model by it. 14)"
    assert zoo.ratio_text(tame_row, stopped_well) == "0.25"


def test_a_stop_request_is_no_row(setup, tmp_path, monkeypatch):
    """The engine's clean stop (InterruptedRun) is not a library error: it ends the zoo run, not one cell;
    zoo_trace.py asks for it as a row (a trace stopped by hand keeps what it traced)."""
    base, proto = setup

    def stopped_tame(*args, callback, **kwargs):
        callback(2, {})
        raise InterruptedRun("interrupted by SIGTERM at iteration 2", signal.SIGTERM)

    monkeypatch.setattr(zoo, "tame", stopped_tame)
    with pytest.raises(InterruptedRun):
        zoo.tame_row(base, proto, FAST, tmp_path)
    row = zoo.tame_row(base, proto, FAST, tmp_path, stop_as_row=True)
    assert row["aborted"] == "interrupted by SIGTERM at iteration 2" and row["iterations"] == 2
    assert zoo.interrupted({"tame": row}) and not zoo.interrupted({"tame": {"aborted": "the remember batch jumped"}})


#: zoo.main() with the models, protocols and tame rows stubbed (a row per k, iterations = k); with ``wait`` the
#: cell k = 4 prints "waiting" and sleeps until a signal comes.
ZOO_STUB = """
import sys, time
from types import SimpleNamespace
sys.path.insert(0, {bench!r})
import zoo

def fake_row(base, k, override, workdir, preset=None):
    if k == 4 and {wait!r}:
        print("waiting", flush=True)
        time.sleep(60)
    return {{"converged": True, "iterations": k, "total_seconds": 0.0}}

zoo.build, zoo.describe = (lambda name, cache: name), (lambda name, cache: {{"name": name}})
zoo.load_checkpoint = lambda path: SimpleNamespace(sha256="0")
zoo.build_protocol, zoo.digits_source = (lambda base, digit, k, n, source: k), (lambda name, cache: "")
zoo.tame_row, zoo.print_results = fake_row, (lambda results: print("rows", len(results["rows"])))
sys.argv = ["zoo.py", "--models", "embedded-glow", "--ks", "1", "4", "8", "--skip-reference", "--threads", "1",
            "--json", {json!r}, "--reference-cache", {ref!r}] + {extra!r}
zoo.main()
"""


def _zoo_stub(tmp_path, *, wait: bool, extra=()) -> subprocess.Popen:
    code = ZOO_STUB.format(bench=str(Path(zoo.__file__).parent), wait=wait, json=str(tmp_path / "zoo.json"),
                           ref=str(tmp_path / "ref.json"), extra=list(extra))
    # SIGINT ignored, as in a job a shell starts in the background (nohup ... &): kill -INT must still stop it
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143),
                                              pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_a_signal_stops_the_whole_run_and_resume_continues(tmp_path, signum, code):
    """SIGTERM or Ctrl-C during the second cell: exit 128 + signum with one line, no traceback, the JSON holds
    the first row (valid, no temporary file); --resume keeps it, runs the two other cells, and runs again a
    cell an older version recorded as an interrupted "aborted" row (Ctrl-C: the same path, in the slow tier)."""
    proc = _zoo_stub(tmp_path, wait=True)
    assert proc.stdout.readline().startswith("embedded-glow, k = 1: tame")
    while "waiting" not in proc.stdout.readline():
        pass
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert f"zoo: interrupted by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert "k = 8" not in out  # the run stopped: no next cell
    saved = json.loads((tmp_path / "zoo.json").read_text())
    assert [(r["k"], r["tame"]["iterations"]) for r in saved["rows"]] == [(1, 1)]
    assert list(tmp_path.iterdir()) == [tmp_path / "zoo.json"]
    saved["rows"].append({"model": "embedded-glow", "k": 8, "reference": None,
                          "tame": {"aborted": "interrupted by SIGTERM at iteration 5", "iterations": 5}})
    (tmp_path / "zoo.json").write_text(json.dumps(saved))
    proc = _zoo_stub(tmp_path, wait=False, extra=["--resume"])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "k = 1:" not in out and "k = 4: tame" in out and "k = 8: tame" in out and "rows 3" in out
    resumed = json.loads((tmp_path / "zoo.json").read_text())
    assert [(r["k"], r["tame"]["iterations"]) for r in resumed["rows"]] == [(1, 1), (4, 4), (8, 8)]
