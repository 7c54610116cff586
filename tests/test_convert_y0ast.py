"""``flowtame convert --from y0ast-glow``: y0ast/Glow-PyTorch checkpoints -> flowtame, checked against that code.

tests/fixtures/y0ast-glow/ holds a checkpoint written by y0ast/Glow-PyTorch itself with the log-densities and
decoded images that code computed (see the README there). The other variants its hyperparameters allow
(additive coupling, plain/reverse/shuffle permutations, no learned top prior) are checked by writing a
perturbed flowtame Glow in that code's layout and key names and converting it back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_assertions import assert_one_line_error

from flowtame.data.quantization import discrete_nll
from flowtame.flows.glow import ActNorm, GlowSpec, build_glow
from flowtame.io.checkpoint import load_checkpoint
from flowtame.io.convert_y0ast import _source_key, convert_y0ast

FIXTURE = Path(__file__).parent / "fixtures" / "y0ast-glow" / "glow-affine-lu-rgb16"
OTHER_FIXTURES = Path(__file__).parent / "fixtures"
REL_TOL = 1e-4
DECODE_TOL = 1e-3


def convert_args(source: Path, output: Path, *extra: str) -> list[str]:
    return ["convert", str(source), "-o", str(output), "--from", "y0ast-glow", *extra]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The fixture converted through the library's save path (the CLI is checked separately)."""
    from flowtame.io.checkpoint import save_checkpoint

    output = tmp_path_factory.mktemp("y0ast") / "y0ast.safetensors"
    save_checkpoint(output, convert_y0ast(FIXTURE / "model.pt", hparams=FIXTURE / "hparams.json"))
    return output


def test_cli_converts_the_fixture_with_its_hparams(run_cli, tmp_path):
    output = tmp_path / "base.safetensors"
    result = run_cli(*convert_args(FIXTURE / "model.pt", output, "--hparams", str(FIXTURE / "hparams.json")))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"wrote {output}: glow 3x16x16 (2 blocks x 3 flows, affine coupling, "
                                    f"1x1 convs LU, hidden 32, 8 bits)")
    spec = load_checkpoint(output).spec
    assert (spec.log_actnorm, spec.net_actnorm, spec.interleaved, spec.zero_pad, spec.top_prior) == (
        True, True, True, True, "buffer")
    assert load_checkpoint(output).provenance["source_format"] == "y0ast-glow"


def test_log_likelihoods_match_the_reference(converted):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    ckpt = load_checkpoint(converted)
    x = torch.from_numpy(np.load(FIXTURE / "inputs.npy"))
    with torch.no_grad():
        log_prob = ckpt.model.log_prob(x).double()
    nll = discrete_nll(log_prob, ckpt.data_spec.num_dims, ckpt.data_spec.n_bits).numpy()
    reference = np.array(expected["nll_nats_discrete"])
    assert ckpt.data_spec.n_bits == expected["n_bits"] == 8
    assert np.max(np.abs(nll - reference) / np.abs(reference)) < REL_TOL
    density = np.array(expected["log_density"])
    assert np.max(np.abs(log_prob.numpy() - density)) < REL_TOL * np.max(np.abs(reference))


def test_decoding_matches_the_reference(converted):
    model = load_checkpoint(converted).model
    eps = torch.from_numpy(np.load(FIXTURE / "eps.npy"))
    noise = [torch.zeros(eps.shape[0], *shape) for shape in model.latent_shapes[:-1]] + [eps * 0.7]
    with torch.no_grad():
        decoded = model.decode_noise(noise).numpy()
    assert np.abs(decoded - np.load(FIXTURE / "decoded.npy")).max() < DECODE_TOL


# --- the other variants, through that code's key names ----------------------------------------------------


def y0ast_state(model: torch.nn.Module, spec: GlowSpec) -> dict[str, torch.Tensor]:
    """The state dict y0ast's code would hold for ``model`` (flowtame Glow in y0ast's layout)."""
    state = {}
    for key, value in model.state_dict().items():
        source = _source_key(key, spec.n_flow, spec.n_block)
        if source is None:
            continue
        if source.endswith("logs") and "actnorm" not in source:
            value = value.reshape(value.shape[1:])
        elif source.endswith("invconv.weight"):
            value = value[:, :, 0, 0]
        state[source] = value.clone()
    if spec.top_prior == "standard":
        state["prior_h"] = torch.zeros(1, spec.channels * 2 ** (spec.n_block + 1),
                                       *model.latent_shapes[-1][1:])
    return state


def perturbed(spec: GlowSpec) -> torch.nn.Module:
    model = build_glow(spec)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        for module in model.modules():
            if isinstance(module, ActNorm):
                module.initialized.fill_(1.0)
    return model.eval()


VARIANTS = {
    "additive-plain-learned-top": dict(affine=False, conv_lu=(False,) * 4, top_prior="buffer"),
    "affine-reverse-standard-top": dict(affine=True, permutation="reverse", top_prior="standard"),
    "additive-shuffle": dict(affine=False, permutation="shuffle", top_prior="buffer"),
    "affine-lu-standard-top": dict(affine=True, top_prior="standard"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_converts_exactly(name, tmp_path):
    spec = GlowSpec(channels=1, image_size=8, n_flow=2, n_block=2, hidden=8, log_actnorm=True, net_actnorm=True,
                    interleaved=True, zero_pad=True, **VARIANTS[name])
    model = perturbed(spec)
    source = tmp_path / "model.pt"
    torch.save(y0ast_state(model, spec), source)
    hparams = {"K": 2, "L": 2, "hidden_channels": 8, "flow_coupling": "affine" if spec.affine else "additive",
               "flow_permutation": spec.permutation, "LU_decomposed": all(spec.conv_lu),
               "learn_top": spec.top_prior == "buffer", "y_condition": False, "lr": 5e-4}
    (tmp_path / "hparams.json").write_text(json.dumps(hparams))
    permutations = None
    if spec.permutation == "shuffle":
        permutations = tmp_path / "permutations.json"
        orders = [step.invconv.order.long().tolist() for level in model.levels for step in level.steps[1:]]
        permutations.write_text(json.dumps(orders))
    ckpt = convert_y0ast(source, hparams=tmp_path / "hparams.json", permutations=permutations)
    assert ckpt.spec == spec
    x = torch.rand(3, 1, 8, 8) - 0.5
    with torch.no_grad():
        assert torch.equal(ckpt.model.log_prob(x), model.log_prob(x))


# --- bad input: one line, exit 2 ---------------------------------------------------------------------------


@pytest.mark.parametrize("edit, fragments", [
    ({"K": 4}, ("K = 4 disagrees", "flow steps per level = 3")),
    ({"hidden_channels": 512}, ("hidden_channels = 512", "= 32")),
    ({"flow_coupling": "additive"}, ("flow_coupling = \"additive\"", "\"affine\"")),
    ({"LU_decomposed": False}, ("LU_decomposed = false",)),
    ({"learn_top": False}, ("learn_top = false",)),
    ({"flow_permutation": "shuffle"}, ("flow_permutation = \"shuffle\"", "\"invconv\"")),
])
def test_hparams_that_disagree_with_the_weights(run_cli, tmp_path, edit, fragments):
    hparams = {**json.loads((FIXTURE / "hparams.json").read_text()), **edit}
    (tmp_path / "hparams.json").write_text(json.dumps(hparams))
    output = tmp_path / "out.safetensors"
    result = run_cli(*convert_args(FIXTURE / "model.pt", output, "--hparams", str(tmp_path / "hparams.json")))
    assert_one_line_error(result, "hparams.json", *fragments)
    assert not output.exists()


@pytest.mark.parametrize("source, fragments", [
    (OTHER_FIXTURES / "tarflow" / "tarflow-rgb16-p4" / "model.pth", ("TarFlow state dict", "--from tarflow")),
    (OTHER_FIXTURES / "rosinality-glow" / "glow-affine-lu-gray16" / "model.pt",
     ("rosinality/glow-pytorch", "--from rosinality-glow")),
])
def test_a_state_dict_of_another_family(run_cli, tmp_path, source, fragments):
    result = run_cli(*convert_args(source, tmp_path / "out.safetensors"))
    assert_one_line_error(result, str(source), *fragments)


@pytest.mark.parametrize("fmt, extra, fragments", [
    ("rosinality-glow", ("--image-size", "16", "--n-bits", "8"), ("y0ast/Glow-PyTorch", "--from y0ast-glow")),
    ("tarflow", ("--patch-size", "4", "--width", "32", "--n-block", "2", "--layers-per-block", "1"),
     ("y0ast/Glow-PyTorch", "--from y0ast-glow")),
])
def test_the_y0ast_state_dict_given_as_another_family(run_cli, tmp_path, fmt, extra, fragments):
    result = run_cli("convert", str(FIXTURE / "model.pt"), "-o", str(tmp_path / "o.safetensors"), "--from", fmt,
                     *extra)
    assert_one_line_error(result, *fragments)


def test_flags_that_disagree_or_do_not_apply(run_cli, tmp_path):
    output = tmp_path / "out.safetensors"
    assert_one_line_error(run_cli(*convert_args(FIXTURE / "model.pt", output, "--image-size", "32")),
                          "--image-size 32 disagrees", "3x16x16")
    assert_one_line_error(run_cli(*convert_args(FIXTURE / "model.pt", output, "--n-flow", "3")),
                          "--n-flow does not apply to --from y0ast-glow")
    assert_one_line_error(run_cli(*convert_args(FIXTURE / "model.pt", output, "--hparams", str(tmp_path / "x"))),
                          "no such file")
    assert not output.exists()


def test_a_shuffle_model_needs_its_permutations(tmp_path):
    spec = GlowSpec(channels=1, image_size=8, n_flow=2, n_block=2, hidden=8, log_actnorm=True, net_actnorm=True,
                    interleaved=True, zero_pad=True, permutation="shuffle", top_prior="buffer")
    torch.save(y0ast_state(perturbed(spec), spec), tmp_path / "model.pt")
    (tmp_path / "hparams.json").write_text(json.dumps({"flow_permutation": "shuffle"}))
    from flowtame.errors import InputError

    with pytest.raises(InputError, match="does not save them, so give them with --permutations"):
        convert_y0ast(tmp_path / "model.pt", hparams=tmp_path / "hparams.json")
    with pytest.raises(Exception, match="nothing tells a reverse from a shuffle"):
        convert_y0ast(tmp_path / "model.pt")
