"""cron backend against the real Debian cron daemon (tests/harness/cron_daemon.py).

As root: install cron if needed, start the daemon (unless one runs), create an
unprivileged user of this run's own (`lore-cron-<random hex>`, so two runs of
the suite share the daemon but never a crontab), give it its own copy of
lore_service.py and fake_lore.py and a venv built from Debian's
/usr/bin/python3 (the test interpreter lives under /root, which that user
cannot read). Then:

1. the daemon itself fires an installed 5m entry and `status` records the run;
2. the installed line, run exactly as cron runs it (cron's `%` processing,
   cron's environment, `/bin/sh -c` in $HOME), works for paths with spaces,
   quotes, `$`, `%` and non-ASCII letters;
3. uninstall leaves the user's other crontab lines byte for byte.

No product knob shortens the wait: the service name is chosen so that its
per-service minute offset makes the 5m entry fire 20-80 s after install.
Skips when cron cannot be run here, except under LORE_E2E_REQUIRED=1 (CI).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import FAKE_LORE, SCRIPT
from harness import cron_daemon as cd

import lore_service as ls

pytestmark = pytest.mark.e2e

TOKEN = "glpat-cron-e2e-token"
SYSTEM_PYTHON = "/usr/bin/python3"
PACKAGES = ("platformdirs", "keyring", "tomli-w")
PIP_PASSTHROUGH = ("PIP_", "SSL_CERT_", "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
OTHERS = (
    "# my own jobs: lore-service must not touch these\n"
    'MAILTO=""\n'
    "\n"
    "17 3 * * * /bin/true  # keep me, trailing blanks too   \n"
    "0 5 * * 1 date +\\%F > /dev/null\n"
)


def unavailable(reason: str) -> None:
    if os.environ.get("LORE_E2E_REQUIRED") == "1":
        pytest.fail(f"cron e2e cannot run: {reason} (LORE_E2E_REQUIRED=1 makes this an error)")
    pytest.skip(f"cron e2e: {reason}")


@dataclass
class CronUser:
    name: str
    home: Path
    python: Path
    script: Path
    lore: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {**cd.user_env(self.name), "GITLAB_TOKEN": TOKEN, **extra}

    def tool(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return cd.run_as(self.name, [str(self.python), str(self.script), *args], env=self.env(), cwd=cwd)

    def json(self, *args: str) -> dict[str, Any]:
        res = self.tool("--json", *args)
        assert res.returncode == 0, f"{args}: {res.returncode}\n{res.stdout}\n{res.stderr}"
        return json.loads(res.stdout)["data"]

    def mkdir(self, path: Path) -> Path:
        cd.run_as(self.name, ["/bin/mkdir", "-p", str(path)], check=True)
        return path


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid)


def _ensure_venv(user: str, venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        res = cd.run_as(user, [SYSTEM_PYTHON, "-m", "venv", str(venv)], timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"venv creation failed: {res.stderr.strip()}")
    probe = "import sys, importlib.metadata as m; [m.version(p) for p in sys.argv[1:]]"
    if cd.run_as(user, [str(py), "-c", probe, *PACKAGES], timeout=60).returncode != 0:
        env = {**cd.user_env(user), **{k: v for k, v in os.environ.items() if k.startswith(PIP_PASSTHROUGH)}}
        res = cd.run_as(user, [str(py), "-m", "pip", "install", "--quiet", *PACKAGES], env=env, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"pip install {PACKAGES} failed: {res.stderr.strip()[-800:]}")
    return py


@pytest.fixture(scope="module")
def cron_user() -> Iterator[CronUser]:
    if not sys.platform.startswith("linux"):
        unavailable("needs Linux")
    reason = cd.ensure_cron_installed()
    if reason:
        unavailable(reason)
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        unavailable(f"{SYSTEM_PYTHON} is missing (the test user needs an interpreter it can read)")
    try:
        run = cd.begin_run()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        unavailable(str(exc))
    try:
        # a daemon that just started loaded the spool this very second: a crontab written
        # in the same second (mtime resolution) would go unseen until the next change
        time.sleep(1.1)
        user, uid, gid, home = run.user, run.uid, run.gid, run.home
        app = home / "app"
        app.mkdir(exist_ok=True)
        shutil.copy(SCRIPT, app / "lore_service.py")
        shutil.copy(FAKE_LORE, app / "fake_lore.py")
        _chown_tree(app, uid, gid)
        try:
            python = _ensure_venv(user, home / "venv")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            unavailable(str(exc))
        bindir = home / "bin"
        bindir.mkdir(exist_ok=True)
        lore = bindir / "lore"
        lore.write_text(f"#!/bin/sh\nexec '{python}' '{app / 'fake_lore.py'}' \"$@\"\n")
        lore.chmod(0o755)
        _chown_tree(bindir, uid, gid)
        yield CronUser(user, home, python, app / "lore_service.py", lore)
    finally:
        try:
            cd.remove_crontab(run.user)
        finally:
            cd.end_run(run)


def pick_name(prefix: str, step: int, ok) -> tuple[str, int]:
    """A service name whose cron entry next fires at a time `ok` accepts (ms from now)."""
    now = int(time.time() * 1000)
    for k in range(10_000):
        name = f"{prefix}-{k}"
        nxt = ls.cron_next_ms(ls.cron_expression(name, step), now)
        assert nxt is not None
        if ok(nxt - now):
            return name, nxt
    raise AssertionError("no service name fits")


def our_line(crontab: str, sid: str) -> str:
    lines = crontab.splitlines()
    i = lines.index(f"# BEGIN lore-service {sid}")
    assert lines[i + 2] == f"# END lore-service {sid}"
    return lines[i + 1]


def crontab_vars(crontab: str) -> dict[str, str]:
    found = {}
    for line in crontab.splitlines():
        m = re.match(r"\s*([A-Za-z_]\w*)\s*=\s*(.*)$", line)
        if m:
            value = m.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            found[m.group(1)] = value
    return found


def diagnostics(cu: CronUser, sid: str, extra: str = "") -> str:
    crash = cu.home / ".local/state/lore/log/services" / sid / "scheduler-output.log"
    return "\n".join(
        [
            extra,
            "crontab:\n" + cd.crontab_list(cu.name).stdout,
            "cron log:\n" + "\n".join([x for x in cd.cron_log(cu.name) if "LIST" not in x][-30:]),
            "crash log:\n" + (crash.read_text(errors="replace")[-2000:] if crash.exists() else "(none)"),
        ]
    )


@pytest.mark.slow
def test_daemon_runs_the_installed_entry(cron_user: CronUser) -> None:
    cu = cron_user
    cd.install_crontab(cu.name, OTHERS)
    project = cu.mkdir(cu.home / "projects" / "daemon")
    cd.avoid_reload_race()
    # fire at the first minute boundary at least 20 s away (20-80 s from now)
    name, fires_at = pick_name("cron-e2e", 300, lambda wait: 20_000 <= wait <= 80_000)
    started = time.monotonic()
    data = cu.json(
        "install", "--backend", "cron", "--interval", "5m", "--name", name, "--project", str(project),
        "--lore", str(cu.lore),
    )  # fmt: skip
    sid = data["service_id"]
    assert data["schedule_step_seconds"] == 300
    listed = cd.crontab_list(cu.name).stdout
    assert listed.startswith(OTHERS)
    assert our_line(listed, sid).startswith(ls.cron_expression(sid, 300) + " HOME=")

    status = cu.json("status", "--name", sid)
    sched = status["scheduler"]
    assert sched["registered"] and sched["active"] and sched["drift"] == [], sched
    assert sched["next_run_iso"] == ls.iso_from_ms(fires_at)

    doctor = cu.json("doctor", "--name", sid)
    daemon = next(c for c in doctor["checks"] if c["name"] == "cron daemon")
    assert daemon["status"] == "ok", doctor["checks"]

    deadline = time.monotonic() + (fires_at / 1000 - time.time()) + 90
    last = None
    while time.monotonic() < deadline:
        last = cu.json("status", "--name", sid)["last_run"]
        if last is not None and last.get("finished_at_iso") is not None:
            break
        time.sleep(2)
    assert last is not None, diagnostics(cu, sid, "the daemon never ran the entry")
    assert last["trigger"] == "scheduled", last
    assert last["outcome"] == "success", diagnostics(cu, sid, json.dumps(last, indent=1))
    calls = [json.loads(x) for x in (project / ".fake-lore-calls.jsonl").read_text().splitlines()]
    assert [c["stage"] for c in calls] == ["issues", "mrs", "docs"]
    assert all(c["cwd"] == str(project) and c["token_set"] for c in calls)
    print(f"daemon ran the entry {time.monotonic() - started:.0f}s after install")

    assert cu.json("uninstall", "--name", sid)["service_id"] == sid
    assert cd.crontab_list(cu.name).stdout == OTHERS


def test_installed_line_run_as_cron_runs_it(cron_user: CronUser) -> None:
    cu = cron_user
    cd.install_crontab(cu.name, OTHERS)
    weird = cu.mkdir(cu.home / "projets" / "my \"q\" 'x' $HOME 100% é")
    lore_home = cu.home / "lore home 'q' \"x\" $HOME 100% é"  # --home puts these bytes into the line itself
    shutil.rmtree(lore_home, ignore_errors=True)
    # a daily entry whose time is far away: the daemon must not run it during this test
    name, _ = pick_name("cron-quoting", 86400, lambda wait: wait > 2 * 3600_000)
    data = cu.json(
        "--home", str(lore_home), "install", "--backend", "cron", "--interval", "24h", "--name", name,
        "--project", str(weird), "--lore", str(cu.lore),
    )  # fmt: skip
    sid = data["service_id"]
    listed = cd.crontab_list(cu.name).stdout
    line = our_line(listed, sid)
    assert "100\\% é" in line and not re.search(r"(?<!\\)%", line)
    command, stdin = cd.cron_command_as_executed(cd.split_crontab_line(line))
    assert stdin is None
    words = shlex.split(command)  # what /bin/sh will pass on: the bytes, unchanged
    assert words[words.index("--home") + 1] == str(lore_home)

    res = cd.run_like_cron(cu.name, cd.split_crontab_line(line), crontab_vars(listed))
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    status = cu.json("--home", str(lore_home), "status", "--name", sid)
    last = status["last_run"]
    assert last is not None and last["trigger"] == "scheduled" and last["outcome"] == "success", last
    assert status["scheduler"]["drift"] == []
    calls = [json.loads(x) for x in (weird / ".fake-lore-calls.jsonl").read_text().splitlines()]
    assert calls and all(c["cwd"] == str(weird) and c["token_set"] for c in calls)
    crash = lore_home / "logs" / sid / "scheduler-output.log"
    assert f"run {last['run_id']}: success" in crash.read_text()  # output went to our file, not to mail

    cu.json("--home", str(lore_home), "uninstall", "--name", sid)
    assert cd.crontab_list(cu.name).stdout == OTHERS


def test_uninstall_keeps_other_lines(cron_user: CronUser) -> None:
    cu = cron_user
    cd.install_crontab(cu.name, OTHERS)
    project = cu.mkdir(cu.home / "projects" / "keep")
    names = []
    for n in range(2):
        data = cu.json(
            "install", "--backend", "cron", "--interval", "45m", "--name", f"keep-{n}", "--project", str(project),
            "--lore", str(cu.lore),
        )  # fmt: skip
        names.append(data["service_id"])
    cu.json("install", "--backend", "cron", "--interval", "45m", "--name", "keep-0", "--project", str(project))
    listed = cd.crontab_list(cu.name).stdout
    assert listed.startswith(OTHERS)
    assert listed.count("# BEGIN lore-service keep-0\n") == 1 and "-59/15 * * * *" in listed
    cu.json("uninstall", "--name", "keep-0")
    after = cd.crontab_list(cu.name).stdout
    assert after.startswith(OTHERS) and "keep-0" not in after and "# BEGIN lore-service keep-1\n" in after
    cu.json("uninstall", "--name", "keep-1")
    assert cd.crontab_list(cu.name).stdout == OTHERS
