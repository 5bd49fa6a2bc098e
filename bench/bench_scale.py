#!/usr/bin/env python3
"""`status --all` at scale on the real systemd user manager (issue 12.6).

    sudo python bench/bench_scale.py [--services 40,200] [--rounds 15] [--compare main]

Starts a private `systemd --user` for a test user of its own through
tests/harness (as the end-to-end tests do; it needs root, and the user and
everything it holds are deleted at the end), pip-installs lore-service from
this tree into a venv of that user (and, with --compare REV, the
lore_service.py of that git revision into a second venv), installs services
on the user manager with `lore-service install --backend systemd` up to each
count of --services, waits until no timer fires soon and no run is going on,
then measures, interleaved round by round in the same run (only ratios are
compared; the figure is the median):

    python -c pass                                   the baseline (the same venv's python)
    lore-service status --all --json                 every service
    lore-service status --json --name <one>          one systemd service
    lore-service status --json --name <none>         one `--backend none` service among them

and how many commands each of them runs through the System seam (subprocesses:
systemctl calls). Targets: `status --all` of 200 services within 20x `python
-c pass`, one service's `status --json` within 3x (what bench/bench.py
measures, a service with no scheduler to ask: a systemd one also waits for
the two `systemctl` calls that describe it, one `show` of timer and service
and `list-timers`). Results go to bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import interleaved, ms_and_ratios

ROOT = Path(__file__).resolve().parent.parent
ALL_TARGET, ONE_TARGET = 20.0, 3.0
# every timer's next elapse at least this far ahead before measuring: no run during the rounds
QUIET_AHEAD_SECONDS = 15 * 60

# run as the test user: the number of commands `lore-service ARGV` runs through System
COUNT = r"""
import contextlib, io, sys
import lore_service as ls
calls = []
run = ls.System.run
def counted(self, argv, **kwargs):
    calls.append(list(argv))
    return run(self, argv, **kwargs)
ls.System.run = counted
with contextlib.redirect_stdout(io.StringIO()):
    ls.main(sys.argv[1:])
print(len(calls))
"""


# -- as the test user: the measurement itself ---------------------------------------------


def measure(config: dict) -> dict:
    """Interleaved rounds of every case; medians in ms, and each case's command count."""
    ms = interleaved(config["cases"], None, None, config["rounds"])
    counts = {}
    for name, (python, argv) in config["counts"].items():
        out = subprocess.run([python, "-c", COUNT, *argv], capture_output=True, text=True, check=True)
        counts[name] = int(out.stdout.split()[-1])
    return {"ms": ms, "commands": counts}


# -- as root: the machine -------------------------------------------------------------------


def source_tree(rev: str | None, dest: Path) -> Path:
    """What `pip install` needs of lore-service: this tree's, or a git revision's."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md", "lore_service.py"):
        if rev is None:
            shutil.copy(ROOT / name, dest / name)
        else:
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], capture_output=True, check=True)
            (dest / name).write_bytes(text.stdout)
    return dest


def chown_tree(um, path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, um.uid, um.gid, follow_symlinks=False)


def setup_user(um, compare: str | None) -> dict[str, Path]:
    """A venv per version, and the fake lore, all owned by the test user."""
    from harness.systemd_user import DEFAULT_PACKAGES

    home = um.home
    app = home / "bench"
    versions = {"new": None, **({"old": compare} if compare else {})}
    for name, rev in versions.items():
        source_tree(rev, app / f"src-{name}")
    shutil.copy(ROOT / "tests" / "fake_lore.py", app / "fake_lore.py")
    shutil.copy(Path(__file__), app / "bench_scale.py")
    shutil.copy(Path(__file__).with_name("bench.py"), app / "bench.py")  # its --measure imports it
    chown_tree(um, app)
    venvs = {}
    for name in versions:
        print(f"pip install lore-service ({name}) for {um.user}...", file=sys.stderr)
        python = um.ensure_venv(home / f"venv-{name}", packages=(*DEFAULT_PACKAGES, str(app / f"src-{name}")))
        venvs[name] = python.parent
    lore = app / "lore"
    lore.write_text(f"#!/bin/sh\nexec '{venvs['new'] / 'python'}' '{app / 'fake_lore.py'}' \"$@\"\n")
    lore.chmod(0o755)
    os.chown(lore, um.uid, um.gid)
    return {"app": app, "lore": lore, **{f"venv-{k}": v for k, v in venvs.items()}}


def install_one(um, where: dict[str, Path], project: Path, what: str, *argv: str) -> str:
    """`lore-service --json install ARGV` for `project`, as the test user; its service id."""
    um.run_as(["mkdir", "-p", str(project)], check=True)
    exe = str(where["venv-new"] / "lore-service")
    argv = (exe, "--json", "install", *argv, "--lore", str(where["lore"]), "--project", str(project))
    res = um.run_as(list(argv), extra_env={"GITLAB_TOKEN": "glpat-bench"}, timeout=120)
    if res.returncode != 0:
        raise SystemExit(f"{what} failed: {res.stdout}{res.stderr}")
    return json.loads(res.stdout)["data"]["service_id"]


def install_services(um, where: dict[str, Path], count: int) -> list[str]:
    """Services for projects s000, s001, ... up to `count` (those already there stay)."""
    exe = str(where["venv-new"] / "lore-service")
    for i in range(count):
        project = um.home / "projects" / f"s{i:03d}"
        if not project.exists():
            install_one(um, where, project, f"install {i}", "--backend", "systemd", "--interval", "24h")
            if (i + 1) % 20 == 0:
                print(f"  {i + 1} services installed", file=sys.stderr)
    listed = um.run_as([exe, "--json", "list"], timeout=120)
    return [row["service_id"] for row in json.loads(listed.stdout)["data"]["services"] if row["backend"] == "systemd"]


def install_unscheduled(um, where: dict[str, Path]) -> str:
    """One `--backend none` service: its `status` asks no scheduler."""
    return install_one(um, where, um.home / "projects" / "unscheduled", "install --backend none", "--backend", "none")


def wait_until_quiet(um) -> float:
    """Until no lore-sync run is going on and no timer fires within QUIET_AHEAD_SECONDS
    (a fresh manager fires each timer 5 to 10 minutes after it started)."""
    start = time.monotonic()
    while True:
        timers = json.loads(um.systemctl("list-timers", "--all", "--output=json", "lore-sync-*").stdout or "[]")
        busy = um.systemctl("list-units", "--no-legend", "--state=activating,active", "lore-sync-*.service").stdout
        now_us = time.time() * 1e6
        soon = [t for t in timers if t.get("next") and t["next"] < now_us + QUIET_AHEAD_SECONDS * 1e6]
        if not busy.strip() and not soon:
            return time.monotonic() - start
        if time.monotonic() - start > 20 * 60:
            raise SystemExit(f"still busy after 20 minutes: {len(soon)} timers due soon, running: {busy.strip()}")
        time.sleep(5)


def cases(where: dict[str, Path], sid: str, unscheduled: str) -> tuple[dict, dict]:
    python = str(where["venv-new"] / "python")
    timed: dict[str, list[str]] = {"python -c pass": [python, "-c", "pass"]}
    counted: dict[str, tuple[str, list[str]]] = {}
    for version in ("new", "old"):
        if f"venv-{version}" not in where:
            continue
        venv = where[f"venv-{version}"]
        timed[f"{version}: status --all --json"] = [str(venv / "lore-service"), "status", "--all", "--json"]
        for what, name in (("one", sid), ("one, backend none", unscheduled)):
            argv = ["status", "--json", "--name", name]
            timed[f"{version}: status --json ({what})"] = [str(venv / "lore-service"), *argv]
            counted[f"{version}: status --json ({what})"] = (str(venv / "python"), argv)
        counted[f"{version}: status --all --json"] = (str(venv / "python"), ["status", "--all", "--json"])
    return timed, counted


def bench_size(um, where: dict[str, Path], count: int, rounds: int, unscheduled: str) -> dict:
    sids = install_services(um, where, count)
    waited = wait_until_quiet(um)
    print(f"{len(sids)} services; waited {waited:.0f} s for the timers to be quiet; measuring...", file=sys.stderr)
    timed, counted = cases(where, sids[0], unscheduled)
    config = {"cases": timed, "counts": counted, "rounds": rounds}
    bench = str(where["app"] / "bench_scale.py")
    res = um.run_as([str(where["venv-new"] / "python"), bench, "--measure", json.dumps(config)], timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"measuring failed: {res.stderr}")
    got = json.loads(res.stdout)
    result: dict[str, float | int] = {"services": len(sids), **ms_and_ratios(got["ms"])}
    for name, n in got["commands"].items():
        result[f"{name} commands"] = n
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", default="40,200", help="counts to measure at, ascending (default 40,200)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--compare", metavar="REV", help="also measure lore_service.py of this git revision")
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the part that runs as the test user
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    from harness.systemd_user import UserManager

    um = UserManager.auto()
    if um.mode != "private":
        raise SystemExit("run as root: the bench installs hundreds of services on a private user manager of its own")
    reason = um.try_start()
    if reason is not None:
        raise SystemExit(f"no systemd user manager: {reason}")
    results = []
    try:
        where = setup_user(um, args.compare)
        unscheduled = install_unscheduled(um, where)
        for count in sorted(int(n) for n in args.services.split(",")):
            results.append(bench_size(um, where, count, args.rounds, unscheduled))
    finally:
        um.stop()
    for result in results:
        width = max(len(k) for k in result)
        print()
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    largest = results[-1]
    print(
        f"\ntargets: status --all of {largest['services']} services {largest['new: status --all --json ratio']}x "
        f"(<= {ALL_TARGET:.0f}x); one service {largest['new: status --json (one, backend none) ratio']}x "
        f"(<= {ONE_TARGET:.0f}x), one systemd service {largest['new: status --json (one) ratio']}x"
    )
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
