"""Shared test fixtures: deterministic torch, and a runner that drives the real CLI entry point."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass

import pytest
import torch

torch.set_num_threads(1)  # tiny test models run fastest on one thread


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``flowtame ARGS...`` in-process through ``flowtame.cli.main`` (error mapping included)."""

    def _run(*args: str) -> CliResult:
        from flowtame.cli import main

        monkeypatch.setattr(sys, "argv", ["flowtame", *map(str, args)])
        monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
        # the test process keeps glibc's malloc as it is (main() would keep freed memory for the whole session)
        monkeypatch.setattr("flowtame.cli.retain_freed_host_memory", lambda: False)
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return _run


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def assert_valid_report():
    """``check(report, schema_file)``: the report, after a JSON round trip, validates against the shipped schema
    ``flowtame/schemas/<schema_file>`` (which may refer to the evaluation schema)."""
    import jsonschema
    from referencing import Registry, Resource

    from flowtame.likelihood.evaluation import load_schema

    evaluation = load_schema()
    registry = Registry().with_resources([(evaluation["$id"], Resource.from_contents(evaluation))])

    def check(report: dict, schema_file: str) -> None:
        schema = load_schema(schema_file)
        jsonschema.Draft202012Validator.check_schema(schema)
        jsonschema.Draft202012Validator(schema, registry=registry).validate(json.loads(json.dumps(report)))

    return check


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """An untrained, perturbed 8x8 Glow checkpoint for the embedded digits: enough to drive the commands (the
    signal, write-error and debias tests), not to judge a method. Never modified by the tests that use it."""
    from flowtame.data.quantization import DataSpec
    from flowtame.flows.glow import GlowSpec, build_glow
    from flowtame.io.checkpoint import Checkpoint, save_checkpoint

    torch.manual_seed(0)
    spec = GlowSpec(channels=1, image_size=8, n_flow=1, n_block=2, hidden=8)
    model = build_glow(spec)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_checkpoint(path, Checkpoint(model.eval(), "glow", spec, DataSpec(image_size=8, channels=1, n_bits=5)))
    return path
