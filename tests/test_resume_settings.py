"""A tame run's resume state records the settings that shape its training; resuming under others is refused with
one line naming each differing key and both values, while the keys that do not shape it (max_iters,
trajectory_every) may change, and a state without the record (an older flowtame's) resumes with a warning."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_baselines import DATA_SPEC, REMEMBER, base, forget_folder  # noqa: F401 (fixtures)

from flowtame.data.images import open_images
from flowtame.engine.loop import settings_differences
from flowtame.errors import CheckpointError, InterruptedRun
from flowtame.io.checkpoint import save_checkpoint
from flowtame.jobs.tame import make_config, tame

#: A short run: the anchor's look-alikes, the calibration and the curvature metric all on (the defaults).
QUICK = {"max_iters": 8, "warmup": 2, "batch_size": 4, "refresh_size": 32, "lookalikes": 4, "step": "adam"}


def _sets(forget_folder):  # noqa: F811
    return [open_images(forget_folder, DATA_SPEC)], open_images(REMEMBER, DATA_SPEC)


def _interrupted(base, forget_folder, state, layer, at=3):  # noqa: F811
    """Run tame under ``layer`` and stop it (SIGINT) after iteration ``at``: its resume state is at ``state``."""
    def stop(iteration, _logged):
        if iteration == at:
            os.kill(os.getpid(), signal.SIGINT)

    forget, remember = _sets(forget_folder)
    with pytest.raises(InterruptedRun):
        tame(base, forget, remember, make_config(QUICK, layer), device="cpu", state_path=state, callback=stop)


def test_a_resume_under_other_settings_is_refused_naming_each_key_and_both_values(base, forget_folder,  # noqa: F811
                                                                                    tmp_path):
    state = tmp_path / "run.resume.safetensors"
    _interrupted(base, forget_folder, state, {"precondition": "none"})  # the old default
    forget, remember = _sets(forget_folder)
    with pytest.raises(CheckpointError) as refused:  # today's default is kfac: refused, not silently mixed
        tame(base, forget, remember, make_config(QUICK, {"alpha": 0.2}), device="cpu", state_path=state,
             resume=True)
    message = str(refused.value)
    assert "alpha: saved 0.15, now 0.2" in message and "precondition: saved 'none', now 'kfac'" in message
    assert refused.value.keys == ("alpha", "precondition") and "\n" not in message
    assert refused.value.exit_code == 2
    # the same settings resume (the record holds the resolved value, whether given or defaulted)
    tame(base, forget, remember, make_config(QUICK, {"precondition": "none"}), device="cpu", state_path=state,
         resume=True)


def test_the_cli_refuses_a_changed_setting_in_one_line(base, forget_folder, tmp_path, run_cli):  # noqa: F811
    model = tmp_path / "base.safetensors"
    save_checkpoint(model, base)
    output = tmp_path / "tamed.safetensors"
    _interrupted(base, forget_folder, tmp_path / "tamed.safetensors.resume.safetensors", {})
    result = run_cli("tame", model, "--forget", forget_folder, "--remember", REMEMBER, "-o", output, "--resume",
                     "--quiet", *[f"--{key.replace('_', '-')}={value}" for key, value in QUICK.items()],
                     "--upper-edge", "1.5")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "upper_edge: saved 2.0, now 1.5" in result.stderr and "[--upper-edge]" in result.stderr
    assert not output.exists()


def test_max_iters_may_change_and_the_run_continues_as_if_it_had_been_given(base, forget_folder,  # noqa: F811
                                                                             tmp_path):
    forget, remember = _sets(forget_folder)
    longer = {"max_iters": 12, "trajectory_every": 3}
    straight = tame(base, forget, remember, make_config(QUICK, longer), device="cpu")
    state = tmp_path / "run.resume.safetensors"
    _interrupted(base, forget_folder, state, {})
    resumed = tame(base, forget, remember, make_config(QUICK, longer), device="cpu", state_path=state,
                   resume=True)
    assert resumed.report["iterations"] == straight.report["iterations"] > QUICK["max_iters"]
    a, b = straight.checkpoint.model.state_dict(), resumed.checkpoint.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_state_without_the_record_resumes_with_a_warning(base, forget_folder, tmp_path):  # noqa: F811
    state = tmp_path / "run.resume.safetensors"
    _interrupted(base, forget_folder, state, {"precondition": "none"})
    with safe_open(str(state), framework="pt") as fh:
        meta = json.loads(fh.metadata()["engine"])
    assert meta["settings"]["precondition"] == "none" and "max_iters" not in meta["settings"]
    del meta["settings"]  # as an older flowtame wrote it
    save_file(load_file(str(state)), str(state), {"engine": json.dumps(meta)})
    forget, remember = _sets(forget_folder)
    with pytest.warns(UserWarning, match="does not record its run's settings"):
        outcome = tame(base, forget, remember, make_config(QUICK), device="cpu", state_path=state, resume=True)
    assert outcome.report["iterations"] > 3


def test_settings_differences_compare_nested_mappings_entry_by_entry():
    saved = {"lr": 1e-3, "seed": 0, "section": {"a": 1, "b": 2}, "gone": True}
    now = {"lr": 1e-3, "seed": 1, "section": {"a": 1, "b": 3}, "new": "x"}
    assert settings_differences(saved, now) == [("gone", True, None), ("new", None, "x"), ("section.b", 2, 3),
                                                ("seed", 0, 1)]
    assert settings_differences(saved, saved) == []
