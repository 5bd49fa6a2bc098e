#!/usr/bin/env python3
"""Start-up of the frozen layouts, as ratios of a bare `python -c pass`.

    python bench/bench_frozen.py [--build] [--rounds 21] [--json]

Measures, interleaved round by round in the same run (this machine is noisy,
so only ratios within one run are compared; the figure is the median):

    python -c pass                       the baseline (a bare venv of this interpreter)
    <layout> status --json               a real status read of an installed service
    <layout> --version
    source: python lore_service.py status --json   (for reference)
    zipapp: python lore-service-<version>.pyz status --json   (when built)

for the one-folder build (dist/lore-service/lore-service, what the scheduler
and `status` run) and the one-file build (dist/onefile/lore-service). `--build`
first runs `build.py` for a layout that is missing. Also reports sizes: the
one-folder tree, its .tar.gz download, the one-file binary. The budget from
issue 6: the copy the scheduler and `status` run starts within 8x a bare
`python -c pass` for `status --json`. Results go to bench/results/frozen.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXE = ".exe" if os.name == "nt" else ""
LAYOUTS = {
    "onedir": os.path.join(ROOT, "dist", "lore-service", "lore-service" + EXE),
    "onefile": os.path.join(ROOT, "dist", "onefile", "lore-service" + EXE),
}
BUDGET = 8.0


def tree_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def timed(argv: list[str], env: dict[str, str], cwd: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {argv} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-400:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--build", action="store_true", help="build missing layouts with build.py first")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for layout, exe in LAYOUTS.items():
        if not os.path.exists(exe):
            if not args.build:
                raise SystemExit(f"error: {exe} is missing; run `python build.py --layout {layout}` or pass --build")
            subprocess.run([sys.executable, os.path.join(ROOT, "build.py"), "--layout", layout], check=True)
    work = tempfile.mkdtemp(prefix="lore-bench-")
    # the baseline is a bare venv: the base interpreter's own site-packages may
    # carry .pth hooks (this machine's adds ~20 ms to every start) that a
    # frozen binary never runs, and that would flatter every ratio
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", os.path.join(work, "venv")], check=True)
    python = os.path.join(work, "venv", "bin", "python")
    project = os.path.join(work, "project")
    os.mkdir(project)
    lore = "/bin/true" if os.path.exists("/bin/true") else python
    env = {
        **os.environ,
        "LORE_SERVICE_HOME": os.path.join(work, "home"),
        "GITLAB_TOKEN": "bench-token",
        "PYINSTALLER_RESET_ENVIRONMENT": "1",
    }
    onedir = LAYOUTS["onedir"]
    for step in (["install", "--backend", "none", "--lore", lore], ["trigger"]):
        subprocess.run([onedir, *step], env=env, cwd=project, check=True, capture_output=True)

    cases: dict[str, list[str]] = {"python -c pass": [python, "-c", "pass"]}
    for layout, exe in LAYOUTS.items():
        cases[f"{layout} status --json"] = [exe, "status", "--json"]
        cases[f"{layout} --version"] = [exe, "--version"]
    source_python = os.path.join(ROOT, ".venv", "bin", "python")
    if os.path.exists(source_python):
        cases["source status --json"] = [source_python, os.path.join(ROOT, "lore_service.py"), "status", "--json"]
    pyz = sorted(f for f in os.listdir(os.path.join(ROOT, "dist")) if f.endswith(".pyz"))
    if pyz:  # python build.py --zipapp; run by the bare interpreter, as its users would
        cases["zipapp status --json"] = [python, os.path.join(ROOT, "dist", pyz[-1]), "status", "--json"]
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(3):  # warm the page cache (and the one-file extraction path)
        for argv in cases.values():
            timed(argv, env, project)
    for _ in range(args.rounds):
        for name, argv in cases.items():
            times[name].append(timed(argv, env, project))
    base = statistics.median(times["python -c pass"])
    rows = []
    for name, values in times.items():
        med = statistics.median(values)
        rows.append({"case": name, "median_ms": round(med * 1000, 1), "ratio": round(med / base, 2)})
    sizes = {
        "onedir_folder_bytes": tree_size(os.path.dirname(onedir)),
        "onefile_bytes": tree_size(LAYOUTS["onefile"]),
    }
    archives = [f for f in os.listdir(os.path.join(ROOT, "dist")) if f.endswith((".tar.gz", ".zip"))]
    if archives:
        sizes["onedir_archive_bytes"] = tree_size(os.path.join(ROOT, "dist", sorted(archives)[-1]))
    ratio = next(r["ratio"] for r in rows if r["case"] == "onedir status --json")
    result = {
        "rounds": args.rounds,
        "python": python,
        "cpus": os.cpu_count(),
        "rows": rows,
        "sizes": sizes,
        "budget": BUDGET,
        "onedir_status_within_budget": ratio <= BUDGET,
    }
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "frozen.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'case':<28} {'median':>9} {'x python -c pass':>17}   ({args.rounds} rounds, {os.cpu_count()} cpus)")
        for r in rows:
            print(f"{r['case']:<28} {r['median_ms']:>7.1f}ms {r['ratio']:>16.2f}x")
        for k, v in sizes.items():
            print(f"{k:<28} {v / 1024 / 1024:>7.1f} MiB")
        print(f"onedir status --json within {BUDGET:g}x: {'yes' if ratio <= BUDGET else 'NO'}")
    return 0 if ratio <= BUDGET else 1


if __name__ == "__main__":
    sys.exit(main())
