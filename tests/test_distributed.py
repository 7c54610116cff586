"""torchrun: contiguous shards; stats, evaluate and tame over 2 ranks (Gloo, CPU) equal to one process; a killed
rank, Ctrl-C and resume under torchrun.

The two-rank runs start ``python -m torch.distributed.run`` (torchrun) as a subprocess with the test's own
interpreter, so it finds this environment's torch; each takes ~10 s on the 2-core CI machine (the tame, debias
and train comparisons, marked slow, ~2.5 min together).
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtame.engine.distributed import DistContext, PeerFailure, current, shard_range

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("n", "world"), [(0, 1), (0, 3), (1, 2), (2, 5), (7, 2), (10, 3), (300, 2), (301, 4),
                                          (5, 5), (1000, 7)])
def test_shards_cover_every_index_exactly_once(n: int, world: int) -> None:
    shards = [shard_range(n, rank, world) for rank in range(world)]
    assert [i for shard in shards for i in shard] == list(range(n))  # contiguous, in rank order, no repeat
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced, no padding
    if n < world:
        assert sum(len(shard) == 0 for shard in shards) == world - n


@pytest.mark.parametrize(("n", "rank", "world"), [(5, 2, 2), (5, -1, 2), (5, 0, 0), (-1, 0, 1)])
def test_shard_rejects_bad_arguments(n: int, rank: int, world: int) -> None:
    with pytest.raises(ValueError):
        shard_range(n, rank, world)


def test_one_process_is_rank_zero_of_one_and_agree_reraises() -> None:
    context = current()
    assert (context.rank, context.world_size, context.is_main, context.active) == (0, 1, True, False)
    assert context.all_gather({"a": 1}) == [{"a": 1}]
    assert DistContext().shard(4) == range(4)
    DistContext().agree(None)
    with pytest.raises(KeyError):
        DistContext().agree(KeyError("x"))
    assert PeerFailure("rank 1: bad", 2).exit_code == 2


def test_a_rank_whose_allocation_fails_sends_the_others_the_out_of_memory_line(monkeypatch) -> None:
    """A failed allocation in a rank's shard of a likelihood pass reaches every rank as flowtame's one line (what
    could not be allocated, the advice), not torch's raw text: rank 0 prints it as the PeerFailure."""
    from types import SimpleNamespace

    from flowtame.errors import OutOfMemory
    from flowtame.likelihood import nll

    def failing_pass(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.8 GiB total capacity)\n"
                           "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF")

    sent: list[BaseException | None] = []

    def agree(failure: BaseException | None) -> None:
        sent.append(failure)
        if failure is not None:
            raise failure

    monkeypatch.setattr(nll, "_pass", failing_pass)
    context = SimpleNamespace(shard=lambda n: range(n), is_main=False, agree=agree)
    image_set = SimpleNamespace(validated=False, num_files=4, name="remember")
    with pytest.raises(OutOfMemory) as raised:
        nll._sharded_pass(None, image_set, context, per_image_csv=None, seed=0, batch_size=4,
                          device=torch.device("cpu"), precision="fp32", num_workers=0, progress=None, draws=1)
    assert isinstance(sent[0], OutOfMemory)
    assert "\n" not in str(raised.value) and "out of memory" in str(raised.value).lower()


def _run(args: list[str], tmp_path: Path, ranks: int | None) -> subprocess.CompletedProcess:
    """``python -m flowtame ARGS`` in one process (ranks None) or under torchrun with ``ranks`` processes."""
    launcher = [] if ranks is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, "-m", "flowtame", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def test_stats_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    outputs = {}
    for label, ranks in (("one", None), ("two", 2)):
        json_path, csv_path = tmp_path / f"{label}.json", tmp_path / f"{label}.csv"
        done = _run(["stats", "embedded:glow-digits", "embedded:digits:test", "--json", str(json_path),
                     "--per-image", str(csv_path), "-q"], tmp_path, ranks)
        assert done.returncode == 0, done.stderr
        outputs[label] = (json.loads(json_path.read_text()), _rows(csv_path))
    (report1, rows1), (report2, rows2) = outputs["one"], outputs["two"]
    assert len(rows2) == len(rows1) == report1["sources"][0]["n"] == report2["sources"][0]["n"] == 300
    assert len({row["path"] for row in rows2}) == 300  # no image twice
    assert [row["key"] for row in rows2] == [row["key"] for row in rows1]  # the one-process order
    nll1 = np.array([float(row["nll_nats"]) for row in rows1])
    nll2 = np.array([float(row["nll_nats"]) for row in rows2])
    assert np.max(np.abs(nll2 - nll1) / np.abs(nll1)) <= 1e-6
    assert report2["sources"][0]["nats"]["mean"] == pytest.approx(report1["sources"][0]["nats"]["mean"], rel=1e-6)
    assert report2["sources"][0]["bpd"]["quantiles"] == pytest.approx(report1["sources"][0]["bpd"]["quantiles"],
                                                                      rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "one.json", "two.csv", "two.json"]


def _close(a, b) -> None:
    """Equal JSON trees, numbers within 1e-6 relative (1e-9 absolute)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _close(x, y)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-9)
    else:
        assert a == b


@pytest.mark.slow
def test_evaluate_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    reports = {}
    for label, ranks in (("one", None), ("two", 2)):
        done = _run(["evaluate", "embedded:glow-digits", "embedded:glow-digits", "--forget", "embedded:digits:test:3",
                     "--remember", "embedded:digits:test", "--holdout", "embedded:digits:test:5", "--n-boot", "200",
                     "-q", "--json", str(tmp_path / f"{label}.json")], tmp_path, ranks)
        assert done.returncode == 0, done.stderr
        reports[label] = json.loads((tmp_path / f"{label}.json").read_text())
    sets = reports["one"]["evaluation"]["sets"]
    assert sets["forget"]["n"] > 0 and sets["remember"]["n"] == 300 - sets["forget"]["n"]
    _close(reports["one"]["evaluation"], reports["two"]["evaluation"])


def _folder_with_a_bad_last_file(tmp_path: Path) -> Path:
    """4 good 8x8 PNGs and, last in file order (so in rank 1's shard of 2), a file that is not an image."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"a{i}.png")
    (folder / "z_bad.png").write_bytes(b"not a png")
    return folder


@pytest.mark.slow
def test_files_skipped_on_another_rank_are_counted_once(tmp_path: Path) -> None:
    folder = _folder_with_a_bad_last_file(tmp_path)
    reports = []
    for label, ranks in (("one", None), ("two", 2)):
        out = tmp_path / f"{label}.json"
        done = _run(["stats", "embedded:glow-digits", str(folder), "-q", "--json", str(out)], tmp_path, ranks)
        assert done.returncode == 0, done.stderr
        assert done.stderr.count("z_bad.png: skipped") == 1
        reports.append(json.loads(out.read_text())["sources"][0])
    one, two = reports
    assert (two["n"], two["skipped"], two["skipped_files"]) == (one["n"], one["skipped"], one["skipped_files"])
    assert (two["n"], two["skipped"]) == (4, 1)
    assert two["nats"]["mean"] == pytest.approx(one["nats"]["mean"], rel=1e-6)  # other batch boundaries


def test_a_failing_rank_ends_the_run_with_one_line(tmp_path: Path) -> None:
    folder = _folder_with_a_bad_last_file(tmp_path)
    out = tmp_path / "stats.json"
    done = _run(["stats", "embedded:glow-digits", str(folder), "--strict", "-q", "--json", str(out)], tmp_path, 2)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("flowtame: error:")]
    assert lines == [f"flowtame: error: rank 1: {folder / 'z_bad.png'}: not an image (or a format Pillow cannot "
                     "read)"]
    assert not out.exists()


def test_several_ranks_need_a_command_that_runs_distributed(tmp_path: Path) -> None:
    """Every command that trains or measures runs under torchrun; the others (info, convert, sample, demo) would
    each run whole on every rank and are refused, from the environment torchrun sets, before any rendezvous."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-m", "flowtame", "sample", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("flowtame: error: sample does not run under torchrun yet (world size 2); only "
                                   "stats, evaluate, tame, debias, train do: run it as one process "
                                   "(docs/scaling-out.md)")
    assert list(tmp_path.iterdir()) == []


_MAP_ROWS_WORKER = """
import copy, sys, torch
from torch.nn.parallel import DistributedDataParallel
from flowtame.engine.distributed import distributed_context

def loss_of(v):  # a loss of the whole batch's per-row values: mean, std and per-row terms, as taming's
    return v.mean() + 3 * v.std() + torch.sigmoid(v[:2]).sum() + (v - v.mean()).square().max()

torch.manual_seed(0)
with distributed_context() as ctx:
    assert ctx.world_size == 2
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    for rows in (7, 1):  # shards of 4 and 3 rows; then one row: rank 1 has none, yet its backward reaches DDP
        x = torch.randn(rows, 3, dtype=torch.float64)  # the same batch on every rank (same seed)
        values = ctx.map_rows(lambda r: ddp(r).squeeze(1), x)
        one = reference(x).squeeze(1)
        # (to rounding: a BLAS may block a 4-row product otherwise than a 7-row one, as MKL does on AVX-512)
        assert torch.allclose(values.detach(), one.detach(), rtol=1e-13, atol=1e-15), (values, one)
        loss, expected = (loss_of(values), loss_of(one)) if rows > 1 else (values.square().sum(), one.square().sum())
        assert abs(loss.item() - expected.item()) <= 1e-13 * abs(expected.item())
        model.zero_grad()
        reference.zero_grad()
        loss.backward()
        expected.backward()
        for mine, theirs in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(mine.grad, theirs.grad, rtol=1e-12, atol=1e-15), (mine.grad, theirs.grad)
        with torch.no_grad():
            assert torch.allclose(ctx.map_rows(lambda r: reference(r).squeeze(1), x), one.detach(), rtol=1e-13,
                                  atol=1e-15)
    print(f"rank {ctx.rank} ok", flush=True)
    del ddp, values, loss  # DDP goes before its process group (else an abort at exit, now and then)
"""


def test_map_rows_gives_the_one_process_values_and_gradient_under_ddp(tmp_path: Path) -> None:
    """Two Gloo ranks, each evaluating its shard of a batch through DDP: every rank holds all rows' values, and a
    loss of mean, std and per-row terms has the one-process value and (DDP's average) gradient, in float64."""
    script = tmp_path / "worker.py"
    script.write_text(_MAP_ROWS_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the two ranks share one stdout pipe: their lines may interleave ("rank 1 okrank 0 ok\n\n")
    assert sorted(re.findall(r"rank (\d) ok", done.stdout)) == ["0", "1"]


# ----------------------------------------------------------------------------------------------- tame under DDP
TAME_ITERS = 300


@pytest.fixture(scope="module")
def tame_workspace(tmp_path_factory):
    """A tiny Glow (2 flows, 16 channels) trained 150 steps on 8x8 digits, 2 threes to forget and 180 other
    digits to remember: taming converges in about 100 iterations (~1 s in one process)."""
    from flowtame.data.images import open_images
    from flowtame.data.quantization import DataSpec, discrete_nll, quantize
    from flowtame.flows.glow import GlowSpec, build_glow
    from flowtame.io.checkpoint import Checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("ddp-tame")
    data_spec = DataSpec(image_size=8, channels=1, n_bits=4)
    pixels, _ = open_images("embedded:digits:all", data_spec).load_tensor()
    labels = np.load(ROOT / "flowtame" / "assets" / "digits.npz")["labels"]
    torch.manual_seed(0)
    spec = GlowSpec(channels=1, image_size=8, n_flow=2, n_block=2, hidden=16, affine=False)
    model = build_glow(spec).train()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(150):
        batch = pixels[:1200][torch.randint(1200, (64,), generator=generator)]
        x = quantize(batch, data_spec.n_bits) + torch.rand(batch.shape, generator=generator) / data_spec.n_bins
        loss = discrete_nll(model.log_prob(x), data_spec.num_dims, data_spec.n_bits).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_checkpoint(root / "base.safetensors", Checkpoint(model.eval(), "glow", spec, data_spec))
    for name, indices in (("forget", [i for i in range(1200) if labels[i] == 3][:2]),
                          ("remember", [i for i in range(200) if labels[i] != 3])):
        (root / name).mkdir()
        for i in indices:
            Image.fromarray(pixels[i, 0].numpy()).save(root / name / f"{i:04d}.png")
    return root


def _tame_args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["tame", str(ws / "base.safetensors"), "--forget", str(ws / "forget"), "--remember", str(ws / "remember"),
            "--batch-size", "8", "--refresh-size", "32", "--forget-draws", "2", "--device", "cpu",
            "--max-iters", str(TAME_ITERS), "-o", str(out), "--report", f"{out}.json", *extra]


@pytest.fixture(scope="module")
def tame_runs(tame_workspace):
    """The same tame command in one process and on 2 ranks (each evaluating 8 of the 16 batch rows). The curvature
    metric is single-process: torchrun runs Adam's update whatever the default, so the one process pins it."""
    outputs = {}
    for label, ranks, extra in (("one", None, ("--precondition", "none", "--step", "adam")), ("two", 2, ())):
        out = tame_workspace / f"{label}.safetensors"
        done = _run(_tame_args(tame_workspace, out, "-q", *extra), tame_workspace, ranks)
        assert done.returncode == 0, done.stderr
        outputs[label] = out
    return outputs


def _weights(path: Path) -> dict:
    from flowtame.io.checkpoint import load_checkpoint

    return load_checkpoint(path).model.state_dict()


@pytest.mark.slow
def test_tame_on_two_ranks_stops_where_one_process_does(tame_workspace, tame_runs) -> None:
    one, two = (json.loads(Path(f"{tame_runs[label]}.json").read_text()) for label in ("one", "two"))
    assert one["converged"] and two["converged"] and 10 < one["iterations"] < TAME_ITERS
    assert one["config"]["precondition"] == two["config"]["precondition"] == "none"  # torchrun: the default too
    for key in ("iterations", "confirmations", "refreshes", "early_refreshes", "lr_reductions", "drift_refusals",
                "lookalike_refusals", "remember_qd_refusals", "anchor_factor", "tail_rows"):
        assert two[key] == one[key], key
    assert [row["iteration"] for row in two["trajectory"]] == [row["iteration"] for row in one["trajectory"]]
    # the weights: float32 sums in another order (per-rank partial gradients, then the all-reduce) differ in
    # the last bits each step; Adam carries that through ~100 steps. Measured: 2.8e-5 of the largest change.
    base, w1, w2 = (_weights(p) for p in (tame_workspace / "base.safetensors", tame_runs["one"], tame_runs["two"]))
    change = max(float((w1[k] - base[k]).abs().max()) for k in base)
    gap = max(float((w1[k] - w2[k]).abs().max()) for k in base)
    assert change > 1e-3 and gap <= 1e-3 * change
    for a, b in zip(one["requests"], two["requests"], strict=True):
        assert b["d_max"] == pytest.approx(a["d_max"], abs=1e-3) and b["n"] == a["n"]


def _child_with_rank(parent: int, rank: int) -> int:
    """The pid of torchrun's worker (a child of ``parent``) whose environment says RANK=``rank``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under {parent}")


def _torchrun_until(args: list[str], cwd: Path, line_start: str, act) -> subprocess.CompletedProcess:
    """Start ``args`` on 2 ranks; when rank 0 prints a line starting with ``line_start``, call
    ``act(torchrun_process)``; then wait for the end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                "-m", "flowtame", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(line_start):
            act(process)
            break
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(seen) + out, err)


def _flowtame_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("flowtame:")]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_ends_tame_cleanly_and_resume_completes_it(tame_workspace, tame_runs, tmp_path) -> None:
    out = tmp_path / "killed.safetensors"
    state = tmp_path / "killed.safetensors.resume.safetensors"
    done = _torchrun_until(_tame_args(tame_workspace, out), tmp_path, "iter    50",
                           lambda torchrun: os.kill(_child_with_rank(torchrun.pid, 1), signal.SIGKILL))
    assert done.returncode != 0
    lines = _flowtame_lines(done.stderr)
    assert len(lines) == 1 and "another rank probably died" in lines[0], done.stderr[-3000:]
    saved = re.search(rf"the state of iteration (\d+) is saved to {re.escape(str(state))}, continue by resuming",
                      lines[0])
    assert saved and int(saved[1]) % 10 == 0 and int(saved[1]) >= 50 and lines[0].endswith("[--resume]")
    assert not out.exists() and not Path(f"{out}.json").exists() and state.is_file()
    # another world size is refused in one line, and the state is kept
    refused = _run(_tame_args(tame_workspace, out, "-q", "--resume"), tmp_path, None)
    assert refused.returncode == 2
    assert _flowtame_lines(refused.stderr) == [
        f"flowtame: error: {state}: saved by a run on 2 process(es), this run has 1: resume with the same number "
        "of processes (torchrun --nnodes x --nproc-per-node) [--resume]"]
    assert state.is_file() and not out.exists()
    resumed = _run(_tame_args(tame_workspace, out, "-q", "--resume"), tmp_path, 2)
    assert resumed.returncode == 0, resumed.stderr
    assert not state.exists()
    # the snapshot is an iteration boundary: the resumed run is the uninterrupted one, bit for bit
    finished, straight = _weights(out), _weights(tame_runs["two"])
    assert all(torch.equal(finished[k], straight[k]) for k in straight)


@pytest.mark.slow
def test_ctrl_c_to_torchrun_stops_every_rank_at_one_iteration(tame_workspace, tmp_path) -> None:
    """torchrun forwards SIGINT to each worker; the ranks agree on the stop, rank 0 saves the state and writes the
    partial report; nothing else is written."""
    out = tmp_path / "stopped.safetensors"
    done = _torchrun_until(_tame_args(tame_workspace, out), tmp_path, "iter    50",
                           lambda torchrun: torchrun.send_signal(signal.SIGINT))
    assert done.returncode != 0
    lines = _flowtame_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("flowtame: error: interrupted at iteration "), done.stderr[-3000:]
    partial = json.loads(Path(f"{out}.json").read_text())
    assert partial["interrupted"] is True and 50 <= partial["iterations"] < TAME_ITERS
    assert f"at iteration {partial['iterations']};" in lines[0]
    assert not out.exists() and (tmp_path / "stopped.safetensors.resume.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stopped.safetensors.json",
                                                          "stopped.safetensors.resume.safetensors"]


@pytest.mark.slow
def test_debias_on_two_ranks_matches_one_process(tame_workspace, tmp_path) -> None:
    """The same debias command in one process and on 2 ranks: same measured frequencies at every measurement
    (the classifier, the kept latents and each rank's decoding are the same), weights as close as tame's."""
    reports = {}
    for label, ranks in (("one", None), ("two", 2)):
        out = tmp_path / f"{label}.safetensors"
        done = _run(["debias", str(tame_workspace / "base.safetensors"), "--group", "zero=embedded:digits:all:0",
                     "--group", "one=embedded:digits:all:1", "--target", "zero=0.35", "--samples", "256",
                     "--max-iters", "30", "--measure-every", "5", "--batch-size", "8", "--device", "cpu", "-q",
                     "-o", str(out), "--report", f"{out}.json"], tmp_path, ranks)
        assert done.returncode == 0, done.stderr
        reports[label] = json.loads(Path(f"{out}.json").read_text())
    one, two = reports["one"], reports["two"]
    assert two["iterations"] == one["iterations"] and two["converged"] == one["converged"]
    assert [t["groups"] for t in two["trajectory"]] == [t["groups"] for t in one["trajectory"]]
    assert one["frequencies"]["after"] != one["frequencies"]["before"]  # the run moved the split
    base, w1, w2 = (_weights(p) for p in (tame_workspace / "base.safetensors", tmp_path / "one.safetensors",
                                          tmp_path / "two.safetensors"))
    change = max(float((w1[k] - base[k]).abs().max()) for k in base)
    # 30 small steps (the weights move by ~4e-4 at most): the ranks' summed gradients round differently from one
    # process's, and the gap is 0.8% of the change on an AMD EPYC's BLAS (under 0.1% on an Intel Xeon's); a rank
    # that trained on the wrong shard or missed the other's gradient would be off by tens of percent
    assert max(float((w1[k] - w2[k]).abs().max()) for k in base) <= 2e-2 * change


@pytest.mark.slow
def test_train_on_two_ranks_matches_one_process(tmp_path) -> None:
    """``train`` from scratch on 2 ranks (each evaluating half of every batch): the per-step loss (the log's
    all-gathered batch BPD) equals one process's to 1e-4 relative. ActNorm's data-dependent initialization
    takes the whole first batch on every rank, as in one process (the first-step loss is the same). The weights
    are not compared tightly: Adam turns rounding-level gradients (ActNorm's right after its initialization)
    into steps of the learning rate's size, in one process as much as in two."""
    histories = {}
    for label, ranks in (("one", None), ("two", 2)):
        out = tmp_path / f"{label}.safetensors"
        done = _run(["train", "embedded:digits:train", "--arch", "glow", "--image-size", "8", "--channels", "1",
                     "--n-bits", "4", "--n-flow", "2", "--n-block", "2", "--hidden", "16", "--steps", "30",
                     "--batch-size", "16", "--warmup", "5", "--device", "cpu", "-q", "-o", str(out),
                     "--json", f"{out}.json"], tmp_path, ranks)
        assert done.returncode == 0, done.stderr
        histories[label] = json.loads(Path(f"{out}.json").read_text())["history"]
    one, two = histories["one"], histories["two"]
    assert [h["step"] for h in two] == [h["step"] for h in one] and one[-1]["step"] == 30
    for a, b in zip(one, two, strict=True):
        assert b["loss_bpd"] == pytest.approx(a["loss_bpd"], rel=1e-4)
    assert two[0]["loss_bpd"] == pytest.approx(one[0]["loss_bpd"], rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "one.safetensors.json",
                                                          "one.safetensors.resume.safetensors", "two.safetensors",
                                                          "two.safetensors.json",
                                                          "two.safetensors.resume.safetensors"]


def test_a_stop_signal_during_a_failure_keeps_the_failure_line(run_cli, monkeypatch) -> None:
    """torchrun sends SIGTERM to the ranks that survive a dead one; arriving while a rank is already on its way
    out with RankLost, it must not turn the error into "interrupted" (exit 143)."""
    import signal as signals

    import flowtame.cli as cli
    from flowtame.engine.distributed import RankLost
    from flowtame.errors import StopSignal

    def failing_app(**_kwargs) -> None:
        try:
            raise RankLost("training stopped at iteration 7: a collective failed", keys=("resume",))
        finally:
            raise StopSignal(signals.SIGTERM)  # what the SIGTERM handler raises, mid-unwinding

    monkeypatch.setattr(cli, "app", failing_app)
    result = run_cli("tame")
    assert result.exit_code == 1
    assert result.stderr.strip() == ("flowtame: error: training stopped at iteration 7: a collective failed "
                                     "[--resume]")

    def stopped_app(**_kwargs) -> None:
        raise StopSignal(signals.SIGTERM)

    monkeypatch.setattr(cli, "app", stopped_app)
    stopped = run_cli("tame")
    assert (stopped.exit_code, stopped.stderr.strip()) == (143, "flowtame: interrupted by SIGTERM")  # a plain stop


@pytest.mark.slow
def test_step_solve_under_torchrun_takes_adams_step_with_adams_drift_bound(tame_workspace, tmp_path) -> None:
    """The solved step is single-process: under torchrun `--step solve` warns and runs Adam's step, and the drift
    bound it resolved for the solved step (0.1%) goes back to Adam's default (0.3%)."""
    from flowtame.jobs.tame import make_config

    out = tmp_path / "solve.safetensors"
    done = _run(_tame_args(tame_workspace, out, "-q", "--step", "solve"), tame_workspace, 2)
    assert done.returncode == 0, done.stderr
    assert "under torchrun the step is Adam's (the solved step runs in one process)" in done.stderr
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["config"]["step"] == "adam" and report["config"]["precondition"] == "none"
    adam, solve = make_config({"step": "adam"}), make_config({})  # (the solved step is the default)
    assert solve.max_remember_drift < adam.max_remember_drift  # (the fallback's premise)
    assert report["config"]["max_remember_drift"] == adam.max_remember_drift
    assert report["calibration"] is not None and not any("step_rms" in row for row in report["trajectory"])
