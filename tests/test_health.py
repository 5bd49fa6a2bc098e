"""Staleness and `status --check`: a service whose sync stopped is noticed
from the clock alone. The real CLI runs under a shifted clock (Debian's
faketime), as hours passing without a run would leave it."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import edit_config, faketime_or_skip, write_plan


@pytest.fixture
def later(tool, environ, project):
    """Run the tool as if `hours` had passed (faketime shifts this process's clock only)."""
    faketime = faketime_or_skip()

    def call(hours: float, *argv: str):
        proc = subprocess.run(
            [faketime, "-f", f"+{hours}h", *tool.program, *argv],
            cwd=project,
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc

    return call


def test_a_service_without_a_success_for_three_intervals_is_stale(tool, later):
    assert tool("--json", "install", "--backend", "none").code == 0
    assert tool("--json", "trigger").code == 0
    fresh = json.loads(tool("--json", "status").out)["data"]
    assert fresh["stale"] is False and fresh["state"] == "healthy"
    assert fresh["stale_after_seconds"] == 3 * 1800 + 1800  # three intervals and a step, 2h for 30m
    assert fresh["stale_since_ms"] == fresh["last_success_at_ms"] + 7200 * 1000
    assert not json.loads(later(1.5, "--json", "status").stdout)["data"]["stale"]
    data = json.loads(later(8, "--json", "status").stdout)["data"]
    assert data["stale"] is True and data["state"] == "stale"
    human = later(8, "status").stdout
    assert "STALE       no successful sync for 8h (expected every 30m)" in human
    assert "cause: " in human and "fix: " in human
    listed = json.loads(later(8, "--json", "list").stdout)["data"]["services"][0]
    assert listed["state"] == "stale"
    doctor = later(8, "--json", "doctor")
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["data"]["checks"]}
    assert doctor.returncode == 1 and checks["freshness"]["status"] == "fail"
    assert "no successful sync for 8h" in checks["freshness"]["message"]


def test_backing_off_and_stale_at_once_reads_stale_with_both_facts(tool, later, project):
    assert tool("--json", "install", "--backend", "none").code == 0
    write_plan(project, {"issues": {"exit": 75}})  # transient: backoff
    assert tool("--json", "trigger").code == 1
    data = json.loads(later(3, "--json", "status").stdout)["data"]
    assert data["state"] == "stale" and data["stale"] is True
    assert data["consecutive_failures"] == 1 and data["last_success_at_ms"] is None  # never synced since install
    assert "the runs fail: issues failed: exit status 75" in later(3, "status").stdout
    failed_again = json.loads(later(3, "--json", "trigger").stdout)
    assert failed_again["data"]["state"] == "stale"  # a run's result says what `status` says just after it


def test_stale_after_in_service_toml_takes_effect_with_the_next_run(tool, later, home):
    assert tool("--json", "install", "--backend", "none").code == 0
    sid = json.loads(tool("--json", "list").out)["data"]["services"][0]["service_id"]
    edit_config(home, sid, lambda doc: doc.update(stale_after="24h"))
    assert tool("--json", "trigger").code == 0
    assert json.loads(later(8, "--json", "status").stdout)["data"]["stale"] is False
    assert json.loads(later(25, "--json", "status").stdout)["data"]["stale"] is True


def test_status_check_is_silent_when_all_is_well_and_one_line_per_problem_otherwise(tool, later, tmp_path, environ):
    assert tool("--json", "install", "--backend", "none").code == 0
    assert tool("--json", "trigger").code == 0
    other = tmp_path / "other"
    other.mkdir()
    assert tool("--json", "install", "--backend", "none", cwd=other).code == 0
    assert tool("--json", "trigger", cwd=other).code == 0
    quiet = tool("status", "--check", "--all")
    assert quiet.code == 0 and quiet.out == "" and quiet.err == ""
    assert tool("--json", "pause", "--reason", "holiday", cwd=other).code == 0
    r = later(8, "status", "--check", "--all")
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr  # the paused one is not also stale
    assert any("STALE: no successful sync for 8h (expected every 30m)" in line for line in lines)
    assert any("PAUSED (manual): holiday" in line for line in lines)
    robot = json.loads(later(8, "--json", "status", "--check", "--all").stdout)
    assert robot["ok"] is False and robot["error"]["code"] == "unhealthy"
    assert sorted(s["ok"] for s in robot["data"]["services"]) == [False, False]
    one = later(8, "status", "--check")  # just this folder's service
    assert one.returncode == 1 and len(one.stderr.strip().splitlines()) == 1


def test_install_times_are_read_back_exactly_without_the_strptime_machinery() -> None:
    import random

    import lore_service as ls

    rng = random.Random(7)
    for ms in [0, 951782400000, 4102444799999] + [rng.randrange(0, 4102444800000) for _ in range(2000)]:
        assert ls.ms_from_iso(ls.iso_from_ms(ms)) == ms
    for bad in ("", "2026-02-29T00:00:00.000Z", "2026-13-01T00:00:00Z", "2026-01-01 00:00:00Z", "abc"):
        assert ls.ms_from_iso(bad) is None, bad


def test_the_cause_of_staleness_comes_from_the_schedulers_own_view(cli, system, installed, home):
    import time

    assert cli("--json", "trigger").code == 0
    entry = home / "fake-scheduler" / f"{installed['service_id']}.json"
    entry.unlink()  # the scheduler lost its entry: nothing fires any more
    system.clock_ms = int(time.time() * 1000) + 8 * 3600 * 1000
    text = cli("status").out
    assert "STALE       no successful sync for 8h (expected every 30m)" in text
    assert f"cause: {entry} is missing" in text


def test_a_stale_cause_no_run_recorded_comes_from_the_program_then_the_schedulers_last_result_then_lingering(
    cli, system, installed, tmp_path
):
    import lore_service as ls

    assert cli("--json", "trigger").code == 0
    ctx = ls.Context(system, ls.Paths(system), robot=True)
    report = ls.service_report(ctx, ls.load_manifest(ctx.paths, installed["service_id"]))
    quiet = ls.SchedulerState(True, True, "timer active/waiting", last_result="success", extra={"linger": None})
    report.scheduler = quiet
    assert ls.stale_cause(report) == (
        "no run has happened in time: the machine was asleep or off at the scheduled times?"
    )
    quiet.extra["linger"] = False
    assert ls.stale_cause(report).startswith("the timer fires only while you are logged in (lingering is off)")
    quiet.last_result, quiet.extra["last_exit_status"] = "exit-code", 203  # systemd could not exec it
    recorded = report.status.last_run.finished_at_iso
    quiet.extra["last_finished_iso"] = recorded  # the run's own exit: it recorded how it went
    assert "lingering is off" in ls.stale_cause(report)
    quiet.extra["last_finished_iso"] = ls.iso_from_ms(ls.ms_from_iso(recorded) + 3600 * 1000)  # an hour after
    assert ls.stale_cause(report) == (
        "the scheduler's last start of the run failed (exit-code, exit status 203) before it recorded anything"
    )
    quiet.extra = {"linger": None}  # Task Scheduler: its result codes, with the last run time
    quiet.last_trigger_iso = ls.iso_from_ms(ls.ms_from_iso(recorded) + 3600 * 1000)
    for status_code in (0x41300, 0x41301, 0x41303, 0x41306, 0x41325):  # ready, running, not yet run, ...
        quiet.last_result = status_code
        assert ls.stale_cause(report).startswith("no run has happened in time"), hex(status_code)
    quiet.last_result = 0x80070002  # the file was not found
    assert ls.stale_cause(report).startswith("the scheduler's last start of the run failed (2147942402)")
    gone = tmp_path / "bin" / "0.9.0" / "lore-service"
    report.manifest.program = [str(gone), "run", "--service-id", installed["service_id"]]
    assert ls.stale_cause(report) == f"the scheduled program {gone} is missing"
    quiet.drift = ["lore-sync-x.timer is not active (inactive/dead)"]
    assert ls.stale_cause(report) == f"the scheduled program {gone} is missing"  # what every firing runs into first
