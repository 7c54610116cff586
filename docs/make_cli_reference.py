"""Regenerate docs/cli.md from the commands' own --help text: python docs/make_cli_reference.py"""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from flowtame.cli import app

COMMANDS = ["info", "convert", "stats", "train", "tame", "evaluate", "sample", "debias", "demo"]


def main() -> None:
    os.environ["COLUMNS"] = "110"
    os.environ["NO_COLOR"] = "1"
    runner = CliRunner()
    parts = ["# Command-line reference", "",
             "Generated from each command's `--help` by `python docs/make_cli_reference.py`. Exit codes: 0 success,",
             "1 a requested check failed, 2 bad usage or bad input (one line naming the file and the problem),",
             "130 interrupted by Ctrl-C, 143 by SIGTERM, 129 by SIGHUP (state saved where the command can "
             "`--resume`); see",
             "[exit-codes.md](exit-codes.md) for what each kind of stop leaves on disk.", "",
             "MODEL arguments accept `embedded:glow-digits`; DATA arguments accept a folder (recursive), an image,",
             "a text file listing image paths, or `embedded:digits[:SPLIT][:CLASS]`.", "",
             "`stats`, `evaluate`, `tame`, `debias` and `train` also run over several processes, GPUs or machines",
             "under `torchrun ... -m flowtame COMMAND ...` with the same options ([scaling-out.md](scaling-out.md)).",
             ""]
    for name in COMMANDS:
        result = runner.invoke(app, [name, "--help"], terminal_width=110, color=False)
        parts += [f"## flowtame {name}", "", "```", result.output.rstrip(), "```", ""]
    Path(__file__).with_name("cli.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
