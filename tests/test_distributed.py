"""torchrun: contiguous shards, and stats/evaluate over 2 ranks (Gloo, CPU) equal to one process.

The two-rank runs start ``python -m torch.distributed.run`` (torchrun) as a subprocess with the test's own
interpreter, so it finds this environment's torch; each takes ~10 s on the 2-core CI machine.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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


@pytest.mark.parametrize("command", ["tame", "train"])
def test_commands_without_distributed_support_refuse_several_ranks(tmp_path: Path, command: str) -> None:
    """Checked from the environment torchrun sets, before any process group: no rendezvous needed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-m", "flowtame", command, "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"flowtame: error: {command} does not run under torchrun yet (world size 2); "
                                   "only stats and evaluate do: run it as one process (docs/scaling-out.md)")
    assert list(tmp_path.iterdir()) == []
