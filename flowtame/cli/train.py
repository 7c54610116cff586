"""``flowtame train``: train a base model from scratch on a folder of images (or the embedded digits)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from flowtame.cli import app
from flowtame.cli._common import check_outputs, command_line, console, emit_json, err_console, is_interactive
from flowtame.engine import distributed
from flowtame.errors import InputError


def _load_images(data: str, data_spec, strict: bool):
    """The training images (uint8 [N, C, S, S]); skipped files are summed up in one warning line."""
    from flowtame.data.images import open_images

    image_set = open_images(data, data_spec, strict=strict)
    images, _ = image_set.load_tensor()
    if image_set.skipped and distributed.current().is_main:
        path, reason = image_set.skipped[0]
        err_console.print(f"[yellow]warning:[/] {len(image_set.skipped)} file(s) of {data} skipped "
                          f"(first: {path}: {reason})")
    return images


class _ProgressView:
    """A Rich progress bar with the batch BPD on a terminal, else a plain line every ``log_every`` steps."""

    def __init__(self, steps: int, quiet: bool, out: Console):
        self.quiet = quiet
        self.out = out
        self.log_every = max(1, min(100, steps // 20))
        self.progress = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[bpd]} BPD"),
            TextColumn("lr {task.fields[lr]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=out, transient=True) if is_interactive(quiet) and out is console else None
        self.task: TaskID | None = None  # set on entering the progress display
        self.steps = steps

    def __enter__(self) -> _ProgressView:
        if self.progress is not None:
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=self.steps, bpd="  -   ", lr="-")
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, p) -> None:
        """Show one :class:`flowtame.jobs.train.TrainProgress`."""
        if self.progress is not None:
            if self.task is not None:
                self.progress.update(self.task, completed=p.step, bpd=f"{p.loss_bpd:.4f}", lr=f"{p.lr:.2e}")
        elif not self.quiet and (p.step % self.log_every == 0 or p.step in (1, p.steps)):
            self.out.print(f"step {p.step:6d}/{p.steps}  loss {p.loss_bpd:.4f} BPD  lr {p.lr:.2e}  "
                          f"grad norm {p.grad_norm:.3g}  {p.elapsed_s:.1f} s", highlight=False, soft_wrap=True)


# Over 80 lines only for its Annotated option declarations and help text; the work is in flowtame.jobs.train.
@app.command("train")
def train_command(
    data: Annotated[str, typer.Argument(help="Training images: a folder, an image, a .txt list of paths, or "
                                             "embedded:digits[:all|train|test][:CLASS].")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (.safetensors).")],
    arch: Annotated[str, typer.Option("--arch", help="glow | realnvp | nice | tarflow.")] = "glow",
    image_size: Annotated[int, typer.Option("--image-size", help="Images are resized and centre-cropped to "
                                                                 "this.")] = 32,
    channels: Annotated[int, typer.Option("--channels", help="1 (grayscale) or 3 (RGB).")] = 3,
    n_bits: Annotated[int, typer.Option("--n-bits", help="Bits per value the model sees (1-8).")] = 5,
    n_flow: Annotated[int | None, typer.Option("--n-flow", help="glow: flow steps per level (default: 8).")] = None,
    n_block: Annotated[int | None, typer.Option("--n-block", help="glow: levels; 2**n must divide the image size "
                                                           "(default: 3); tarflow: flow blocks (default: 4).")] = None,
    hidden: Annotated[int | None, typer.Option("--hidden", help="Width of the coupling networks (default: per "
                                                         "architecture).")] = None,
    affine: Annotated[bool | None, typer.Option("--affine/--additive", help="glow: affine or additive coupling "
                                                                     "(default: additive).")] = None,
    conv_lu: Annotated[bool | None, typer.Option("--lu/--no-lu", help="glow: LU-parameterized 1x1 convolutions "
                                                               "(default: lu).")] = None,
    n_scales: Annotated[int | None, typer.Option("--n-scales", help="realnvp: scales (default: 2).")] = None,
    n_res_blocks: Annotated[int | None, typer.Option(
        "--n-res-blocks", help="realnvp: residual blocks (default: 2).")] = None,
    n_couplings: Annotated[int | None, typer.Option(
        "--n-couplings", help="nice: coupling layers (default: 4).")] = None,
    n_hidden_layers: Annotated[int | None, typer.Option(
        "--n-hidden-layers", help="nice: hidden layers (default: 5).")] = None,
    patch_size: Annotated[int | None, typer.Option("--patch-size", help="tarflow: patch side in pixels; must divide "
                                                                 "the image size (default: 4).")] = None,
    width: Annotated[int | None, typer.Option("--width", help="tarflow: transformer width (default: 256).")] = None,
    layers_per_block: Annotated[int | None, typer.Option("--layers-per-block", help="tarflow: attention layers per "
                                                                             "flow block (default: 2).")] = None,
    heads: Annotated[int | None, typer.Option("--heads", help="tarflow: attention heads; must divide the width "
                                                       "(default: 4).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 2000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Adam peak learning rate.")] = 1e-3,
    warmup: Annotated[int, typer.Option("--warmup", help="Linear learning-rate warm-up steps.")] = 200,
    decay: Annotated[int, typer.Option("--decay", help="Decay the learning rate linearly towards 0 over the "
                                                       "last N steps (0 = constant after warm-up).")] = 0,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Clip the gradient norm (loss in BPD) to "
                                                                 "this; 0 = no clipping.")] = 50.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of weights, batch order and noise: CPU runs repeat "
                                                     "bit for bit.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")] = "auto",
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Also write the checkpoint and the "
                                                                             "resumable state every N steps (0 "
                                                                             "= only at the end).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT's resumable state (same "
                                                          "data and settings; --steps may be larger).")] = False,
    sample_every: Annotated[int, typer.Option("--sample-every", help="Write an 8x8 grid of temperature-0.7 "
                                                                     "samples every N steps (0 = never).")] = 0,
    sample_dir: Annotated[Path | None, typer.Option("--sample-dir", help="Folder for the sample grids (default: "
                                                                  "OUTPUT's name + '-samples').")] = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Write a summary (settings, BPD, history) as JSON "
                                                          "('-' = stdout).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Treat unreadable image files as errors.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing OUTPUT.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display; only the final line.")] = False,
) -> None:
    """Train a fresh flow on DATA by maximum likelihood and write it as a flowtame checkpoint.

    Ctrl-C (or SIGTERM, SIGHUP) saves a resumable state beside OUTPUT (OUTPUT + '.resume.safetensors');
    continue with --resume.

    Example: flowtame train embedded:digits:train -o digits.safetensors --arch glow --image-size 16
    --channels 1 --n-block 2 --hidden 128 --steps 2000
    """
    options = dict(locals())  # first: every option (the architecture's hyperparameters among them)
    from flowtame.data.quantization import DataSpec
    from flowtame.jobs.train import ARCHITECTURE_OPTIONS, model_spec, train_model

    check_outputs(force or resume, output, inputs=[data])
    check_outputs(force or resume, json_path, inputs=[data, output])
    try:
        data_spec = DataSpec(image_size=image_size, channels=channels, n_bits=n_bits)
    except ValueError as exc:
        raise InputError(f"--image-size/--channels/--n-bits: {exc}") from None
    spec = model_spec(arch, channels, image_size, {key: options[key] for key in ARCHITECTURE_OPTIONS})
    images = _load_images(data, data_spec, strict)
    out = err_console if json_path == "-" else console  # keep stdout for the JSON
    main_rank = distributed.current().is_main  # under torchrun only rank 0 prints and writes
    quiet = quiet or not main_rank
    if not quiet:
        out.print(f"training {arch} on {images.shape[0]} image(s) of {data} "
                      f"({channels}x{image_size}x{image_size}, {n_bits} bits)", highlight=False, soft_wrap=True)
    if sample_every and sample_dir is None:
        sample_dir = output.with_name(output.stem + "-samples")
    with _ProgressView(steps, quiet, out) as view:
        result = train_model(
            images, arch, spec, data_spec, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup,
            grad_clip=grad_clip or None, seed=seed, decay_steps=decay, device=device, checkpoint_path=output,
            checkpoint_every=checkpoint_every, resume=resume, force=force, sample_every=sample_every,
            sample_dir=sample_dir, callback=view.update, command=command_line())
    if main_rank:
        emit_json(json_path, result.report(data, int(images.shape[0])))
        _print_done(result, out, quiet)


def _print_done(result, out: Console, quiet: bool) -> None:
    """Where the resumable state is (unless quiet) and the one-line result."""
    from flowtame.jobs.train import BPD_WINDOW

    ckpt = result.checkpoint
    if not quiet:
        out.print(f"resumable state: {result.state_path} (continue with --resume and more --steps; "
                  "delete it when done)", highlight=False, soft_wrap=True)
    out.print(f"trained {ckpt.architecture} ({ckpt.num_parameters:,} parameters) for {result.steps} steps in "
              f"{result.wall_seconds:.1f} s: train BPD {result.train_bpd:.4f} (mean of the last "
              f"{min(result.steps, BPD_WINDOW)} steps); wrote {ckpt.path} (sha256 {ckpt.sha256})",
              highlight=False, soft_wrap=True)
