"""The systemd backend against a REAL systemd user manager.

The harness (tests/harness/systemd_user.py) starts `systemd --user` for an
unprivileged test user; everything here runs as that user, as a person would:
install, fire the service, read status, verify and score the units, uninstall.
Skips when no manager can be had, except under LORE_E2E_REQUIRED=1 (CI),
where a skip is a failure.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import FAKE_LORE, FROZEN, ROOT, TOKEN, faketime_or_skip, frozen_or_skip
from harness.systemd_user import HarnessError, UserManager, e2e_required

import lore_service as ls

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# a project folder name with a space, both quotes, `$`, `%`, `;` and non-ASCII letters
HOSTILE = 'it\'s "a" pro$HOME 100% ;é'


@pytest.fixture(scope="module")
def um():
    manager = UserManager.auto()
    reason = manager.try_start()
    if reason is not None:
        if e2e_required():
            pytest.fail(f"systemd user manager unavailable: {reason}")
        pytest.skip(f"systemd user manager unavailable: {reason}")
    yield manager
    if manager.mode == "private":
        manager.stop()


@pytest.fixture(scope="module", params=["source", "frozen"])
def app(um: UserManager, request: pytest.FixtureRequest):
    """The tool, the fake lore and a venv, all where the test user can run
    them: from source (a copy of lore_service.py under its home, run by a venv
    of Debian's python), or the frozen binary unpacked into ~/Downloads."""
    try:
        py = um.ensure_venv()
    except HarnessError as exc:
        if e2e_required():
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    home = um.home
    appdir, bindir = home / "app", home / "bin"
    for d in (appdir, bindir):
        d.mkdir(exist_ok=True)
    shutil.copy(ROOT / "lore_service.py", appdir / "lore_service.py")
    shutil.copy(FAKE_LORE, appdir / "fake_lore.py")
    lore = bindir / "lore"
    lore.write_text(f"#!/bin/sh\nexec '{py}' '{appdir / 'fake_lore.py'}' \"$@\"\n")
    lore.chmod(0o755)
    owned = [appdir, bindir, *appdir.iterdir(), *bindir.iterdir()]
    if request.param == "source":
        argv = [str(py), str(appdir / "lore_service.py")]
    else:
        frozen_or_skip()
        download = home / "Downloads" / "lore-service"
        shutil.rmtree(download, ignore_errors=True)
        shutil.copytree(Path(FROZEN).parent, download, symlinks=True)
        owned += [home / "Downloads", *download.rglob("*"), download]
        argv = [str(download / Path(FROZEN).name)]
    if um.mode == "private":
        for p in owned:
            os.chown(p, um.uid, um.gid, follow_symlinks=False)
    return {"argv": argv, "lore": str(lore), "layout": request.param, "download": str(argv[0])}


def tool(um: UserManager, app: dict, *argv: str, timeout: float = 120):
    res = um.run_as([*app["argv"], *argv], extra_env={"GITLAB_TOKEN": TOKEN}, timeout=timeout)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def install(um: UserManager, app: dict, project: Path):
    """`install --backend systemd --interval 5m` for project, as the test user."""
    return tool(
        um,
        app,
        "--json",
        "install",
        "--backend",
        "systemd",
        "--interval",
        "5m",
        "--lore",
        app["lore"],
        "--project",
        str(project),
    )


def make_project(um: UserManager, name: str) -> Path:
    project = um.home / "projects" / name
    res = um.run_as(["mkdir", "-p", str(project)])
    assert res.returncode == 0, res.stderr
    return project


@pytest.fixture
def installed(um: UserManager, app: dict):
    project = make_project(um, HOSTILE)
    res = install(um, app, project)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(res.stdout)["data"]
    yield {"project": project, **data}
    tool(um, app, "uninstall", "--purge", "--name", data["service_id"])


def why_the_unit_failed(um: UserManager, app: dict, sid: str) -> str:
    """What a failed start left behind: the unit's own status and the service log's tail."""
    unit = um.systemctl("status", "--no-pager", "-n", "30", f"lore-sync-{sid}.service")
    logs = tool(um, app, "logs", "--name", sid)
    return f"\n--- systemctl status:\n{unit.stdout}{unit.stderr}\n--- lore-service logs:\n{logs.stdout}{logs.stderr}"


def unit_files(um: UserManager, sid: str) -> list[Path]:
    return [um.unit_dir / f"lore-sync-{sid}.service", um.unit_dir / f"lore-sync-{sid}.timer"]


def test_fired_service_runs_sync_under_sandbox_and_status_shows_it(um, app, installed):
    sid = installed["service_id"]
    before = time.time()
    started = um.systemctl("start", f"lore-sync-{sid}.service", timeout=300)
    assert started.returncode == 0, started.stderr + why_the_unit_failed(um, app, sid)
    res = tool(um, app, "--json", "status", "--name", sid)
    assert res.returncode == 0, res.stdout + res.stderr
    status = json.loads(res.stdout)["data"]
    run = status["last_run"]
    assert run is not None and run["outcome"] == "success" and run["trigger"] == "scheduled"
    assert [s["stage"] for s in run["stage_results"]] == ["issues", "mrs", "docs"]
    assert status["state"] == "healthy"
    # the sandbox lets the run take a host-wide run slot (ReadWritePaths= names their folder):
    # it wrote its name into the slot's file and, letting go, emptied it
    slot = um.home / ".local" / "state" / "lore" / "services" / ".slots" / "slot-0.lock"
    assert slot.stat().st_mtime >= before - 1 and slot.read_text() == ""
    assert "not enforced" not in "\n".join(
        json.loads(tool(um, app, "--json", "logs", "--name", sid).stdout)["data"]["lines"]
    )
    # the stages ran in the project, whose odd name arrived intact, with the token
    calls = [json.loads(line) for line in (installed["project"] / ".fake-lore-calls.jsonl").read_text().splitlines()]
    assert {c["cwd"] for c in calls} == {str(installed["project"])}
    assert all(c["token_set"] for c in calls)
    # systemd's own view
    sched = status["scheduler"]
    assert sched["registered"] is True and sched["active"] is True and sched["drift"] == []
    assert sched["last_result"] == "success" and sched["last_exit_status"] == 0


def test_a_pinned_state_folder_with_dollar_and_percent_reaches_the_sandboxed_run(um, app):
    """Environment= expands no $VARIABLES (systemd.exec): the `$` of a pinned
    XDG folder must reach the run as written, or its state lands elsewhere
    (outside ReadWritePaths, where the sandbox refuses the write)."""
    project = make_project(um, "dollar-state")
    state_home = um.home / "st$ate 100%"
    env = {"GITLAB_TOKEN": TOKEN, "XDG_STATE_HOME": str(state_home)}

    def as_user(*argv: str):
        res = um.run_as([*app["argv"], *argv], extra_env=env, timeout=120)
        assert "Traceback" not in res.stderr, res.stderr
        return res

    res = as_user("--json", "install", "--backend", "systemd", "--lore", app["lore"], "--project", str(project))
    assert res.returncode == 0, res.stdout + res.stderr
    sid = json.loads(res.stdout)["data"]["service_id"]
    try:
        started = um.systemctl("start", f"lore-sync-{sid}.service", timeout=300)
        assert started.returncode == 0, started.stderr + why_the_unit_failed(um, app, sid)
        status = json.loads(as_user("--json", "status", "--name", sid).stdout)["data"]
        assert status["last_run"] is not None and status["last_run"]["outcome"] == "success", status
        assert (state_home / "lore" / "services" / sid / "status.json").is_file()
        assert status["scheduler"]["drift"] == []
    finally:
        as_user("uninstall", "--purge", "--name", sid)


# how `systemctl show` spells a time span (NextElapseUSecMonotonic=14min 45.141568s)
SPAN_UNITS = {
    "y": 31557600,
    "month": 2629800,
    "w": 604800,
    "d": 86400,
    "h": 3600,
    "min": 60,
    "s": 1,
    "ms": 1e-3,
    "us": 1e-6,
}


def show_monotonic(um: UserManager, unit: str | None, *props: str) -> dict[str, float]:
    """`systemctl --user show` properties on CLOCK_MONOTONIC (time.monotonic()'s
    clock), in seconds; no unit: the manager's own properties. systemctl prints
    *TimestampMonotonic as plain µs but *USecMonotonic as a time span, and a
    timer with no next elapse (its service is running) as "infinity"."""
    res = um.systemctl("show", *([unit] if unit else []), "-p", ",".join(props), timeout=30)
    assert res.returncode == 0, res.stderr
    values = dict(line.partition("=")[::2] for line in res.stdout.splitlines())
    seconds = {}
    for prop in props:
        text = values.get(prop, "").strip()
        if text.isdigit():
            seconds[prop] = int(text) / 1e6
            continue
        if text == "infinity":
            seconds[prop] = math.inf
            continue
        parts = re.findall(r"(\d+(?:\.\d+)?)(month|min|ms|us|y|w|d|h|s)\b", text)
        assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), res.stdout
        seconds[prop] = sum(float(n) * SPAN_UNITS[u] for n, u in parts)
    return seconds


# the timer lore-service writes for `--interval 5m` (section 11a of lore_service.py)
STARTUP_DELAY = 5 * 60  # OnStartupSec=5min
INTERVAL = 5 * 60  # OnUnitActiveSec=5min
SPLAY = 30  # RandomizedDelaySec=30s, FixedRandomDelay=true: one offset in [0, 30 s) per unit
# next_run_iso has millisecond resolution; the two clocks are read a few ms apart
CLOCK_SLACK = 1.0


def timer_clocks(um: UserManager, sid: str) -> dict[str, float]:
    """The numbers systemd computes a monotonic timer's next elapse from."""
    return {
        **show_monotonic(um, None, "UserspaceTimestampMonotonic"),
        **show_monotonic(um, f"lore-sync-{sid}.timer", "LastTriggerUSecMonotonic", "NextElapseUSecMonotonic"),
        **show_monotonic(um, f"lore-sync-{sid}.service", "InactiveExitTimestampMonotonic"),
    }


def test_timer_is_active_with_next_elapse_about_one_interval_away(um, app, installed):
    sid = installed["service_id"]
    # when the manager has run for more than 5 minutes, OnStartupSec is past and
    # the timer fires at install: while that run lasts there is no next elapse.
    # systemd's numbers are read before and after status: if the timer fired in
    # between, status and those numbers describe different elapses; read again.
    deadline = time.monotonic() + 60
    while True:
        before = timer_clocks(um, sid)
        status = json.loads(tool(um, app, "--json", "status", "--name", sid).stdout)["data"]
        next_iso = status["scheduler"]["next_run_iso"]
        clocks = timer_clocks(um, sid)
        if (next_iso and clocks == before) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert next_iso, status["scheduler"]
    assert clocks == before, (before, clocks)
    # Both clocks systemd counts from are its own numbers, not guesses about how long
    # the manager has run: OnStartupSec= from the manager's start (userspace timestamp),
    # OnUnitActiveSec= from the service's last start or the timer's last trigger,
    # whichever is later. The next elapse is the earlier of the two, plus the unit's
    # fixed random delay; an OnStartupSec= that had passed when the timer last
    # triggered is spent.
    next_at = ls.ms_from_iso(next_iso) / 1000 - time.time() + time.monotonic()
    last_trigger = clocks["LastTriggerUSecMonotonic"]
    last_start = max(clocks["InactiveExitTimestampMonotonic"], last_trigger)
    startup_at = clocks["UserspaceTimestampMonotonic"] + STARTUP_DELAY
    bases = {}
    if not last_trigger or startup_at > last_trigger:
        bases["OnStartupSec"] = startup_at
    if last_start:
        bases["OnUnitActiveSec"] = last_start + INTERVAL
    seen = {"next_at": next_at, "now": time.monotonic(), **clocks, "bases": bases}
    assert bases, seen
    which, base = min(bases.items(), key=lambda item: item[1])
    assert base - CLOCK_SLACK <= next_at <= base + SPLAY + CLOCK_SLACK, (which, next_at - base, seen)
    print(f"next elapse: {which} + {next_at - base:.3f}s, {next_at - seen['now']:.0f}s ahead; {seen}")
    listed = um.systemctl("list-timers", "--all")
    assert f"lore-sync-{sid}.timer" in listed.stdout


def test_units_verify_cleanly_score_well_and_hold_no_token(um, app, installed):
    files = unit_files(um, installed["service_id"])
    for f in files:
        assert TOKEN not in f.read_text()
    verify = um.run_as(["systemd-analyze", "--user", "verify", *map(str, files)], timeout=120)
    assert verify.returncode == 0 and verify.stderr.strip() == "" and verify.stdout.strip() == "", (
        verify.stdout + verify.stderr
    )
    security = um.run_as(["systemd-analyze", "security", "--offline=true", str(files[0])], timeout=120)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.5, security.stdout[-2000:]


def test_uninstall_leaves_no_unit_and_no_timer(um, app):
    project = make_project(um, "to-remove")
    res = tool(um, app, "--json", "install", "--backend", "systemd", "--lore", app["lore"], "--project", str(project))
    assert res.returncode == 0, res.stdout + res.stderr
    sid = json.loads(res.stdout)["data"]["service_id"]
    assert all(f.exists() for f in unit_files(um, sid))
    gone = tool(um, app, "--json", "uninstall", "--name", sid)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not any(f.exists() for f in unit_files(um, sid))
    assert sid not in um.systemctl("list-timers", "--all").stdout
    assert tool(um, app, "--json", "status", "--name", sid).returncode == 3


def test_hand_edited_unit_is_drift_and_install_repairs_it(um, app, installed):
    sid = installed["service_id"]
    service = unit_files(um, sid)[0]
    service.write_text(service.read_text().replace("Nice=10", "Nice=0"))
    status = json.loads(tool(um, app, "--json", "status", "--name", sid).stdout)["data"]
    assert any("differs" in d for d in status["scheduler"]["drift"])
    doctor = tool(um, app, "--json", "doctor", "--name", sid)
    assert doctor.returncode == 1
    again = install(um, app, installed["project"])
    assert again.returncode == 0, again.stdout
    status = json.loads(tool(um, app, "--json", "status", "--name", sid).stdout)["data"]
    assert status["scheduler"]["drift"] == []


def test_doctor_names_lingering_and_the_user_manager(um, app, installed):
    res = tool(um, app, "--json", "doctor", "--name", installed["service_id"])
    checks = {c["name"]: c for c in json.loads(res.stdout)["data"]["checks"]}
    assert checks["user manager"]["status"] == "ok"
    assert checks["lingering"]["status"] in ("ok", "warn")
    if checks["lingering"]["status"] == "warn":
        assert "enable-linger" in checks["lingering"]["hint"]


def test_without_bus_variables_install_fails_loudly_naming_them(um, app):
    project = make_project(um, "no-bus")
    env = {"XDG_RUNTIME_DIR": "", "DBUS_SESSION_BUS_ADDRESS": "", "GITLAB_TOKEN": TOKEN}
    res = um.run_as(
        [*app["argv"], "install", "--backend", "systemd", "--lore", app["lore"], "--project", str(project)],
        extra_env=env,
        timeout=60,
    )
    assert res.returncode == 6, res.stdout + res.stderr
    assert "XDG_RUNTIME_DIR" in res.stderr and "hint:" in res.stderr


def test_frozen_install_pins_a_copy_and_keeps_running_after_the_download_is_deleted(um, app, installed):
    if app["layout"] != "frozen":
        pytest.skip("the pinned copy is a frozen-binary matter")
    sid = installed["service_id"]
    manifest = json.loads((um.home / ".config/lore/services" / sid / "manifest.json").read_text())
    pinned = manifest["program"][0]
    assert pinned.startswith(str(um.home / ".local/share/lore/bin/")), pinned
    assert f'ExecStart="{pinned}"' in unit_files(um, sid)[0].read_text()
    download = Path(app["download"]).parent
    aside = download.with_name("lore-service.deleted")
    download.rename(aside)  # as good as deleted for the scheduler; put back for the tests after this one
    try:
        started = um.systemctl("start", f"lore-sync-{sid}.service", timeout=300)
        assert started.returncode == 0, started.stderr + why_the_unit_failed(um, app, sid)
        res = um.run_as([pinned, "--json", "status", "--name", sid], timeout=60)
        run = json.loads(res.stdout)["data"]["last_run"]
        assert run["outcome"] == "success" and run["trigger"] == "scheduled"
    finally:
        aside.rename(download)


def later(um: UserManager, app: dict, hours: int, *argv: str):
    """The tool as if `hours` had passed (faketime shifts only this process and its children)."""
    faketime = faketime_or_skip()
    # faketime shifts the monotonic clock too, so the systemctl it starts places the
    # timer's next elapse in 1970: the next run is not judged here. (Keeping monotonic
    # real, FAKETIME_DONT_FAKE_MONOTONIC, makes libfaketime fail time.sleep with EINVAL.)
    env = {"GITLAB_TOKEN": TOKEN}
    res = um.run_as([faketime, "-f", f"+{hours}h", *app["argv"], *argv], extra_env=env, timeout=120)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def test_stale_hours_later_names_what_the_real_user_manager_says_stopped_the_timer(um, app, installed):
    """The cause line comes from the scheduler's real answer: a stopped timer,
    then a disabled one; with both right again, no scheduler fact explains it."""
    sid = installed["service_id"]
    timer = f"lore-sync-{sid}.timer"
    ran = tool(um, app, "--json", "trigger", "--name", sid)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert um.systemctl("stop", timer).returncode == 0
    try:
        text = later(um, app, 8, "status", "--name", sid).stdout
        assert "STALE       no successful sync for 8h (expected every 5m)" in text, text
        assert f"cause: {timer} is not active (inactive/dead)" in text, text
        data = json.loads(later(um, app, 8, "--json", "status", "--name", sid).stdout)["data"]
        assert data["state"] == "stale" and data["scheduler"]["active"] is False
        assert um.systemctl("start", timer).returncode == 0
        assert um.systemctl("disable", timer).returncode == 0
        assert f"cause: {timer} is not enabled (disabled)" in later(um, app, 8, "status", "--name", sid).stdout
        assert um.systemctl("enable", timer).returncode == 0
        text = later(um, app, 8, "status", "--name", sid).stdout
        assert "STALE" in text and "cause: no run has happened in time" in text, text  # (no logind here)
        check = later(um, app, 8, "status", "--check", "--name", sid)
        assert check.returncode == 1 and f"{sid}: STALE: no successful sync for 8h" in check.stderr
    finally:
        um.systemctl("enable", "--now", timer)


def test_stale_with_the_pinned_program_deleted_says_the_program_is_missing(um, app, installed):
    if app["layout"] != "frozen":
        pytest.skip("the pinned copy is a frozen-binary matter")
    sid = installed["service_id"]
    assert tool(um, app, "--json", "trigger", "--name", sid).returncode == 0
    pinned = Path(json.loads((um.home / ".config/lore/services" / sid / "manifest.json").read_text())["program"][0])
    aside = pinned.parent.with_name(pinned.parent.name + ".deleted")
    pinned.parent.rename(aside)  # every firing now fails to start (203/EXEC)
    try:
        text = later(um, app, 8, "status", "--name", sid).stdout
        assert f"cause: the scheduled program {pinned} is missing" in text, text
    finally:
        aside.rename(pinned.parent)


def test_the_timer_fires_by_itself_and_the_run_is_recorded(um, app):
    """No `systemctl start`: the timer's own start trigger (OnStartupSec, 5 min
    after the manager started, at once if that is past) runs the sync."""
    project = make_project(um, f"self-firing-{app['layout']}")
    res = install(um, app, project)
    assert res.returncode == 0, res.stdout + res.stderr
    sid = json.loads(res.stdout)["data"]["service_id"]
    try:
        deadline = time.monotonic() + 7 * 60
        status: dict = {}
        while time.monotonic() < deadline:
            status = json.loads(tool(um, app, "--json", "status", "--name", sid).stdout)["data"]
            if status["last_run"] is not None:
                break
            time.sleep(5)
        run = status["last_run"]
        assert run is not None, f"the timer did not fire within 7 minutes: {status.get('scheduler')}"
        assert run["trigger"] == "scheduled" and run["outcome"] == "success"
        assert status["scheduler"]["last_trigger_iso"] is not None
    finally:
        tool(um, app, "uninstall", "--purge", "--name", sid)


# Asks, as the test user and in one process, each service's scheduler view one
# by one (state()), then all at once (states()), then one by one again, counting
# the commands each way runs through System.
COMPARE_VIEWS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import lore_service as ls

class Counting(ls.System):
    def run(self, argv, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        return super().run(argv, **kwargs)

def views(batch):
    system = Counting()
    paths = ls.Paths(system)
    manifests = [ls.load_manifest(paths, sid) for sid in sys.argv[2:]]
    got = ls.scheduler_views(ls.Context(system, paths, robot=True), manifests, batch=batch)
    out = {sid: v.payload() if isinstance(v, ls.LoreServiceError) else v.to_dict() for sid, v in got.items()}
    return out, getattr(system, "calls", 0)

def without_last_exit(views):  # `show`n per unit only: status of one service has it (spec §21)
    for view in views.values():
        view.update(last_result=None, last_exit_status=None, last_finished_iso=None)
    return views

one, asked_one = views(False)
batch, asked_batch = views(True)
again, _ = views(False)
one, batch, again = without_last_exit(one), without_last_exit(batch), without_last_exit(again)
print(json.dumps({"one": one, "batch": batch, "again": again, "asked_one": asked_one, "asked_batch": asked_batch}))
"""


def test_status_all_of_30_services_asks_the_user_manager_twice_and_says_what_each_status_says(um, app):
    """With 30 services, one timer stopped and one disabled by hand: the batch
    (one `list-units`, one `list-timers`) gives every service the view `status`
    of that service gives (but the service's last exit, which `show` gives per
    unit only), the drift included. Timers may fire while
    this runs, so the answers are compared when two one-by-one readings around
    the batch agree (nothing changed in between)."""
    if app["layout"] != "source":
        pytest.skip("the batch is the module's own code, the same in the frozen build")
    sids: list[str] = []
    try:
        for i in range(30):
            project = make_project(um, f"scale-{i:02d}")
            argv = ["--json", "install", "--backend", "systemd", "--interval", "24h", "--lore", app["lore"]]
            res = tool(um, app, *argv, "--project", str(project))
            assert res.returncode == 0, res.stdout + res.stderr
            sids.append(json.loads(res.stdout)["data"]["service_id"])
        stopped, disabled = sids[3], sids[7]
        assert um.systemctl("stop", f"lore-sync-{stopped}.timer").returncode == 0
        assert um.systemctl("disable", f"lore-sync-{disabled}.timer").returncode == 0
        python, appdir = app["argv"][0], str(Path(app["argv"][1]).parent)
        deadline = time.monotonic() + 6 * 60
        while True:
            res = um.run_as([python, "-c", COMPARE_VIEWS, appdir, *sids], timeout=120)
            assert res.returncode == 0, res.stderr
            seen = json.loads(res.stdout)
            if seen["one"] == seen["again"] or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert seen["one"] == seen["again"], "the timers kept firing for 6 minutes"
        assert seen["batch"] == seen["one"]
        assert (seen["asked_batch"], seen["asked_one"]) == (2, 2 * 30)  # one by one: show (both units), list-timers
        drift = {sid: view["drift"] for sid, view in seen["batch"].items() if view["drift"]}
        assert drift == {
            stopped: [f"lore-sync-{stopped}.timer is not active (inactive/dead)"],
            disabled: [f"lore-sync-{disabled}.timer is not enabled (disabled)"],
        }
        everything = json.loads(tool(um, app, "--json", "status", "--all").stdout)["data"]["services"]
        rows = {row["service_id"]: row for row in everything if row["service_id"] in sids}
        assert len(rows) == 30 and rows[stopped]["scheduler"]["drift"] == drift[stopped]
    finally:
        for sid in sids:
            tool(um, app, "uninstall", "--purge", "--name", sid)
