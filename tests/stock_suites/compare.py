"""Runs stock's saving tests twice, on stock and routed through kerassave_fast, and diffs them.

    .venv/bin/python tests/stock_suites/compare.py                       # every file of both suites
    .venv/bin/python tests/stock_suites/compare.py tf_keras/save_test.py -- -k h5
    .venv/bin/python tests/stock_suites/compare.py --reuse               # re-read the last run's XML
    .venv/bin/python tests/stock_suites/compare.py --ksf-path /tmp/ksf_head/python   # another build

Each test file runs in its own pytest process per mode (as upstream runs each file as its own
bazel target), niced, one at a time, with `--junitxml` into --out. Printed: per file the counts and
wall time of both runs, then the tests that pass on stock and fail routed, grouped by exception and
message, with where they failed; then the tests that fail on stock too (count) and any that fail
on stock but pass routed. Exit status 1 if any test passes on stock and fails routed.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = pathlib.Path(__file__).resolve().parent
FILES = (
    "keras3/saving_api_test.py",
    "tf_keras/save_test.py",
    "tf_keras/save_weights_test.py",
    "tf_keras/saved_model_test.py",
    "tf_keras/saving_lib_test.py",
)
MODES = ("stock", "routed")
_CRASH = re.compile(r"^(\S+?):(\d+):(?: in \w+| \w[\w.]*)$")


def run(file: str, mode: str, out: pathlib.Path, ksf_path: str | None, extra: list[str]) -> float:
    env = dict(os.environ)
    env.pop("KSF_ROUTE", None)
    if mode == "routed":
        env["KSF_ROUTE"] = "1"
    if ksf_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ksf_path, env.get("PYTHONPATH")) if p)
    stem = f"{file.replace('/', '__')[:-3]}.{mode}"
    cmd = ["nice", "-n", "10", sys.executable, "-m", "pytest", str(HERE / file), "-q"]
    cmd += [f"--junitxml={out / (stem + '.xml')}", *extra]
    print(f"running {file} ({mode}) ...", end=" ", flush=True)
    start = time.monotonic()
    with open(out / f"{stem}.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    elapsed = time.monotonic() - start
    (out / f"{stem}.time").write_text(f"{elapsed:.1f}\n")
    print(f"exit {rc}, {elapsed:.0f} s (log: {out / (stem + '.log')})")
    return elapsed


def results(path: pathlib.Path) -> dict[str, tuple[str, str, str]]:
    """test id -> (outcome, message, crash location)."""
    out = {}
    if not path.exists():
        return out
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, message, where = "passed", "", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is None:
                continue
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
            message = (child.get("message") or "").strip()
            frames = [m for m in map(_CRASH.match, (child.text or "").splitlines()) if m]
            if frames:  # the last frame, and the deepest one in kerassave_fast if any
                where = f"{pathlib.Path(frames[-1].group(1)).name}:{frames[-1].group(2)}"
                ours = [m for m in frames if "kerassave_fast" in m.group(1)]
                if ours:
                    where += f", via {pathlib.Path(ours[-1].group(1)).name}:{ours[-1].group(2)}"
            break
        out[test] = (outcome, message, where)
    return out


def _signature(message: str) -> str:
    first = message.splitlines()[0] if message else "(no message)"
    first = re.sub(r"/[\w./+-]+", "<path>", first)
    first = re.sub(r"0x[0-9a-f]+|\b\d+\b", "N", first)
    return first[:200]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help=f"test files relative to tests/stock_suites (default: {FILES})")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "ksf-stock-suites")
    parser.add_argument("--modes", default="stock,routed", help="which runs to make (default: both)")
    parser.add_argument("--reuse", action="store_true", help="run nothing; diff the XML already in --out")
    parser.add_argument("--ksf-path", help="directory put first on PYTHONPATH (another kerassave_fast build)")
    parser.add_argument("--max-lines", type=int, default=3, help="message lines shown per group")
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1 :], argv[: argv.index("--")]
    args = parser.parse_args(argv)
    files = args.files or list(FILES)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.reuse:
        for file in files:
            for mode in args.modes.split(","):
                run(file, mode, args.out, args.ksf_path, extra)

    regressions = collections.defaultdict(list)  # signature -> [(file, test, message, where)]
    stock_failures = collections.Counter()
    fixed = []
    print()
    for file in files:
        stem = file.replace("/", "__")[:-3]
        runs = {mode: results(args.out / f"{stem}.{mode}.xml") for mode in MODES}
        times = {}
        for mode in MODES:
            t = args.out / f"{stem}.{mode}.time"
            times[mode] = t.read_text().strip() + " s" if t.exists() else "?"
        line = []
        for mode in MODES:
            counts = collections.Counter(outcome for outcome, _, _ in runs[mode].values())
            line.append(f"{mode}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f" ({times[mode]})")
        print(f"== {file}: " + "; ".join(line))
        for test, (outcome, _message, _where) in runs["stock"].items():
            routed = runs["routed"].get(test)
            if outcome in ("failed", "error"):
                stock_failures[file] += 1
                if routed is not None and routed[0] == "passed":
                    fixed.append((file, test))
                continue
            if outcome == "passed" and routed is not None and routed[0] in ("failed", "error"):
                regressions[_signature(routed[1])].append((file, test, routed[1], routed[2]))
        missing = set(runs["stock"]) ^ set(runs["routed"])
        if missing and all(runs.values()):
            print(f"   {len(missing)} test(s) ran in only one mode, e.g. {sorted(missing)[:3]}")

    total = sum(len(v) for v in regressions.values())
    print(f"\nPass on stock, fail routed: {total}")
    for signature, cases in sorted(regressions.items(), key=lambda kv: -len(kv[1])):
        print(f"\n-- {len(cases)} x {signature}")
        message = cases[0][2]
        for extra_line in message.splitlines()[1 : args.max_lines]:
            print(f"     {extra_line}")
        for file, test, _, where in cases:
            print(f"   {file}::{test}" + (f"  [{where}]" if where else ""))
    print(f"\nFail on stock too: {sum(stock_failures.values())} " + str(dict(stock_failures)))
    if fixed:
        print(f"Fail on stock, pass routed: {len(fixed)}")
        for file, test in fixed:
            print(f"   {file}::{test}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
