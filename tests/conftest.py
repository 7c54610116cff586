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
