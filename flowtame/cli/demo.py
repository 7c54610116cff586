"""``flowtame demo``: the whole pipeline on the embedded default model and data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flowtame.cli import app
from flowtame.cli._common import command_line, console


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for every artifact of the demo.")] = Path("flowtame-demo"),
    digit: Annotated[int, typer.Option(help="The digit class whose images are forgotten.")] = 3,
    k: Annotated[int, typer.Option(help="How many images of that digit to forget.")] = 4,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "cpu",
) -> None:
    """Stats, tame (forget a few images of one digit), evaluate, and before/after samples on the embedded
    Glow and digits, in a few minutes on a laptop CPU.

    Example: flowtame demo --out ./flowtame-demo
    """
    from flowtame.jobs.demo import run_demo

    result = run_demo(out, digit=digit, k=k, device=device, log=lambda line: console.print(line, highlight=False),
                      command=command_line())
    evaluation = result.report["evaluation"]
    table = Table(title="before -> after (paired evaluation noise)")
    for column in ("set", "n", "mean BPD base -> tamed", "change", "QD [95% CI]", "forgotten"):
        table.add_column(column, justify="right" if column != "set" else "left")
    for name, block in evaluation["sets"].items():
        table.add_row(name.split(":")[0], str(block["n"]),
                      f"{block['base_mean_bpd']:.4f} -> {block['tamed_mean_bpd']:.4f}",
                      f"{block['bpd_change_relative']:+.2%}",
                      f"{block['qd']:+.4f} [{block['qd_ci_low']:+.4f}, {block['qd_ci_high']:+.4f}]",
                      f"{block['forgotten_fraction']:.0%}")
    console.print(table)
    for check in evaluation["checks"]:
        verdict = "pass" if check["passed"] else "FAIL"
        console.print(f"check {check['name']}: {check['value']:.4g} {check['comparison']} {check['bound']:g}  "
                      f"{verdict}", highlight=False)
    console.print(f"wrote {out}/: stats.json forget/ tamed.safetensors report.json nll.png samples.png "
                  f"({result.seconds:.0f} s)")
    console.print("the same steps by hand:")
    for command in result.commands:
        console.print(f"  {command}", highlight=False, soft_wrap=True)
