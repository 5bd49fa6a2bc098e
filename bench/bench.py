#!/usr/bin/env python3
"""Benchmarks for lore-service's performance targets, as ratios against a
bare `python -c pass` measured in the same run (the machines are noisy).

    python bench/bench.py            # all four, prints a table and JSON
    python bench/bench.py --quick    # fewer repetitions, smaller files
    python bench/bench.py --only status,history   # some of them

Targets (issue 2): `status --json` median <= 3x `python -c pass`; a run's own
overhead with four no-op stages <= 150 ms beyond the stages; `logs --tail 100`
on a 1 GiB log within 1.5x of a 1 MiB log; peak RSS of `run` < 40 MiB while a
stage prints 500 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "lore_service.py"
FAKE_LORE = ROOT / "tests" / "fake_lore.py"
PY = sys.executable


def timed(argv: list[str], env: dict[str, str], cwd: Path, reps: int) -> float:
    """Median wall time in ms, runs interleaved by the caller for fairness."""
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def interleaved(
    cases: dict[str, list[str]], env: dict[str, str] | None, cwd: Path | None, reps: int
) -> dict[str, float]:
    """Median wall time in ms of each case, run round by round (None: this process's env and folder)."""
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, argv in cases.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            samples[name].append((time.perf_counter() - start) * 1000)
    return {k: statistics.median(v) for k, v in samples.items()}


def ms_and_ratios(medians: dict[str, float], base: str = "python -c pass", show_base: bool = True) -> dict[str, float]:
    """Each case's median in ms (the baseline's first, unless another bench shows it),
    then each other case's ratio to the baseline."""
    others = {k: v for k, v in medians.items() if k != base}
    return {
        **({f"{base} ms": round(medians[base], 1)} if show_base else {}),
        **{f"{k} ms": round(v, 1) for k, v in others.items()},
        **{f"{k} ratio": round(v / medians[base], 2) for k, v in others.items()},
    }


def setup(tmp: Path) -> tuple[dict[str, str], Path, str]:
    bindir = tmp / "bin"
    bindir.mkdir()
    lore = bindir / "lore"
    lore.write_text(f"#!/bin/sh\nexec '{PY}' '{FAKE_LORE}' \"$@\"\n")
    lore.chmod(0o755)
    project = tmp / "project"
    project.mkdir()
    env = {
        **os.environ,
        "LORE_SERVICE_HOME": str(tmp / "home"),
        "GITLAB_TOKEN": "glpat-bench",
        "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
    }
    out = subprocess.run(
        [PY, str(SCRIPT), "--json", "install", "--backend", "none", "--profile", "full"],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    )
    sid = json.loads(out.stdout)["data"]["service_id"]
    subprocess.run([PY, str(SCRIPT), "trigger"], env=env, cwd=project, capture_output=True, check=True)
    return env, project, sid


def user_install(tmp: Path) -> Path:
    """A clean venv with a regular (not editable) `pip install .`, as a user
    gets it: an editable install adds an import hook to every interpreter
    start, which would inflate the `python -c pass` baseline."""
    venv = tmp / "user-venv"
    subprocess.run([PY, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return venv


def bench_status(tmp: Path, env: dict[str, str], project: Path, reps: int) -> dict[str, float]:
    venv = user_install(tmp)
    py = str(venv / "bin" / "python")
    exe = str(venv / "bin" / "lore-service")
    cases = {
        "python -c pass": [py, "-c", "pass"],
        # the installed command: its module's bytecode is cached
        "lore-service status --json": [exe, "status", "--json"],
        "lore-service --version": [exe, "--version"],
        "lore-service status": [exe, "status"],  # the screen: colour decisions, the history strip
        "lore-service history": [exe, "history"],
        # the floor: the two stdlib modules every command needs
        "python -c 'import json, argparse'": [py, "-c", "import json, argparse"],
        # what the records would add as stdlib dataclasses (section 1a says why they are not)
        "python -c 'import json, argparse, dataclasses'": [py, "-c", "import json, argparse, dataclasses"],
        # a script handed to python is compiled on every start (never cached)
        "python lore_service.py status --json": [py, str(SCRIPT), "status", "--json"],
    }
    return ms_and_ratios(interleaved(cases, env, project, reps))


def bench_history(tmp: Path, env: dict[str, str], project: Path, reps: int) -> dict[str, float]:
    """`status` and `history` once status.json holds a full history (HISTORY_LIMIT
    runs of four stages): what keeping that many costs every read."""
    venv = tmp / "user-venv"
    if not venv.exists():
        user_install(tmp)
    py, exe = str(venv / "bin" / "python"), str(venv / "bin" / "lore-service")
    sys.path.insert(0, str(ROOT))
    from lore_service import HISTORY_LIMIT

    for _ in range(HISTORY_LIMIT):
        subprocess.run([PY, str(SCRIPT), "trigger"], env=env, cwd=project, capture_output=True, check=True)
    status_json = Path(env["LORE_SERVICE_HOME"]) / "state"
    size = sum(p.stat().st_size for p in status_json.glob("*/status.json"))
    cases = {
        "python -c pass": [py, "-c", "pass"],
        "full history: lore-service status --json": [exe, "status", "--json"],
        "full history: lore-service status": [exe, "status"],
        "full history: lore-service history": [exe, "history"],
        "full history: lore-service history --json": [exe, "history", "--json"],
    }
    return {
        "full history: status.json bytes": size,
        **ms_and_ratios(interleaved(cases, env, project, reps), show_base=False),
    }


def bench_run_overhead(env: dict[str, str], project: Path, sid: str, reps: int) -> dict[str, float]:
    config = Path(env["LORE_SERVICE_HOME"]) / "config" / sid / "service.toml"
    text = config.read_text()
    true = shutil.which("true") or "/bin/true"
    import tomllib

    import tomli_w

    doc = tomllib.loads(text)
    for stage in doc["stages"].values():
        stage["command"] = [true]
    config.write_text(tomli_w.dumps(doc))
    overheads = []
    for _ in range(reps):
        start = time.perf_counter()
        out = subprocess.run(
            [PY, str(SCRIPT), "--json", "trigger"], env=env, cwd=project, capture_output=True, text=True, check=True
        )
        wall = (time.perf_counter() - start) * 1000
        stages = sum(s["duration_ms"] for s in json.loads(out.stdout)["data"]["run"]["stage_results"])
        overheads.append(wall - stages)
    base = timed([PY, "-c", "pass"], env, project, reps)
    config.write_text(text)
    return {
        "run overhead beyond 4 no-op stages ms (incl. interpreter start)": round(statistics.median(overheads), 1),
        "python -c pass ms (run overhead baseline)": round(base, 1),
        "run overhead minus interpreter start ms": round(statistics.median(overheads) - base, 1),
    }


def bench_tail(tmp: Path, big_bytes: int, reps: int) -> dict[str, float]:
    line = b"2026-11-28T00:00:00.000Z [issues] " + b"z" * 90 + b"\n"
    small, big = tmp / "small.log", tmp / "big.log"
    small.write_bytes(line * (1024 * 1024 // len(line)))
    chunk = line * (8 * 1024 * 1024 // len(line))
    with open(big, "wb") as fh:
        for _ in range(big_bytes // len(chunk)):
            fh.write(chunk)
    code = "import sys, lore_service as ls; ls.tail_lines(sys.argv[1], 100)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    medians = interleaved({"1 MiB": [PY, "-c", code, str(small)], "big": [PY, "-c", code, str(big)]}, env, tmp, reps)
    size = big.stat().st_size
    big.unlink()
    return {
        "tail 100 on 1 MiB ms": round(medians["1 MiB"], 1),
        f"tail 100 on {size / 2**30:.2f} GiB ms": round(medians["big"], 1),
        "tail ratio big/small": round(medians["big"] / medians["1 MiB"], 2),
    }


def bench_rss(env: dict[str, str], project: Path, megabytes: int) -> dict[str, float]:
    (project / ".fake-lore.json").write_text(json.dumps({"issues": {"print_mb": megabytes}}))
    proc = subprocess.Popen(
        [PY, str(SCRIPT), "--json", "trigger"],
        env=env,
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peak = 0
    start = time.perf_counter()
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                for row in fh:
                    if row.startswith("VmHWM:"):
                        peak = max(peak, int(row.split()[1]))
        except FileNotFoundError:
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    (project / ".fake-lore.json").unlink()
    return {
        f"peak RSS of run while a stage prints {megabytes} MB (MiB)": round(peak / 1024, 1),
        "that run's wall time s": round(seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--only", default="status,run,tail,rss,history", help="comma-separated: %(default)s")
    args = parser.parse_args()
    only = set(args.only.split(","))
    reps = 7 if args.quick else 30
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as raw:
        tmp = Path(raw)
        env, project, sid = setup(tmp)
        results: dict[str, float] = {}
        if "status" in only:
            results.update(bench_status(tmp, env, project, reps))
        if "run" in only:
            results.update(bench_run_overhead(env, project, sid, max(5, reps // 3)))
        if "tail" in only:
            results.update(bench_tail(tmp, (64 if args.quick else 1024) * 1024 * 1024, reps))
        if "rss" in only:
            results.update(bench_rss(env, project, 50 if args.quick else 500))
        if "history" in only:  # last: it fills the history the others would read
            results.update(bench_history(tmp, env, project, reps))
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
