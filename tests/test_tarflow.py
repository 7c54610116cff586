"""TarFlow: the apple/ml-tarflow fixture converted and checked against that code's numbers, causal masking,
class conditioning, the file-name convention, bad input, and taming a tiny TarFlow through the library.

tests/fixtures/tarflow/ holds a checkpoint written by apple/ml-tarflow with the NLLs its evaluate_bpd.py computed
and the images its reverse() decoded (see the README there). Layer round trips and log-determinants against the
autograd Jacobian are in tests/test_models.py with the other layers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_assertions import assert_one_line_error
from PIL import Image

from flowtame.data.quantization import DataSpec, discrete_nll
from flowtame.flows import build_model, make_spec
from flowtame.flows.tarflow import TarFlowBlock, set_class_label
from flowtame.io.checkpoint import Checkpoint, load_checkpoint, make_provenance, save_checkpoint
from flowtame.io.convert_tarflow import convert_tarflow, parse_file_name

FIXTURE = Path(__file__).parent / "fixtures" / "tarflow" / "tarflow-rgb16-p4"
FLAGS = ("--patch-size", "4", "--width", "64", "--n-block", "4", "--layers-per-block", "2")
REL_TOL = 1e-4
DECODE_TOL = 1e-3


def convert_args(source: Path, output: Path, *extra: str) -> list[str]:
    return ["convert", str(source), "-o", str(output), "--from", "tarflow", *extra]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("tarflow") / "tarflow.safetensors"
    save_checkpoint(output, convert_tarflow(FIXTURE / "model.pth", patch_size=4, width=64, n_block=4,
                                            layers_per_block=2))
    return output


# --- agreement with apple/ml-tarflow ----------------------------------------------------------------------


def test_cli_converts_the_fixture_with_flags(run_cli, tmp_path):
    output = tmp_path / "base.safetensors"
    result = run_cli(*convert_args(FIXTURE / "model.pth", output, *FLAGS))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"wrote {output}: tarflow 3x16x16 (4 blocks x 2 layers, patch 4, width 64, "
                                    f"1 head, 8 bits)")
    ckpt = load_checkpoint(output)
    config = json.loads((FIXTURE / "config.json").read_text())
    spec = ckpt.spec
    assert ckpt.architecture == "tarflow" and ckpt.provenance["source_format"] == "tarflow"
    assert (spec.channels, spec.image_size, spec.patch_size, spec.width, spec.n_block, spec.layers_per_block,
            spec.nvp, spec.num_classes, spec.expansion, spec.width // spec.heads) == (
        config["in_channels"], config["img_size"], config["patch_size"], config["channels"], config["num_blocks"],
        config["layers_per_block"], config["nvp"], config["num_classes"], config["expansion"], config["head_dim"])
    assert ckpt.model.latent_shapes == ((16, 48),)


def test_per_image_nll_matches_the_reference(converted):
    """flowtame's scale is half of TarFlow's: the data scaling's D·log 2 makes the NLLs the same numbers."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    ckpt = load_checkpoint(converted)
    x = torch.from_numpy(np.load(FIXTURE / "inputs.npy")) / 2  # [-1, 1) -> flowtame's [-0.5, 0.5)
    with torch.no_grad():
        nll = discrete_nll(ckpt.model.log_prob(x).double(), ckpt.data_spec.num_dims, ckpt.data_spec.n_bits).numpy()
    reference = np.array(expected["nll_nats_discrete"])
    assert np.max(np.abs(nll - reference) / reference) < REL_TOL
    per_dim = np.array(expected["nll_nats_per_dim"]) * ckpt.data_spec.num_dims
    assert np.max(np.abs(nll - per_dim) / per_dim) < REL_TOL


def test_decoding_through_the_cached_inverse_matches_reverse(converted):
    model = load_checkpoint(converted).model
    z = torch.from_numpy(np.load(FIXTURE / "z.npy"))
    with torch.no_grad():
        decoded = model.decode([z]) * 2  # back to TarFlow's [-1, 1]
    assert np.abs(decoded.numpy() - np.load(FIXTURE / "decoded.npy")).max() < DECODE_TOL


def test_per_sample_log_determinants_are_per_sample(converted):
    model = load_checkpoint(converted).model
    x = torch.from_numpy(np.load(FIXTURE / "inputs.npy")) / 2
    with torch.no_grad():
        _, together = model.encode(x)
        alone = torch.cat([model.encode(x[i:i + 1])[1] for i in range(len(x))])
    assert together.shape == (6,) and len(set(together.tolist())) == 6
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-3)


def test_hyperparameters_from_the_file_name(run_cli, tmp_path):
    source = tmp_path / "cifar10_model_4_64_4_2_0.05.pth"
    shutil.copy(FIXTURE / "model.pth", source)
    assert parse_file_name(source).noise_std == 0.05
    output = tmp_path / "named.safetensors"
    result = run_cli(*convert_args(source, output))
    assert result.exit_code == 0, result.stderr
    ckpt = load_checkpoint(output)
    assert ckpt.provenance["tarflow_file_name"] == {"dataset": "cifar10", "noise_std": 0.05}
    x = torch.from_numpy(np.load(FIXTURE / "inputs.npy")) / 2
    reference = convert_tarflow(FIXTURE / "model.pth", patch_size=4, width=64, n_block=4, layers_per_block=2)
    with torch.no_grad():
        assert torch.equal(ckpt.model.log_prob(x), reference.model.log_prob(x))


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, extra, fragments", [
    ("model.pth", (), ("file name does not follow", "--patch-size, --width, --n-block, --layers-per-block")),
    ("afhq_model_4_128_4_2_0.07.pth", (), ("width 128 (from the file name) disagrees", "64 width")),
    ("afhq_model_4_64_8_2_0.07.pth", (), ("n block 8 (from the file name)", "4 blocks")),
    ("afhq_model_8_64_4_2_0.07.pth", (), ("patch size 8", "from the file name")),
    ("model.pth", ("--patch-size", "4", "--width", "64", "--n-block", "4", "--layers-per-block", "3"),
     ("layers per block 3 (from --layers-per-block)", "2 attention layers per block")),
    ("model.pth", (*FLAGS, "--image-size", "32"), ("--image-size 32 disagrees", "3x16x16")),
    ("model.pth", (*FLAGS, "--hidden", "32"), ("--hidden does not apply to --from tarflow",)),
    ("model.pth", (*FLAGS, "--class", "0"), ("class_label 0 is not a class of this model",)),
])
def test_bad_hyperparameters(run_cli, tmp_path, name, extra, fragments):
    source = tmp_path / name
    shutil.copy(FIXTURE / "model.pth", source)
    output = tmp_path / "out.safetensors"
    assert_one_line_error(run_cli(*convert_args(source, output, *extra)), *fragments)
    assert not output.exists()


@pytest.mark.parametrize("source, fragments", [
    (Path(__file__).parent / "fixtures" / "y0ast-glow" / "glow-affine-lu-rgb16" / "model.pt",
     ("y0ast/Glow-PyTorch state dict", "--from y0ast-glow")),
    (Path(__file__).parent / "fixtures" / "rosinality-glow" / "glow-affine-lu-gray16" / "model.pt",
     ("rosinality/glow-pytorch", "--from rosinality-glow")),
])
def test_a_glow_state_dict_given_as_tarflow(run_cli, tmp_path, source, fragments):
    assert_one_line_error(run_cli(*convert_args(source, tmp_path / "o.safetensors", *FLAGS)), *fragments)


def test_the_tarflow_state_dict_given_as_a_rosinality_glow(run_cli, tmp_path):
    result = run_cli("convert", str(FIXTURE / "model.pth"), "-o", str(tmp_path / "o.safetensors"), "--from",
                     "rosinality-glow", "--image-size", "16", "--n-bits", "8")
    assert_one_line_error(result, "TarFlow state dict", "--from tarflow")


def test_a_non_causal_attention_mask_is_refused(tmp_path):
    state = torch.load(FIXTURE / "model.pth", weights_only=True)
    state["blocks.1.attn_mask"] = torch.ones_like(state["blocks.1.attn_mask"])
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(Exception, match="'blocks.1.attn_mask' is not the causal lower-triangular mask"):
        convert_tarflow(tmp_path / "model.pth", patch_size=4, width=64, n_block=4, layers_per_block=2)


# --- causal masking, conditioning, the prior ----------------------------------------------------------------


def perturbed_block(flip: bool, num_classes: int = 0) -> TarFlowBlock:
    block = TarFlowBlock(6, 16, 5, 2, 2, 2, flip=flip, num_classes=num_classes).double().eval()
    with torch.no_grad():
        for param in block.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return block


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("t", [0, 2, 4])
def test_changing_patch_t_changes_no_output_before_t(flip, t):
    """In the block's order (patches 0..T-1, or T-1..0 when flipped), output s depends on patches <= s only."""
    block = perturbed_block(flip)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    changed = x.clone()
    changed[:, t] += torch.randn(2, 6, dtype=torch.float64)
    with torch.no_grad():
        before, after = block(x)[0], block(changed)[0]
    order = list(range(4, -1, -1)) if flip else list(range(5))
    position = order.index(t)
    for s in order[:position]:
        assert torch.equal(before[:, s], after[:, s]), f"output {s} changed with patch {t}"
    for s in order[position:]:
        assert not torch.equal(before[:, s], after[:, s]), f"output {s} did not change with patch {t}"


def test_unconditional_evaluation_uses_the_mean_class_embedding():
    block = perturbed_block(flip=False, num_classes=3)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        per_class = [block.class_embed[label].clone() for label in range(3)]
        outputs = []
        for label in (0, 1, 2):
            block.class_label = label
            outputs.append(block(x))
        block.class_label = None
        unconditional = block(x)
        block.class_embed.copy_(torch.stack(per_class).mean(0, keepdim=True).expand(3, -1, -1))
        block.class_label = 1
        mean_as_class = block(x)
    assert not torch.allclose(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(unconditional, mean_as_class, rtol=1e-12, atol=1e-12)


def ml_tarflow_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict apple/ml-tarflow would hold for a flowtame TarFlow (its key names, its masks)."""
    state = {}
    for key, value in model.state_dict().items():
        if key == "levels.0.prior.var":
            state["var"] = value.clone()
            continue
        step, name = key.removeprefix("levels.0.steps.").split(".", 1)
        state[f"blocks.{int(step) - 2}.{name}"] = value.clone()
        if name == "proj_in.weight":
            num_patches = model.latent_shapes[0][0]
            state[f"blocks.{int(step) - 2}.attn_mask"] = torch.ones(num_patches, num_patches).tril()
    return state


def test_class_conditional_checkpoint_converts_for_a_given_class(run_cli, tmp_path):
    spec = make_spec("tarflow", dict(channels=1, image_size=8, patch_size=2, width=16, n_block=2,
                                     layers_per_block=1, heads=2, num_classes=4))
    model = build_model("tarflow", spec)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    source = tmp_path / "mnist_model_2_16_2_1_0.1.pth"
    torch.save(ml_tarflow_state(model), source)
    x = torch.rand(3, 1, 8, 8) - 0.5
    for extra, label in (((), None), (("--class", "3"), 3)):
        output = tmp_path / f"class-{label}.safetensors"
        result = run_cli(*convert_args(source, output, "--heads", "2", *extra))
        assert result.exit_code == 0, result.stderr
        assert ("4 classes, evaluated " + ("unconditionally" if label is None else "for class 3")) in result.stdout
        converted = load_checkpoint(output)
        assert converted.spec.class_label == label
        set_class_label(model, label)
        with torch.no_grad():
            torch.testing.assert_close(converted.model.log_prob(x), model.log_prob(x), rtol=0, atol=1e-4)


def test_a_prior_variance_other_than_one_is_the_prior():
    """``var`` (ml-tarflow's reverse() multiplies z by sqrt(var)): decoding and the density agree."""
    model = build_model("tarflow", make_spec("tarflow", dict(channels=1, image_size=4, patch_size=2, width=8,
                                                             n_block=2, layers_per_block=1, heads=2))).double()
    with torch.no_grad():
        model.levels[0].prior.var.uniform_(0.5, 2.0)
        noise = model.sample_noise(3)
        noise = [n.double() for n in noise]
        x = model.decode_noise(noise)
        latents, log_det = model.encode(x)
        var = model.levels[0].prior.var
        torch.testing.assert_close(latents[0], noise[0] * var.sqrt())
        expected = (-0.5 * np.log(2 * np.pi) - 0.5 * torch.log(var) - 0.5 * noise[0].square()).flatten(1).sum(1)
        torch.testing.assert_close(model.log_prob(x), expected + log_det, rtol=1e-10, atol=1e-8)


# --- everything else works on a TarFlow unchanged -----------------------------------------------------------


@pytest.mark.filterwarnings("error::UserWarning")
def test_taming_a_tiny_tarflow_through_the_library(tmp_path):
    """Train a tiny TarFlow on 8x8 digits for a few steps, then tame it for a few iterations with Adam's step and
    with the solved step (the default): the engine, the statistics and the report know no architecture. The
    curvature metric runs on it (its linear layers take the diagonal Fisher) without a warning for the user
    (torch's note on attention's unbatched vmap)."""
    from flowtame.data.images import open_images
    from flowtame.jobs.tame import make_config, tame
    from flowtame.jobs.train import train_model

    data_spec = DataSpec(image_size=8, channels=1, n_bits=4)
    spec = make_spec("tarflow", dict(channels=1, image_size=8, patch_size=2, width=16, n_block=2,
                                     layers_per_block=1, heads=2, expansion=2))
    train = open_images("embedded:digits:train", data_spec)
    pixels, _ = train.load_tensor()
    trained = train_model(pixels[:256], "tarflow", spec, data_spec, steps=30, batch_size=32, lr=3e-3,
                          warmup_steps=5, seed=0).checkpoint
    base_path = tmp_path / "base.safetensors"
    save_checkpoint(base_path, Checkpoint(trained.model, "tarflow", spec, data_spec, make_provenance(notes="t")))
    base = load_checkpoint(base_path)
    for i in range(2):
        Image.fromarray(pixels[300 + i, 0].numpy()).save(tmp_path / f"forget-{i}.png")
    forget = open_images(tmp_path / "forget-0.png", data_spec), open_images(tmp_path / "forget-1.png", data_spec)
    remember = open_images("embedded:digits:test", data_spec)
    config = make_config({"max_iters": 10, "lr": 2e-3, "refresh_size": 64, "batch_size": 16, "warmup": 2,
                          "seed": 0, "step": "adam"})
    outcome = tame(base, list(forget), remember, config, device="cpu")
    assert outcome.report["iterations"] == 10 and outcome.report["frozen"]["tensors"] == 2 * 2  # proj_out
    assert outcome.report["config"]["precondition"] == "kfac"
    before, after = outcome.nll[("base", "forget")], outcome.nll[("tamed", "forget")]
    assert outcome.checkpoint.architecture == "tarflow"
    assert np.mean(after) > np.mean(before), "taming should raise the forget set's NLL"
    solved = tame(base, list(forget), remember, make_config({"max_iters": 3, "refresh_size": 64, "seed": 0}),
                  device="cpu")
    assert solved.report["config"]["step"] == "solve" and solved.report["iterations"] >= 1
    assert np.mean(solved.nll[("tamed", "forget")]) > np.mean(before), "the solved step should raise it too"
    tamed_path = tmp_path / "tamed.safetensors"
    save_checkpoint(tamed_path, outcome.checkpoint)
    assert load_checkpoint(tamed_path).spec == spec


def test_train_cli_trains_a_tarflow(run_cli, tmp_path):
    output = tmp_path / "tarflow.safetensors"
    result = run_cli("train", "embedded:digits:train", "-o", str(output), "--arch", "tarflow", "--image-size", "8",
                     "--channels", "1", "--n-bits", "4", "--patch-size", "2", "--width", "16", "--n-block", "2",
                     "--layers-per-block", "1", "--heads", "2", "--steps", "3", "--batch-size", "16", "--quiet")
    assert result.exit_code == 0, result.stderr
    ckpt = load_checkpoint(output)
    assert ckpt.architecture == "tarflow" and ckpt.spec.to_dict() == {
        "channels": 1, "image_size": 8, "patch_size": 2, "width": 16, "n_block": 2, "layers_per_block": 1,
        "heads": 2, "expansion": 4, "nvp": True, "num_classes": 0, "class_label": None}
    refused = run_cli("train", "embedded:digits:train", "-o", str(tmp_path / "x.safetensors"), "--arch", "tarflow",
                      "--image-size", "8", "--channels", "1", "--hidden", "8")
    assert_one_line_error(refused, "hidden does not apply to architecture tarflow", "--patch-size")
    bad = run_cli("train", "embedded:digits:train", "-o", str(tmp_path / "y.safetensors"), "--arch", "tarflow",
                  "--image-size", "8", "--channels", "1", "--patch-size", "3")
    assert_one_line_error(bad, "image_size 8 must be a multiple of patch_size 3")
