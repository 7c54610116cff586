"""Base-model training: learning, warm-up, clipping, determinism, resume, Ctrl-C, divergence, the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from flowtame.data.quantization import DataSpec
from flowtame.errors import CheckpointError, InputError, InterruptedRun, OutputWriteError, TrainingDivergedError
from flowtame.flows import MultiScaleFlow, make_spec
from flowtame.io.checkpoint import load_checkpoint
from flowtame.jobs.train import resume_state_path, train_model

DATA_SPEC = DataSpec(image_size=8, channels=1, n_bits=5)
SPEC = make_spec("glow", {"channels": 1, "image_size": 8, "n_flow": 2, "n_block": 2, "hidden": 16})


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads make them many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def synthetic_images(n: int = 48, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 1, 8, 8]: a bright horizontal or vertical bar at a random place on a dark noisy background."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(n, 1, 8, 8))
    for i in range(n):
        pos = rng.integers(1, 7)
        if i % 2:
            images[i, 0, :, pos - 1:pos + 1] = 220
        else:
            images[i, 0, pos - 1:pos + 1, :] = 220
    return torch.from_numpy(images.astype(np.uint8))


def train(images=None, **kwargs):
    settings = {"steps": 8, "batch_size": 8, "lr": 2e-3, "warmup_steps": 4, "grad_clip": 50.0, "seed": 0}
    settings.update(kwargs)
    return train_model(synthetic_images() if images is None else images, "glow", SPEC, DATA_SPEC, **settings)


def weights(result):
    return {k: v.clone() for k, v in result.checkpoint.model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_loss_decreases_on_a_tiny_model():
    losses = []
    result = train(steps=40, callback=lambda p: losses.append(p.loss_bpd))
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < losses[0] - 0.5
    assert result.train_bpd == pytest.approx(np.mean(losses))  # the window covers all 40 steps
    assert result.history[0]["step"] == 1 and result.history[-1]["step"] == 40
    assert not result.checkpoint.model.training


def test_actnorm_is_initialized_from_the_first_batch():
    model = train(steps=1).checkpoint.model
    actnorms = [m for m in model.modules() if type(m).__name__ == "ActNorm"]
    assert actnorms and all(m.initialized.item() == 1.0 for m in actnorms)


def test_warmup_is_linear_then_constant():
    seen = []
    train(steps=7, lr=1e-3, warmup_steps=4, callback=lambda p: seen.append((p.step, p.lr)))
    assert [s for s, _ in seen] == list(range(1, 8))
    assert [lr for _, lr in seen] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3])


def test_decay_is_linear_over_the_last_steps():
    seen = []
    train(steps=8, lr=1e-3, warmup_steps=2, decay_steps=4, callback=lambda p: seen.append(p.lr))
    assert seen == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    with pytest.raises(InputError, match="decay steps"):
        train(steps=8, decay_steps=9)


def test_gradient_norm_is_clipped(monkeypatch):
    applied, logged = [], []
    original_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        applied.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    train(steps=6, grad_clip=0.5, callback=lambda p: logged.append(p.grad_norm))
    assert len(applied) == 6
    assert max(logged) > 0.5  # the raw gradients were larger than the bound ...
    assert max(applied) <= 0.5 * (1 + 1e-5)  # ... and the optimizer only ever saw clipped ones


def test_same_seed_gives_bit_identical_weights_and_other_seed_does_not():
    first, second = train(), train()
    assert_same_weights(weights(first), weights(second))
    assert first.train_bpd == second.train_bpd
    other = weights(train(seed=1))
    assert any(not torch.equal(other[k], v) for k, v in weights(first).items())


def test_training_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(steps=2)
    assert torch.equal(torch.rand(3), expected)


def test_resume_after_finishing_equals_one_straight_run(tmp_path):
    straight = train(steps=12)
    path = tmp_path / "model.safetensors"
    half = train(steps=6, checkpoint_path=path)
    assert path.exists() and resume_state_path(path).exists()
    assert load_checkpoint(path).provenance["training"]["complete"] is True
    resumed = train(steps=12, checkpoint_path=path, resume=True)
    assert resumed.steps == 12 and half.steps == 6
    assert_same_weights(weights(straight), weights(resumed))
    assert resumed.train_bpd == straight.train_bpd
    assert [h["loss_bpd"] for h in resumed.history] == [h["loss_bpd"] for h in straight.history]
    assert_same_weights(weights(straight), load_checkpoint(path).model.state_dict())


def test_ctrl_c_saves_a_resumable_state_and_resume_matches(tmp_path):
    straight = train(steps=10, decay_steps=5)
    path = tmp_path / "model.safetensors"

    def interrupt(progress):
        if progress.step == 4:
            raise KeyboardInterrupt

    with pytest.raises(InterruptedRun, match="resuming") as caught:
        train(steps=10, decay_steps=5, checkpoint_path=path, callback=interrupt)
    assert caught.value.exit_code == 130
    state = resume_state_path(path)
    assert state.exists() and not path.exists()  # state only: no half-trained checkpoint was promised
    with safe_open(str(state), framework="pt") as fh:  # a safetensors file with JSON metadata, not a pickle
        meta = json.loads(fh.metadata()["engine"])
        assert meta["iteration"] == 4 and meta["method"] == "train"
        assert any(key.startswith("optim.") for key in fh.keys())
    resumed = train(steps=10, decay_steps=5, checkpoint_path=path, resume=True)
    assert_same_weights(weights(straight), weights(resumed))
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in straight.history]


def test_periodic_checkpoints_and_sample_grids(tmp_path):
    path = tmp_path / "model.safetensors"
    stamps = []

    def watch(progress):
        if path.exists():
            stamps.append((progress.step, load_checkpoint(path).provenance["training"]["step"]))

    train(steps=6, checkpoint_path=path, checkpoint_every=3, sample_every=3, sample_dir=tmp_path / "grids",
          callback=watch)
    assert stamps[0] == (3, 3)
    provenance = load_checkpoint(path).provenance["training"]
    assert provenance["step"] == 6 and provenance["complete"] and provenance["batch_size"] == 8
    grids = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert grids == ["step-000003.png", "step-000006.png"]
    with Image.open(tmp_path / "grids" / "step-000006.png") as grid:
        assert grid.mode == "L" and grid.size[0] == grid.size[1] > 8 * 8


def test_a_sample_grid_that_cannot_be_written_keeps_a_resumable_state(tmp_path, monkeypatch):
    """A full disk while writing step 4's grid: one OutputWriteError naming the grid, the state after step 4
    saved, and resuming (once the grid can be written) ends with the weights of an uninterrupted run."""
    import flowtame.jobs.train as train_job
    path = tmp_path / "model.safetensors"
    real_write = train_job.write_sample_grid

    def full_disk_at_step_4(checkpoint, grid_path, **kwargs):
        if "step-000004" in str(grid_path):
            raise OutputWriteError(f"{grid_path}: cannot write (no space left on the device)")
        return real_write(checkpoint, grid_path, **kwargs)

    monkeypatch.setattr(train_job, "write_sample_grid", full_disk_at_step_4)
    kept = r"step-000004\.png: cannot write.*the run is kept in .*model\.safetensors\.resume\.safetensors.*resuming"
    with pytest.raises(OutputWriteError, match=kept):
        train(steps=8, checkpoint_path=path, sample_every=2, sample_dir=tmp_path / "grids")
    assert resume_state_path(path).exists() and not path.exists()
    with safe_open(str(resume_state_path(path)), framework="pt") as state:
        assert json.loads(state.metadata()["engine"])["iteration"] == 4  # the state after step 4
    monkeypatch.setattr(train_job, "write_sample_grid", real_write)
    resumed = train(steps=8, checkpoint_path=path, sample_every=2, sample_dir=tmp_path / "grids", resume=True)
    straight = train(steps=8)
    assert resumed.steps == 8
    assert_same_weights(weights(resumed), weights(straight))


def test_resume_refuses_other_settings_and_missing_state(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(checkpoint_path=path, resume=True)
    train(steps=2, checkpoint_path=path)
    with pytest.raises(CheckpointError, match="batch_size"):
        train(steps=4, batch_size=4, checkpoint_path=path, resume=True)
    with pytest.raises(CheckpointError, match="data_sha256"):
        train(synthetic_images(seed=1), steps=4, checkpoint_path=path, resume=True)


def test_nan_loss_is_an_error_and_writes_nothing(tmp_path, monkeypatch):
    log_prob = MultiScaleFlow.log_prob
    monkeypatch.setattr(MultiScaleFlow, "log_prob", lambda self, x: log_prob(self, x) * float("nan"))
    path = tmp_path / "model.safetensors"
    with pytest.raises(TrainingDivergedError, match="step 1 of 8.*NaN"):
        train(checkpoint_path=path, checkpoint_every=1)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="uint8"):
        train(synthetic_images().float())
    with pytest.raises(InputError, match=r"shape \[N, 1, 8, 8\]"):
        train(torch.zeros(4, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(InputError, match="batch size 64 is larger than the 48"):
        train(batch_size=64)
    existing = tmp_path / "model.safetensors"
    existing.write_bytes(b"x")
    with pytest.raises(InputError, match="already exists") as caught:
        train(checkpoint_path=existing)
    assert caught.value.keys == ("force",)  # the CLI adds --force


def write_pngs(folder, n=12):
    folder.mkdir()
    for i, image in enumerate(synthetic_images(n).numpy()):
        Image.fromarray(image[0]).save(folder / f"{i:02d}.png")
    return folder


TINY_FLAGS = ["--arch", "glow", "--image-size", "8", "--channels", "1", "--n-bits", "5", "--n-flow", "2",
              "--n-block", "2", "--hidden", "16", "--steps", "5", "--batch-size", "4", "--warmup", "2"]


def test_cli_train_writes_a_loadable_checkpoint_and_refuses_to_overwrite(tmp_path, run_cli):
    data = write_pngs(tmp_path / "images")
    out = tmp_path / "base.safetensors"
    result = run_cli("train", data, "-o", out, *TINY_FLAGS, "--no-lu", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert "train BPD" in last and "sha256" in last
    ckpt = load_checkpoint(out)
    assert last.endswith(f"(sha256 {ckpt.sha256})")
    assert ckpt.architecture == "glow" and ckpt.spec.hidden == 16 and not any(ckpt.spec.conv_lu)
    assert ckpt.data_spec == DATA_SPEC
    training = ckpt.provenance["training"]
    assert training["steps"] == 5 and training["n_images"] == 12 and training["complete"]
    assert ckpt.provenance["command"].startswith("flowtame train")

    summary = run_cli("train", data, "-o", tmp_path / "again.safetensors", *TINY_FLAGS, "--no-lu", "--device",
                      "cpu", "--json", "-", "--quiet")
    report = json.loads(summary.stdout)  # the library's TrainResult.report
    assert report["sha256"] == load_checkpoint(tmp_path / "again.safetensors").sha256
    assert report["output"] == str(tmp_path / "again.safetensors") and report["n_images"] == 12
    assert report["steps_done"] == 5 and report["architecture"] == "glow" and report["source"] == str(data)
    assert report["hyperparameters"] == ckpt.spec.to_dict() and report["training"]["steps"] == 5

    again = run_cli("train", data, "-o", out, *TINY_FLAGS)
    assert again.exit_code == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert load_checkpoint(out).sha256 == ckpt.sha256


def test_cli_train_rejects_flags_of_another_architecture(tmp_path, run_cli):
    data = write_pngs(tmp_path / "images", n=4)
    result = run_cli("train", data, "-o", tmp_path / "m.safetensors", "--arch", "nice", "--image-size", "8",
                     "--channels", "1", "--n-flow", "4")
    assert result.exit_code == 2 and "n_flow does not apply to architecture nice" in result.stderr
    assert "[--n-flow, --hidden, --n-couplings, --n-hidden-layers]" in result.stderr  # the flags, added by the CLI
