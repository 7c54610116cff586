"""The debias zoo's "why not" column (benchmarks/debias_zoo.py): each way a row can miss its target is said with
the report's own figures."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from debias_zoo import why_not  # noqa: E402


def _row(after: float, converged: bool, **extra) -> dict:
    table = lambda zero: {"groups": {"zero": {"frequency": zero}, "one": {"frequency": 1 - zero}}}  # noqa: E731
    row = {"targets": {"zero": 0.3, "one": 0.7}, "before": table(0.2), "after": table(after), "converged": converged,
           "config": {"max_iters": 400, "tolerance": 0.02}, "holdout_bpd_change": 0.004, "verdict": None,
           "verdict_message": None, "remember_drift": {"bound": 0.008, "final": 0.004, "within_bound": True,
                                                       "stop_refusals": 0},
           "trajectory": [{"iteration": 0, "remember_drift": None},
                          {"iteration": 10, "remember_drift": 0.012, "stop_refused": False}]}
    row.update(extra)
    return row


def test_a_row_at_its_target_with_little_collateral_needs_no_reason():
    assert why_not(_row(0.29, True)) == ""


def test_the_verdict_row_gives_pace_projection_and_drift():
    verdict = {"iteration": 70, "share": 0.219, "rate": 3.57e-4, "rate_se": 4.93e-4, "needed": 1572,
               "budget_left": 330, "points": 6}
    text = why_not(_row(0.229, False, verdict=verdict, verdict_message="cannot reach ...", holdout_bpd_change=0.0187))
    assert text == ("cannot reach: at it. 70 zero 0.219, moving +3.6 ± 4.9 pts/100 it. over 6 measurements, would "
                    "need ~1572 it. (budget left 330), remember drift +1.20%; holdout ΔBPD +1.87% > 1%")
    drifting = dict(verdict, reason="remember drift", remember_drift=0.0137, max_remember_drift=0.008)
    assert ("over 6 measurements, no move beyond its noise while the drift is past its bound and not falling"
            in why_not(_row(0.229, False, verdict=drifting)))
    stalled = dict(verdict, needed=None, rate=-2.8e-4)
    assert "moving -2.8 ± 4.9 pts/100 it. over 6 measurements, not moving toward it" in why_not(
        _row(0.229, False, verdict=stalled))


def test_the_guard_row_gives_the_drift_at_the_refused_stop_and_the_budget_row_the_share():
    trajectory = [{"iteration": 0, "remember_drift": None},
                  {"iteration": 40, "remember_drift": 0.0148, "stop_refused": True},
                  {"iteration": 120, "remember_drift": 0.0142, "stop_refused": True}]
    guard = _row(0.299, False, trajectory=trajectory, verdict_message="cannot reach the target within the bound",
                 remember_drift={"bound": 0.008, "final": 0.0138, "within_bound": False, "stop_refusals": 2})
    assert why_not(guard) == "remember drift +1.42% > bound 0.80% at share 0.299 (2 stops refused)"
    final = _row(0.31, False, remember_drift={"bound": 0.008, "final": 0.009, "within_bound": False,
                                              "stop_refusals": 0})
    assert why_not(final) == "at its target, but final remember drift +0.90% > bound 0.80%"
    assert why_not(_row(0.25, False)) == "budget of 400 it. spent, zero at 0.250, remember drift +1.20%"
