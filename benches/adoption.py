"""What a training script sees, all in one run: background checkpoints (`blocking=False`), saves and
loads routed by `install()`, and the command line's `inspect`/`verify` against a load. Writes
benches/results/adoption.md.

    python benches/adoption.py [--units 4096] [--repeats 7] [--dirs /dev/shm,benches/scratch]
                               [--cli-units 8192]

Model: 4 x Dense(units) + Adam after one training step (the default model of `make bench`),
trained with batches of 8. Per directory, each repeat runs, in a shuffled order: a blocking save;
a background save with training steps run until its write is done; the same number of steps with
no save. Then `model.save` / `keras.saving.load_model` with `install()` and the same calls to ours
directly, in 2 x repeats + 1 back-to-back pairs (which runs first alternates), compared by the ratio
within each pair: on this VM a call that faults in memory the host took back pays several times
more, at random, which moved separate medians of the same code by up to 37 %. The command line is
measured on the file the issue names, 4 x Dense(cli-units) + Adam (8192: 3.2 GB), saved once per
directory: each repeat runs `inspect`, `verify` and our `load_model` of it in a shuffled order.
"""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import kerassave_fast as ksf
import measure
import report
from report import shown
from run import dense_model

MIB = 1 << 20


def blocked_budget(nbytes: int) -> float:
    """The issue's target for the training thread's wait: 5 ms + 1 ms per GB."""
    return 0.005 + 0.001 * nbytes / 1e9


def background_save(model, path: str, batch) -> dict:
    """A background save with training steps until its write is done: how long the call blocked,
    how long the write took, how many steps ran meanwhile."""
    done = threading.Event()
    start = time.perf_counter()
    handle = ksf.save_model(model, path, blocking=False)
    returned = time.perf_counter()
    finished: list[float] = []
    handle.add_done_callback(lambda _: (finished.append(time.perf_counter()), done.set()))
    steps = 0
    while not done.is_set():
        model.train_on_batch(*batch)
        steps += 1
    handle.result()
    end = time.perf_counter() - start
    return {"blocked": returned - start, "write": finished[0] - start, "steps": steps, "end": end}


def train(model, batch, steps: int) -> None:
    for _ in range(steps):
        model.train_on_batch(*batch)


def cli(*args: str) -> None:
    """The command line as a user runs it: a new process (its imports counted; `compile_package`)."""
    subprocess.run([sys.executable, "-m", "kerassave_fast", *args], check=True, capture_output=True)


def measure_directory(model, batch, directory: str, repeats: int, log) -> dict:
    path = os.path.join(directory, "ksf-bench-adoption.keras")
    nbytes = sum(a.nbytes for a in measure.model_arrays(model))
    background: list[dict] = []

    def installed(call):
        ksf.install()
        try:
            start = time.perf_counter()
            call()
            return time.perf_counter() - start
        finally:
            ksf.uninstall()

    step_count = 2

    def background_saved():
        nonlocal step_count
        background.append(background_save(model, path, batch))
        step_count = max(1, background[-1]["steps"])  # the steps that ran during the write
        return background[-1]["end"]

    ops = {
        "blocking save": lambda: measure.timed(lambda: ksf.save_model(model, path)),
        "background save": background_saved,
        "training steps alone": lambda: measure.timed(lambda: train(model, batch, step_count)),
    }
    routed = {  # (install()'s call, ours): the same code behind one more function call
        "save": (
            lambda: installed(lambda: model.save(path)),
            lambda: measure.timed(lambda: ksf.save_model(model, path)),
        ),
        "load": (
            lambda: installed(lambda: keras.saving.load_model(path)),
            lambda: measure.timed(lambda: ksf.load_model(path)),
        ),
    }
    try:
        samples = measure.interleaved(
            ops,
            repeats,
            lambda rep: log(f"  {directory}: repeat {rep + 1}/{repeats} done"),
            warmed=background.clear,
            backed=measure.backed_for(nbytes),
        )
        pairs = {
            name: measure.paired(*calls, 2 * repeats + 1, measure.backed_for(nbytes)) for name, calls in routed.items()
        }
        log(f"  {directory}: install() measured")
        rss = {
            "blocking save": measure.extra_peak_rss(lambda: ksf.save_model(model, path)),
            "background save + training": measure.extra_peak_rss(lambda: background_save(model, path, batch)),
            "training alone": measure.extra_peak_rss(lambda: train(model, batch, step_count)),
        }
    finally:
        if os.path.exists(path):
            os.unlink(path)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for key in ("blocked", "write", "steps"):
        medians[f"background {key}"] = statistics.median(b[key] for b in background)
    blocked = [b["blocked"] for b in background]
    for name, timed_pairs in pairs.items():
        medians[f"{name}, install()"] = statistics.median(i for i, _ in timed_pairs)
        medians[f"{name}, ours"] = statistics.median(o for _, o in timed_pairs)
    ratios = {name: sorted(i / o for i, o in timed_pairs) for name, timed_pairs in pairs.items()}
    return {
        "directory": directory,
        "nbytes": nbytes,
        "times": medians,
        "blocked": blocked,
        "rss": rss,
        "install ratios": ratios,
    }


def compile_package() -> None:
    """Compiles kerassave_fast's bytecode, as pip does when it installs a package: where
    PYTHONDONTWRITEBYTECODE is set (this machine's environment), each command would compile it again."""
    if not compileall.compile_dir(os.path.dirname(ksf.__file__), quiet=1):
        raise RuntimeError("kerassave_fast's bytecode could not be compiled (a read-only install?)")


def measure_cli(model, directory: str, repeats: int, log) -> dict:
    """Medians of `inspect`, `verify` and a load of `model` saved by us in `directory`."""
    path = os.path.join(directory, "ksf-bench-adoption-cli.keras")
    ops = {
        "load_model, ours": lambda: measure.timed(lambda: ksf.load_model(path)),
        "inspect (CLI)": lambda: measure.timed(lambda: cli("inspect", path)),
        "verify (CLI)": lambda: measure.timed(lambda: cli("verify", path)),
        "read (2 threads)": lambda: measure.timed(lambda: measure.raw_read_threads(path)),
    }
    try:
        ksf.save_model(model, path)
        compile_package()
        samples = measure.interleaved(ops, repeats, backed=measure.backed_for(os.path.getsize(path)))
        log(f"  {directory}: command line measured")
        nbytes = os.path.getsize(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return {"nbytes": nbytes, "times": {name: statistics.median(values) for name, values in samples.items()}}


def markdown(results: list[dict], info: dict, args) -> str:
    repeats, units = args.repeats, args.units
    lines = [
        f"{report.machine_line(info)}. "
        f"{info['date']}. 4 x Dense({units}) + Adam, batches of 8. Medians of {repeats} repeats, interleaved "
        f"in a shuffled order, all in one run. {report.BACKED}",
        "",
        "**Background saves** (`save_model(..., blocking=False)`): the training thread waits for the call "
        "(the variables are snapshotted, zero-copy) while the file is written on another thread and training "
        "steps run.",
        "",
        "| dir | MB | blocking save s | call blocked ms (min-max) | background write s | steps during the write "
        "| extra RSS MiB: blocking save / background save + training / the same training alone |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        t, rss = r["times"], r["rss"]
        lines.append(
            f"| `{shown(r['directory'])}` | {r['nbytes'] / 1e6:.0f} | {t['blocking save']:.3f} | "
            f"{t['background blocked'] * 1e3:.1f} ({min(r['blocked']) * 1e3:.1f}-{max(r['blocked']) * 1e3:.1f}) | "
            f"{t['background write']:.3f} | {t['background steps']:.0f} | "
            f"{rss['blocking save'] / MIB:.0f} / {rss['background save + training'] / MIB:.0f} / "
            f"{rss['training alone'] / MIB:.0f} |"
        )
    lines += [
        "",
        "The extra RSS of a background save is the copy-on-write pages: each variable that training "
        "assigns while the write still reads the old buffer gets a new one (compare with the training alone).",
        "",
        "**`install()`** (stock's `model.save` and `keras.saving.load_model` routed through kerassave_fast, "
        "against calling ours directly; medians of back-to-back pairs, which runs first alternating, and the "
        "ratio within each pair)",
        "",
        "| dir | call | install() s | ours s | install() / ours within a pair: median (min-max) |",
        "|---|---|--:|--:|--:|",
    ]
    calls = {"save": "`model.save` / `save_model`", "load": "`keras.saving.load_model` / `load_model`"}
    for r in results:
        t = r["times"]
        for name, call in calls.items():
            ratios = r["install ratios"][name]
            lines.append(
                f"| `{shown(r['directory'])}` | {call} | {t[f'{name}, install()']:.3f} | {t[f'{name}, ours']:.3f} | "
                f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) |"
            )
    lines += [
        "",
        f"**The command line** on a {results[0]['cli']['nbytes'] / 1e9:.1f} GB `.keras` "
        f"(4 x Dense({args.cli_units}) + Adam, saved by us; a new process each, its imports included, "
        "kerassave_fast's bytecode compiled as pip compiles it when it installs the package), "
        "against our `load_model` of the same file in this process. `verify` checks the CRC of every byte: "
        "below it, two threads of this process reading every byte into reused 1 MiB buffers, nothing checked "
        "(a copying load reads every byte too, checking the CRC as it goes)",
        "",
        "| dir | GB | load_model, ours s | inspect s | verify s | every byte read, 2 threads s |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        c = r["cli"]
        t = c["times"]
        lines.append(
            f"| `{shown(r['directory'])}` | {c['nbytes'] / 1e9:.2f} | {t['load_model, ours']:.3f} | "
            f"{t['inspect (CLI)']:.3f} | {t['verify (CLI)']:.3f} | {t['read (2 threads)']:.3f} |"
        )
    checks = []
    for r in results:
        t, t_cli, where = r["times"], r["cli"]["times"], shown(r["directory"])
        budget = blocked_budget(r["nbytes"])
        checks += [
            (f"`{where}`: call blocked ≤ {budget * 1e3:.1f} ms (5 ms + 1 ms/GB)", t["background blocked"] <= budget),
            (f"`{where}`: training steps ran during the write", t["background steps"] >= 1),
            (
                f"`{where}`: `install()` save and load within 10 % of ours",
                all(statistics.median(ratios) <= 1.1 for ratios in r["install ratios"].values()),
            ),
            *(
                (f"`{where}`: {cmd} under half a load", t_cli[f"{cmd} (CLI)"] <= 0.5 * t_cli["load_model, ours"])
                for cmd in ("inspect", "verify")
            ),
        ]
    lines += ["", *report.target_rows(checks), "", report.versions_line(info)]
    return "\n".join(lines) + "\n"


def main() -> None:
    model = batch = cli_model = None

    def measure(args, directory):
        nonlocal model, batch, cli_model
        if model is None:
            model = dense_model(args.units)
            rng = np.random.default_rng(1)
            batch = tuple(rng.normal(size=(8, args.units)).astype("float32") for _ in range(2))
        result = measure_directory(model, batch, directory, args.repeats, report.log)
        if cli_model is None:
            cli_model = model if args.cli_units == args.units else dense_model(args.cli_units)
        result["cli"] = measure_cli(cli_model, directory, args.repeats, report.log)
        return result

    def options(parser):
        parser.add_argument("--cli-units", type=int, default=8192, help="the command line's model (8192: 3.2 GB)")

    report.each_directory(__doc__, 4096, 7, "adoption.md", measure, markdown, options)


if __name__ == "__main__":
    main()
