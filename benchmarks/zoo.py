"""The tuning zoo benchmark (issue 23): the digit protocol on every zoo model for k in {1, 4, 8, 15}.

For each model of benchmarks/zoo_models.py (built and cached there) and each k, the protocol of
benchmarks/protocol.py (:func:`protocol.build_protocol`): D_F = k train images of the identity class nearest
its median NLL, D'_F = the class's other images, D_R = the other classes' train images, D_R^NN = the 16
remember images nearest D_F, holdout = the other classes' test images. Then:

- ``tame`` (the library call, :func:`flowtame.taming.tame`) with the package's defaults at run time, plus
  ``--override`` (TameConfig keys as JSON); a run the library stops with an error is a row too ("aborted");
- the tamed checkpoint is written, read back and scored by :func:`protocol.score`: QD on every set, holdout
  BPD change, and whether ``flowtame evaluate --neighbours 16 --check`` (default tolerances) passes;
- the authors' loop (benchmarks/reference_loop.py, 800 iterations, its defaults) on the same model and sets,
  for the time ratio (tame's wall time / the reference's). Reference results are cached in
  ``--reference-cache`` by model sha256, digit, k, iterations, torch threads and allocator (``--plain-malloc``),
  so each is run once (``--reference-only`` fills the cache without taming; ``--print`` takes cached ones into
  the table).

    python benchmarks/zoo.py --skip-reference --json before.json          # every model and k, tame only
    python benchmarks/zoo.py --json zoo.json                              # + the reference loop at k = 4, 15
    python benchmarks/zoo.py --reference-only --reference-ks 4            # only fill the reference cache
    python benchmarks/zoo.py --models tuning-glow wide-glow --ks 4 --override '{"lr": 1e-4}' --label lr1e-4
    python benchmarks/zoo.py --print zoo.json                             # re-print a saved run's table

Ctrl-C, SIGTERM or SIGHUP stops the whole run, as the CLI does: the cell in progress is dropped, ``--json``
keeps every finished row (it is rewritten after each one) and ``--resume`` runs the rest; exit status 128 + the
signal's number (130, 143, 129).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import Protocol, build_protocol, score  # noqa: E402
from reference_loop import run_reference  # noqa: E402
from zoo_models import DEFAULT_CACHE, ZOO, build, describe, digits_source  # noqa: E402

from flowtame.engine.host_memory import retain_freed_host_memory  # noqa: E402
from flowtame.errors import FlowtameError, InterruptedRun, StopSignal, signal_number, stop_signals  # noqa: E402
from flowtame.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from flowtame.jobs.tame import make_config, preset, tame  # noqa: E402
from flowtame.likelihood.nll import pixel_nll  # noqa: E402

KS = (1, 4, 8, 15)
NEIGHBOURS = 16
REFERENCE_ITERS = 800


def reductions_in(message: str) -> int | None:
    """The learning-rate reductions an abort message reports ("after 3 learning-rate reductions"), if any."""
    found = re.search(r"after (\d+) learning-rate reduction", message)
    return int(found.group(1)) if found else None


def abort_reason(message: str) -> str:
    """A short name for why the library stopped a run (the full message stays in the JSON)."""
    for needle, short in (("jumped", "remember jump"), ("drift", "remember drift"),
                          ("non-finite", "non-finite"), ("NaN", "non-finite")):
        if needle in message:
            return short
    return message.split(";")[0][:40]


def tame_row(base: Checkpoint, proto: Protocol, override: dict[str, Any], workdir: Path,
             preset_name: str | None = None, *, stop_as_row: bool = False) -> dict[str, Any]:
    """One tame() run on ``proto`` with the package's defaults (or a shipped preset) + ``override``, written,
    read back and scored.

    Returns the row's figures; a run the library stops with an error gives ``aborted`` (the message), the
    last iteration it reported and its wall time instead of the scores. A stop request (InterruptedRun: the
    engine's clean stop on Ctrl-C, SIGTERM or SIGHUP) is no row: it propagates and ends the zoo run, unless
    ``stop_as_row`` (benchmarks/zoo_trace.py: a trace stopped by hand keeps its row and trace)."""
    config = make_config(preset(preset_name) if preset_name else {}, override)
    last = {"iteration": 0}
    start = time.perf_counter()
    try:
        outcome = tame(base, [proto.forget], proto.remember, config, device="cpu",
                       callback=lambda iteration, logged: last.update(iteration=iteration))
    except FlowtameError as exc:
        if isinstance(exc, InterruptedRun) and not stop_as_row:
            raise
        wall = time.perf_counter() - start
        return {"aborted": str(exc), "abort_reason": abort_reason(str(exc)), "iterations": last["iteration"],
                "total_seconds": wall, "config": asdict(config)}
    total = time.perf_counter() - start
    path = workdir / "tamed.safetensors"
    save_checkpoint(path, outcome.checkpoint, force=True)
    written = replace(outcome, checkpoint=load_checkpoint(path))
    row = score(base, proto, written, config, total, n_boot=1000)
    report = outcome.report
    row.update(seconds_per_iteration=report["seconds_per_iteration"], refreshes=report.get("refreshes"),
               confirmations=report.get("confirmations"), drift_refusals=report.get("drift_refusals"),
               lookalike_refusals=report.get("lookalike_refusals"), lookalike_qd=report.get("lookalike_qd"),
               remember_qd_refusals=report.get("remember_qd_refusals"), remember_qd=report.get("remember_qd"),
               normality_refusals=report.get("normality_refusals"),
               config=report["config"])
    return row


def reference_row(base: Checkpoint, proto: Protocol, iters: int) -> dict[str, Any]:
    """The authors' loop (its defaults) on a copy of the base model: iterations, converged, wall seconds (its
    initial refresh included), and its result scored like a tame row (``scores``, after the clock stops)."""
    model = copy.deepcopy(base.model)
    start = time.perf_counter()
    result = run_reference(model, proto.forget.pixels, proto.remember.pixels, base.data_spec.n_bits,
                           max_iters=iters)
    total = time.perf_counter() - start
    return {"iterations": result.iterations, "converged": result.converged,
            "loop_seconds": result.wall_seconds, "total_seconds": total,
            "final_max_abs_d": result.final_max_abs_d, "scores": reference_scores(base, proto, model, result, total)}


def reference_scores(base: Checkpoint, proto: Protocol, model: torch.nn.Module, result: Any,
                     total: float) -> dict[str, Any]:
    """The reference loop's model scored by :func:`protocol.score` as a tame row is (QD on every set, holdout
    BPD change, ``evaluate --neighbours 16 --check``), with the package's evaluation settings (delta 4, epsilon
    0.6, 8 forget draws, noise seed 0); forget and remember NLL of both models computed here."""
    config = make_config({})
    spec, cpu = base.data_spec, torch.device("cpu")
    model.eval()
    nll = {}
    for which, m in (("base", base.model), ("tamed", model)):
        nll[(which, "forget")] = pixel_nll(m, proto.forget.pixels, proto.forget.keys, spec, config.eval_seed, cpu,
                                           draws=config.forget_draws)
        nll[(which, "remember")] = pixel_nll(m, proto.remember.pixels, proto.remember.keys, spec,
                                             config.eval_seed, cpu)
    outcome = SimpleNamespace(nll=nll, checkpoint=SimpleNamespace(model=model),
                              report={"converged": result.converged, "iterations": result.iterations,
                                      "wall_seconds": result.wall_seconds})
    return score(base, proto, outcome, config, total, n_boot=1000)


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (a run killed mid-write leaves the previous file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def add_cell_arguments(parser: argparse.ArgumentParser, *, model: str, k: int) -> None:
    """The options of a script that runs one zoo cell (benchmarks/tame_profile.py, zoo_trace.py): --model, --k
    and --digit name it, --override (TameConfig keys), --cache and --threads (1); see :func:`load_cell`."""
    parser.add_argument("--model", default=model, choices=list(ZOO), help=f"the zoo model [{model}]")
    parser.add_argument("--k", type=int, default=k, help=f"size of D_F [{k}]")
    parser.add_argument("--digit", type=int, default=3, help="the class playing the identity [3]")
    parser.add_argument("--override", type=json.loads, default={}, help="TameConfig keys as JSON")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the zoo models are cached")
    parser.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    add_malloc_argument(parser)


def add_malloc_argument(parser: argparse.ArgumentParser) -> None:
    """--plain-malloc: leave glibc's malloc as it is; by default the process keeps freed memory for reuse, as the
    CLI's does (flowtame/engine/host_memory.py)."""
    parser.add_argument("--plain-malloc", action="store_true",
                        help="leave glibc's malloc trimming and mmap-ing freed memory (the CLI keeps it for reuse)")


def host_memory(args: argparse.Namespace) -> str:
    """Apply ``args.plain_malloc``'s choice; returns it in words for the results' machine line."""
    if args.plain_malloc:
        return "plain malloc"
    return "freed memory retained" if retain_freed_host_memory() else "plain malloc (no glibc)"


def load_cell(args: argparse.Namespace) -> tuple[Checkpoint, Protocol]:
    """The base checkpoint and protocol of the cell :func:`add_cell_arguments` parsed, after setting torch's
    threads and the allocator (its words in ``args.host_memory``; the model built and cached first when it is not
    yet)."""
    torch.set_num_threads(args.threads)
    args.host_memory = host_memory(args)
    base = load_checkpoint(build(args.model, args.cache))
    return base, build_protocol(base, args.digit, args.k, NEIGHBOURS, source=digits_source(args.model, args.cache))


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def reference_verdict(ref: dict[str, Any]) -> str:
    """", check pass, QD D_R +0.0001, holdout +0.50%" for a scored reference result ("" for an unscored one)."""
    scores = ref.get("scores")
    if scores is None:
        return ""
    check = "pass" if scores["evaluate_passed"] else "FAIL"
    return (f", check {check}, QD D_R {scores['qd_remember']:+.4f}, "
            f"holdout {100 * scores['holdout_bpd_change']:+.2f}%")


def ratio_text(tame_row: dict[str, Any], ref: dict[str, Any] | None) -> str:
    """tame's wall seconds / the authors' loop's, or why there is none: a reference that stopped early with its
    check failing (its stop measured a model it had broken, as on the rosinality Glow) timed no result."""
    if ref is None:
        return "–"
    scores = ref.get("scores")
    if ref["converged"] and scores is not None and not scores["evaluate_passed"]:
        return f"– (reference broke the model by it. {ref['iterations']})"
    return f"{tame_row['total_seconds'] / ref['total_seconds']:.2f}"


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The zoo table as Markdown: one line per model x k."""
    header = ("| model | k | converged | iters | wall s | s/it | roll-backs | QD D_F | QD D'_F | QD D_R | "
              "QD D_R^NN | QD holdout | holdout ΔBPD | evaluate --check | reference (800 it.) | ratio |")
    lines = [header, "|" + " --- |" * 3 + " ---: |" * 13]
    for r in rows:
        t = r["tame"]
        ref = r.get("reference")
        stop = "no stop" if ref is None or not ref["converged"] else f"stopped at {ref['iterations']}"
        ref_text = "not run" if ref is None else f"{ref['total_seconds']:.0f} s, {stop}{reference_verdict(ref)}"
        ratio = ratio_text(t, ref)
        if "aborted" in t:
            lines.append(f"| {r['model']} | {r['k']} | aborted at it. {t['iterations']}: {t['abort_reason']} | "
                         f"{t['iterations']} | {t['total_seconds']:.0f} | – | "
                         f"{_fmt(reductions_in(t['aborted']), 'd')} | – | – | – | – | – | – | "
                         f"no output | {ref_text} | {ratio} |")
            continue
        check = "pass" if t["evaluate_passed"] else "FAIL: " + ", ".join(t["failed_checks"])
        lines.append(
            f"| {r['model']} | {r['k']} | {'yes' if t['converged'] else 'no'} | {t['iterations']} | "
            f"{t['total_seconds']:.0f} | {t['seconds_per_iteration']:.2f} | {t['lr_reductions']} | "
            f"{t['qd_forget']:.3f} | {t['qd_forget_unseen']:.3f} | {t['qd_remember']:+.4f} | "
            f"{t['qd_neighbours']:+.4f} | {t['qd_holdout']:+.4f} | {100 * t['holdout_bpd_change']:+.2f}% | "
            f"{check} | {ref_text} | {ratio} |")
    return lines


def reference_key(sha256: str, digit: int, k: int, iters: int, threads: int, allocator: str) -> str:
    """The reference cache's key; ``allocator``: the results' host memory words (a run with glibc's malloc as it
    is gets its own entries: the authors' loop is slower there, docs/benchmarks.md "Round 14")."""
    plain = ":plain-malloc" if allocator.startswith("plain malloc") else ""
    return f"{sha256}:{digit}:{k}:{iters}:{threads}{plain}"


def fill_references(results: dict[str, Any], ref_cache: dict[str, Any], iters: int) -> None:
    """Rows without a reference result take the cached one for their model, k and the run's threads."""
    for row in results["rows"]:
        if row.get("reference") is None:
            key = reference_key(results["models"][row["model"]]["sha256"], results["digit"], row["k"], iters,
                                results["threads"], results.get("host_memory", "freed memory retained"))
            row["reference"] = ref_cache.get(key)


def print_results(results: dict[str, Any]) -> None:
    print(f"\n{results.get('label') or 'zoo'}: {results.get('date')}, preset {results.get('preset')}, "
          f"override {json.dumps(results['override'])}, {results.get('machine')}\ncommand: {results.get('command')}")
    print("\n| model | arch | parameters | train BPD | holdout BPD | train s | recipe |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for info in results["models"].values():
        wall = "–" if info.get("train_wall_s") is None else f"{info['train_wall_s']:.0f}"
        print(f"| {info['name']} | {info['architecture']} | {info['parameters']:,} | {info['train_bpd']:.4f} | "
              f"{info['holdout_bpd']:.4f} | {wall} | {info['recipe']} |")
    print()
    for line in table_lines(results["rows"]):
        print(line)
    print(f"\nwall s: the tame() call (setup, loop, its final evaluation); s/it: the loop's seconds per iteration; "
          f"roll-backs: learning-rate halvings after a roll-back (report lr_reductions); QD and holdout ΔBPD from "
          f"the written checkpoint, evaluation noise seed 0; evaluate --check: `flowtame evaluate --neighbours "
          f"{NEIGHBOURS} --check`'s checks, default tolerances; reference: the authors' loop, {REFERENCE_ITERS} "
          f"iterations at most; ratio = tame wall / reference wall. Zoo run time "
          f"{results.get('total_seconds', 0):.0f} s.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every model x k in ``args``: rows appended to the results (written to ``args.json`` after each row)."""
    results: dict[str, Any] = {
        "label": args.label, "preset": args.preset, "override": args.override, "digit": args.digit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}, {args.host_memory}",
        "threads": torch.get_num_threads(), "host_memory": args.host_memory, "command": " ".join(sys.argv),
        "models": {}, "rows": []}
    if args.resume and args.json and args.json.exists():
        previous = load_json(args.json)
        results.update(models=previous["models"], rows=[r for r in previous["rows"] if not interrupted(r)],
                       date=previous["date"],
                       total_seconds=previous.get("total_seconds", 0))
    done = {(row["model"], row["k"]) for row in results["rows"]}
    ref_cache = load_json(args.reference_cache)
    start = time.perf_counter() - results.get("total_seconds", 0)
    with tempfile.TemporaryDirectory(prefix="flowtame-zoo-") as workdir:
        for name in args.models:
            path = build(name, args.cache)
            results["models"][name] = describe(name, args.cache)
            base = load_checkpoint(path)
            for k in (k for k in args.ks if (name, k) not in done):
                key = reference_key(base.sha256, args.digit, k, args.reference_iters, results["threads"],
                                    args.host_memory)
                if args.reference_only and (k not in args.reference_ks or key in ref_cache):
                    continue
                proto = build_protocol(base, args.digit, k, NEIGHBOURS, source=digits_source(name, args.cache))
                if not args.reference_only:
                    print(f"{name}, k = {k}: tame ...", end="", flush=True)
                    row = {"model": name, "k": k, "tame": tame_row(base, proto, args.override, Path(workdir),
                                                                    args.preset)}
                    t = row["tame"]
                    print(f" {t.get('abort_reason') or ('converged' if t['converged'] else 'no stop')}, "
                          f"{t['iterations']} it., {t['total_seconds']:.0f} s", flush=True)
                if not args.skip_reference and k in args.reference_ks and key not in ref_cache:
                    print(f"{name}, k = {k}: reference loop ...", end="", flush=True)
                    ref_cache[key] = {**reference_row(base, proto, args.reference_iters),
                                      "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
                    write_json(args.reference_cache, ref_cache)
                    print(f" {ref_cache[key]['total_seconds']:.0f} s, {ref_cache[key]['iterations']} it."
                          f"{reference_verdict(ref_cache[key])}", flush=True)
                if args.reference_only:
                    continue
                row["reference"] = None if args.skip_reference else ref_cache.get(key)
                results["rows"].append(row)
                results["total_seconds"] = time.perf_counter() - start
                if args.json:
                    write_json(args.json, results)
    return results


def interrupted(row: dict[str, Any]) -> bool:
    """A row an older version of this script wrote for a stopped run (an "aborted" row whose message is the
    engine's "interrupted ..."): ``--resume`` runs its cell again."""
    return str(row["tame"].get("aborted", "")).startswith("interrupted")


def stop_on_signals() -> None:
    """SIGINT raises KeyboardInterrupt even where the shell started the run with it ignored (``nohup ... &``: a
    ``kill -INT`` should still stop it, as the engine's loop does); SIGTERM and SIGHUP raise :class:`StopSignal`
    (a KeyboardInterrupt) unless ignored (SIGHUP under nohup stays ignored). Inside tame()'s loop the engine's
    own handlers turn any of them into a clean stop (InterruptedRun)."""

    def interrupt(signum, frame) -> None:  # noqa: ANN001 - the signal-handler signature
        raise StopSignal(signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in stop_signals():
        if sig != signal.SIGINT and signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, interrupt)


def run_or_exit(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run`, with a stop request (Ctrl-C, SIGTERM, SIGHUP) ending the process with one line on stderr
    and exit status 128 + the signal's number; ``--json`` then holds every finished row."""
    try:
        return run(args)
    except (KeyboardInterrupt, InterruptedRun) as exc:
        signum = exc.signum if isinstance(exc, InterruptedRun) else signal_number(exc)
        kept = f"; the finished rows are in {args.json}, --resume runs the rest" if args.json else ""
        print(f"\nzoo: interrupted by {signal.Signals(signum).name}{kept}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="sizes of D_F [1 4 8 15]")
    parser.add_argument("--digit", type=int, default=3, help="the class playing the identity [3]")
    parser.add_argument("--override", type=json.loads, default={},
                        help="JSON of TameConfig keys merged over the package's defaults, e.g. '{\"lr\": 1e-4}'")
    parser.add_argument("--preset", default=None, help="start from a shipped preset (paper) instead of the defaults")
    parser.add_argument("--label", default=None, help="a name for this run (printed and kept in the JSON)")
    parser.add_argument("--skip-reference", action="store_true", help="no reference loop, not even cached ones")
    parser.add_argument("--reference-ks", type=int, nargs="+", default=[4, 15],
                        help="run the reference loop at these k only (cached results are shown for any k) [4 15]")
    parser.add_argument("--reference-only", action="store_true",
                        help="only run (and cache) the reference loops of --models x --reference-ks not cached yet")
    parser.add_argument("--reference-iters", type=int, default=REFERENCE_ITERS)
    add_malloc_argument(parser)
    parser.add_argument("--reference-cache", type=Path, default=DEFAULT_CACHE / "reference.json")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the zoo models are cached")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write every row here (after each row)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --json and run only the missing model x k pairs")
    parser.add_argument("--print", type=Path, default=None, metavar="JSON",
                        help="only re-print the tables of a --json file (with cached reference results unless "
                             "--skip-reference)")
    args = parser.parse_args()
    if args.print:
        results = json.loads(args.print.read_text())
        if not args.skip_reference:
            fill_references(results, load_json(args.reference_cache), args.reference_iters)
        print_results(results)
        return
    torch.set_num_threads(args.threads)
    args.host_memory = host_memory(args)
    stop_on_signals()
    print_results(run_or_exit(args))


if __name__ == "__main__":
    main()
