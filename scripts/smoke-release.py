#!/usr/bin/env python3
"""Smoke-test a release archive as a user gets it: unpacked into a scratch
folder, never run from the build tree.

    python scripts/smoke-release.py dist/lore-service-0.1.0-linux-x86_64.tar.gz \
        --expect-version 0.1.0 [--native BACKEND]

Checks, each from a fresh scratch folder (removed afterwards):
  1. `lore-service --version` (text and --json) is the expected version, frozen,
     with the commit and build date build.py baked in;
  2. `install --dry-run --backend none` in an empty project folder exits 0;
  3. with --native BACKEND (systemd, cron, launchd, schtasks): install on that
     scheduler, `trigger` a run (a stand-in `lore`, tests/fake_lore.py, answers),
     `status` shows it succeeded, `uninstall` removes the entry.

The release workflow runs it on every OS it builds for; tests/test_frozen.py
runs it on the Linux build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_LORE = os.path.join(ROOT, "tests", "fake_lore.py")
WINDOWS = sys.platform == "win32"


def fail(message: str) -> None:
    raise SystemExit(f"smoke test FAILED: {message}")


def unpack(archive: str, into: str) -> str:
    """Extract the archive; returns the lore-service executable inside it."""
    if archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")  # refuses absolute paths and links out of `into`
    exe = os.path.join(into, "lore-service", "lore-service" + (".exe" if WINDOWS else ""))
    if not os.path.isfile(exe):
        fail(f"{archive} holds no lore-service/{os.path.basename(exe)}")
    return exe


def fake_lore(bindir: str) -> None:
    """A `lore` on PATH that runs tests/fake_lore.py with this Python."""
    os.makedirs(bindir)
    if WINDOWS:
        with open(os.path.join(bindir, "lore.cmd"), "w", encoding="utf-8") as fh:
            fh.write(f'@"{sys.executable}" "{FAKE_LORE}" %*\r\n')
    else:
        path = os.path.join(bindir, "lore")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(f"#!/bin/sh\nexec '{sys.executable}' '{FAKE_LORE}' \"$@\"\n")
        os.chmod(path, 0o755)


def call(exe: str, *argv: str, env: dict[str, str], cwd: str, expect: int = 0) -> dict | str:
    proc = subprocess.run([exe, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    shown = " ".join(["lore-service", *argv])
    if proc.returncode != expect:
        fail(f"`{shown}` exited {proc.returncode}, expected {expect}\n{proc.stdout}{proc.stderr}")
    print(f"ok: {shown}", flush=True)
    return json.loads(proc.stdout)["data"] if "--json" in argv else proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive")
    parser.add_argument("--expect-version", required=True, help="the version the tag names (v prefix allowed)")
    parser.add_argument("--native", metavar="BACKEND", help="also install, trigger and uninstall on this scheduler")
    args = parser.parse_args()
    expected = args.expect_version.removeprefix("v")
    scratch = tempfile.mkdtemp(prefix="lore-smoke-")
    try:
        exe = unpack(os.path.abspath(args.archive), os.path.join(scratch, "download"))
        project = os.path.join(scratch, "project")
        os.makedirs(project)
        fake_lore(os.path.join(scratch, "bin"))
        env = {
            **os.environ,
            "PATH": os.path.join(scratch, "bin") + os.pathsep + os.environ.get("PATH", ""),
            "LORE_SERVICE_HOME": os.path.join(scratch, "home"),
            "GITLAB_TOKEN": "glpat-smoke-test-not-a-real-token",
        }
        info = call(exe, "--version", "--json", env=env, cwd=project)
        assert isinstance(info, dict)
        if info.get("version") != expected or info.get("frozen") is not True:
            fail(f"--version --json reports {info}, expected version {expected}, frozen")
        if not info.get("commit") or not info.get("build_date"):
            fail(f"--version --json has no commit or build date: {info}")
        text = call(exe, "--version", env=env, cwd=project)
        if not str(text).startswith(f"lore-service {expected} (frozen"):
            fail(f"--version says {text!r}")
        call(exe, "install", "--dry-run", "--backend", "none", env=env, cwd=project)
        if args.native:
            # the longest interval: the scheduler should not start a run of its own meanwhile
            native = ["--backend", args.native, "--interval", "24h"]
            install = call(exe, "--json", "install", *native, env=env, cwd=project)
            assert isinstance(install, dict)
            try:
                run = call(exe, "--json", "trigger", env=env, cwd=project)
                assert isinstance(run, dict)
                if run.get("skipped"):  # the scheduler's own run held the lock after all: judge that run
                    print(f"note: trigger skipped ({run.get('skip_reason')}); waiting for the scheduled run")
                    for _ in range(120):
                        status = call(exe, "--json", "status", env=env, cwd=project)
                        if isinstance(status, dict) and status.get("last_run"):
                            break
                        time.sleep(1)
                status = call(exe, "--json", "status", env=env, cwd=project)
                assert isinstance(status, dict)
                if (status.get("last_run") or {}).get("outcome") != "success":
                    fail(f"after trigger, status shows {status.get('last_run')}")
            finally:
                call(exe, "--json", "uninstall", env=env, cwd=project)
            call(exe, "--json", "status", env=env, cwd=project, expect=3)  # 3: not installed
            print(f"ok: {install['service_id']} installed on {args.native}, ran, uninstalled")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"smoke test passed: {os.path.basename(args.archive)} is lore-service {expected}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
