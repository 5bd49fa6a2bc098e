"""The host-wide run limit (issue 13.8): at most max_concurrent_runs runs of
all of a user's services have a stage running at once. A run holds one of
that many OS-locked slot files; one that finds none free waits a bounded
time, polling with jitter, then is skipped as host_busy (never a failure)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    FakeSystem,
    calls,
    hold_slot,
    log_text,
    run_while_held,
    start_hanging_run,
    status_file,
    wait_until,
    write_plan,
    write_settings,
)

import lore_service as ls

RUNS = 10


def stage_times(project: Path) -> list[dict[str, Any]]:
    path = project / ".fake-lore-times.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def most_runs_with_a_stage_running(projects: list[Path]) -> int:
    """The largest number of runs (one service, one run each) that had a stage
    running at the same instant, from the stages' own start and end times."""
    events = []
    for run, project in enumerate(projects):
        for t in stage_times(project):
            events += [(t["start_ns"], 1, run), (t["end_ns"], -1, run)]
    events.sort(key=lambda e: (e[0], e[1]))  # at one instant an end comes before a start
    active: Counter[int] = Counter()
    most = 0
    for _, step, run in events:
        active[run] += step
        most = max(most, sum(1 for n in active.values() if n > 0))
    return most


@pytest.fixture
def services(cli, tmp_path: Path, lore_bin: Path) -> list[tuple[str, Path]]:
    """Ten services on the fake backend, each for its own project folder."""
    made = []
    for i in range(RUNS):
        project = tmp_path / "projects" / f"p{i}"
        project.mkdir(parents=True)
        result = cli("--json", "install", "--backend", "fake", "--project", str(project))
        assert result.code == 0, result.err
        made.append((result.data["service_id"], project))
    return made


def start_runs(program: list[str], environ: dict[str, str], services, command: str = "run") -> list[subprocess.Popen]:
    """Every service's `run` (or `trigger`) as its own real process, all at once."""
    return [
        subprocess.Popen(
            [*program, "--json", command, "--name", sid],
            cwd=project,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for sid, project in services
    ]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, dict[str, Any], str]]:
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=180)
        out.append((proc.returncode, json.loads(stdout), stderr))
    return out


def waiting_trigger(argv: list[str], cwd: Path, environ: dict[str, str], err: Any) -> subprocess.Popen:
    """A real `trigger` started with its stderr in a file, once it says it waits for a slot."""
    proc = subprocess.Popen(argv, cwd=cwd, env=environ, stdout=subprocess.PIPE, stderr=err, text=True)
    wait_until(lambda: "waiting" in Path(err.name).read_text(), 30)
    return proc


def outcome_of(home: Path, sid: str) -> str:
    """ "ran" or "busy" from the service's status: every run is one or the other."""
    st = status_file(home, sid)
    assert st["consecutive_failures"] == 0 and st["paused"] is None
    if st["last_run"] is not None:
        assert st["last_run"]["outcome"] == "success" and st["last_skip"] is None
        return "ran"
    assert st["last_skip"]["condition"] == "host_busy"
    return "busy"


@pytest.mark.parametrize(("limit", "command"), [(1, "run"), (2, "run"), (3, "run"), (2, "trigger")])
def test_ten_runs_at_once_never_have_more_than_the_limit_syncing_and_with_a_long_wait_all_run(
    limit, command, services, program, environ, home
):
    write_settings(home, f"max_concurrent_runs = {limit}\nbusy_wait_seconds = 600\n")
    for _, project in services:
        write_plan(project, {"issues": {"sleep": 0.2}})
    results = finish(start_runs(program, environ, services, command))
    for code, doc, stderr in results:
        assert code == 0, stderr
        assert doc["data"]["skipped"] is False and doc["data"]["run"]["outcome"] == "success"
    assert [outcome_of(home, sid) for sid, _ in services] == ["ran"] * RUNS
    projects = [project for _, project in services]
    assert all(len(stage_times(p)) == 3 for p in projects)  # issues, mrs, docs of every run
    assert 1 <= most_runs_with_a_stage_running(projects) <= limit


def test_the_limit_is_a_limit_not_a_queue_ten_slots_let_ten_runs_sync_at_once(
    services, program, environ, home, tmp_path
):
    """The control for the test above: the overlap computation does see runs
    syncing together when the limit allows it (every stage waits until all
    ten have started one)."""
    write_settings(home, "max_concurrent_runs = 10\nbusy_wait_seconds = 0\n")
    release = tmp_path / "release"
    for _, project in services:
        write_plan(project, {"issues": {"wait_for": str(release)}})
    procs = start_runs(program, environ, services)
    wait_until(lambda: all(calls(p) for _, p in services), 60)
    release.touch()
    assert all(code == 0 for code, _, _ in finish(procs))
    assert most_runs_with_a_stage_running([p for _, p in services]) == RUNS


def test_with_a_short_wait_the_runs_beyond_the_limit_are_skipped_as_host_busy_never_failed(
    services, program, environ, home, tmp_path
):
    write_settings(home, "max_concurrent_runs = 2\nbusy_wait_seconds = 1\n")
    release = tmp_path / "release"
    for _, project in services:  # the two runs that get a slot keep it until the others gave up
        write_plan(project, {"issues": {"wait_for": str(release)}})
    procs = start_runs(program, environ, services)
    wait_until(lambda: sum(p.poll() is not None for p in procs) == RUNS - 2, 90)
    # a slot holder may not have started its stage yet when the others gave up
    wait_until(lambda: sum(bool(calls(project)) for _, project in services) >= 2, 30)
    syncing = [sid for sid, project in services if calls(project)]
    assert len(syncing) == 2
    release.touch()
    results = finish(procs)
    assert all(code == 0 for code, _, _ in results)  # a scheduled run that is skipped exits 0
    skipped = [doc["data"] for _, doc, _ in results if doc["data"]["skipped"]]
    assert len(skipped) == RUNS - 2
    assert {(d["run"]["condition"], d["skip_reason"]) for d in skipped} == {
        ("host_busy", "host busy (2 runs in progress)")
    }
    outcomes = {sid: outcome_of(home, sid) for sid, _ in services}
    assert sorted(sid for sid, o in outcomes.items() if o == "ran") == sorted(syncing)
    assert list(outcomes.values()).count("busy") == RUNS - 2
    busy_sid = next(sid for sid, o in outcomes.items() if o == "busy")
    log = log_text(home, busy_sid)
    waiting = next(line for line in log.splitlines() if "for a free run slot" in line)
    assert "waiting up to 1.0s for a free run slot (2 of 2 in use by: " in waiting
    assert all(sid in waiting for sid in syncing)
    assert "[skip] host busy (2 runs in progress)" in log
    assert most_runs_with_a_stage_running([p for _, p in services]) == 2


def test_trigger_waits_for_a_slot_says_so_on_stderr_only_and_then_syncs(services, program, environ, home, tmp_path):
    write_settings(home, "max_concurrent_runs = 1\nbusy_wait_seconds = 0\n")
    (holder, holder_project), (waiter, waiter_project) = services[:2]
    release = tmp_path / "release"
    write_plan(holder_project, {"issues": {"wait_for": str(release)}})
    first = start_runs(program, environ, [(holder, holder_project)])
    wait_until(lambda: bool(calls(holder_project)), 30)
    errors = tmp_path / "trigger.err"
    with open(errors, "w") as err:
        second = waiting_trigger([*program, "--json", "trigger", "--name", waiter], waiter_project, environ, err)
        assert not calls(waiter_project)  # it waits: no stage runs while the holder syncs
        release.touch()
        stdout, _ = second.communicate(timeout=120)
    assert second.returncode == 0
    assert json.loads(stdout)["data"]["run"]["outcome"] == "success"  # stdout is one JSON document
    assert errors.read_text() == f"waiting for a free run slot (1 of 1 in use by: {holder})…\n"
    assert finish(first)[0][0] == 0
    assert most_runs_with_a_stage_running([holder_project, waiter_project]) == 1


def test_ctrl_c_ends_a_trigger_that_waits_for_a_slot_and_nothing_is_recorded(
    tool, environ, project, home, tmp_path, system
):
    assert tool("--json", "install", "--backend", "none").code == 0
    write_settings(home, "max_concurrent_runs = 1\n")
    held = hold_slot(system, 0, "svc-a")  # this test process plays the run that syncs
    errors = tmp_path / "trigger.err"
    try:
        with open(errors, "w") as err:
            waiter = waiting_trigger([*tool.program, "--json", "trigger"], project, environ, err)
            waiter.send_signal(signal.SIGINT)
            stdout, _ = waiter.communicate(timeout=30)
    finally:
        held.release()
    assert waiter.returncode == 1 and json.loads(stdout)["error"]["code"] == "interrupted"
    assert errors.read_text() == "waiting for a free run slot (1 of 1 in use by: svc-a)…\n"
    sid = tool("--json", "status").data["service_id"]
    assert calls(project) == [] and not (home / "state" / sid / "status.json").exists()


def test_a_slot_held_by_a_run_killed_with_sigkill_is_free_for_the_next_run(tool, environ, project, home, tmp_path):
    runner, stage_pid, _grandchild = start_hanging_run(tool, environ, project, "run")  # it holds slot-0
    try:
        other = tmp_path / "other-project"
        other.mkdir()
        assert tool("--json", "install", "--backend", "none", cwd=other).code == 0
        write_settings(home, "max_concurrent_runs = 1\nbusy_wait_seconds = 0\n")
        busy = tool("--json", "run", cwd=other)
        assert busy.code == 0 and busy.data["run"]["condition"] == "host_busy", busy.err
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=30)
        after = tool("--json", "run", cwd=other)
        assert after.code == 0 and after.data["run"]["outcome"] == "success", after.err
        assert calls(other) and status_file(home, after.data["service_id"])["last_run"]["outcome"] == "success"
    finally:
        runner.kill()
        runner.wait()
        os.killpg(stage_pid, signal.SIGKILL)  # the killed run's stage and its grandchild


class WaitingSystem(FakeSystem):
    """A fake clock that moves only when the run sleeps; `on_sleep(n)` is
    called after the n-th sleep (a test frees a slot there)."""

    def __init__(self, environ: dict[str, str]) -> None:
        super().__init__(environ)
        self.mono = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep = lambda n: None

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.mono += seconds
        self.on_sleep(len(self.sleeps))


@pytest.fixture
def waiting(environ: dict[str, str]) -> WaitingSystem:
    return WaitingSystem(environ)


def test_a_waiting_run_polls_with_a_random_pause_of_half_a_second_to_3_s_and_gives_up_after_busy_wait(
    cli, installed, project, home, waiting
):
    write_settings(home, "max_concurrent_runs = 1\nbusy_wait_seconds = 10\n")
    waiting.jitter = 0.5
    result = run_while_held(cli, waiting, [hold_slot(waiting, 0, "svc-a")])
    assert result.code == 0 and result.data["run"]["condition"] == "host_busy"
    assert result.data["skip_reason"] == "host busy (1 run in progress)"
    assert set(waiting.uniform_calls) == {ls.SLOT_POLL_SECONDS} == {(0.5, 3.0)}
    assert waiting.sleeps[:-1] == [1.75] * 5 and waiting.sleeps[-1] == pytest.approx(1.25)  # the last try at 10 s
    assert sum(waiting.sleeps) == pytest.approx(10)
    assert calls(project) == []  # no stage started
    st = status_file(home, installed["service_id"])
    assert st["last_run"] is None and st["consecutive_failures"] == 0 and st["next_retry_at_ms"] is None


def test_a_run_takes_the_slot_that_frees_up_while_it_waits(cli, installed, project, home, waiting):
    write_settings(home, "max_concurrent_runs = 2\n")
    held = [hold_slot(waiting, 0, "svc-a"), hold_slot(waiting, 1, "svc-b")]
    waiting.on_sleep = lambda n: held[1].release() if n == 3 else None
    result = run_while_held(cli, waiting, held[:1])
    assert result.code == 0 and result.data["run"]["outcome"] == "success"
    assert len(waiting.sleeps) == 3
    assert [c["stage"] for c in calls(project)] == ["issues", "mrs", "docs"]
    log = log_text(home, installed["service_id"])
    assert "waiting up to 5m for a free run slot (2 of 2 in use by: svc-a, svc-b)" in log
    assert ls.FileLock(ls.Paths(waiting).slot(1)).try_acquire()  # the run gave its slot back


def test_a_slot_taken_an_instant_ago_is_named_once_its_holder_has_written_its_name(cli, installed, home, waiting):
    write_settings(home, "max_concurrent_runs = 2\nbusy_wait_seconds = 1\n")
    named = hold_slot(waiting, 0, "svc-a")
    fresh = ls.FileLock(ls.Paths(waiting).slot(1))
    assert fresh.try_acquire()  # taken, its name not yet written: the window a waiting run can read in
    waiting.on_sleep = lambda n: fresh.record_owner("svc-b") if n == 2 else None
    result = run_while_held(cli, waiting, [named, fresh])
    assert result.data["run"]["condition"] == "host_busy"
    assert waiting.sleeps[:2] == [ls.SLOT_NAME_PAUSE_SECONDS] * 2  # read again until both are named
    log = log_text(home, installed["service_id"])
    assert "(2 of 2 in use by: svc-a, svc-b)" in log


def test_a_slot_note_left_by_an_ended_run_never_names_the_new_holder(cli, installed, home, waiting):
    write_settings(home, "max_concurrent_runs = 1\nbusy_wait_seconds = 1\n")
    path = Path(ls.Paths(waiting).slot(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{2**22 + 7}\nsvc-gone\n")  # a pid above pid_max: that run is over
    held = ls.FileLock(str(path))
    assert held.try_acquire()  # taken by a run that has not named itself (and never will here)
    result = run_while_held(cli, waiting, [held])
    assert result.data["run"]["condition"] == "host_busy"
    assert waiting.sleeps[: ls.SLOT_NAME_TRIES] == [ls.SLOT_NAME_PAUSE_SECONDS] * ls.SLOT_NAME_TRIES
    log = log_text(home, installed["service_id"])
    assert "for a free run slot (1 of 1 in use)" in log and "svc-gone" not in log


def test_a_slot_note_is_read_only_whole_and_a_released_slot_names_nobody(waiting):
    path = ls.Paths(waiting).slot(0)
    lock = hold_slot(waiting, 0, "acme-api-f39022c8")
    assert ls.lock_owner(path) == (os.getpid(), "acme-api-f39022c8")
    with open(path, "r+b") as fh:  # a shorter name written over it, before the cut
        fh.write(f"{os.getpid()}\nweb-1a2b3c4d\n".encode())
    assert ls.lock_owner(path) == (os.getpid(), "web-1a2b3c4d")  # not web-1a2b3c4d-f39022c8
    Path(path).write_text(f"{os.getpid()}\nweb-1a2")  # the name half written
    assert ls.lock_owner(path) == (os.getpid(), "")
    slot = ls.RunSlot(ls.Paths(waiting), ls.Settings())
    slot.held = lock
    slot.release()
    assert Path(path).read_text() == ""  # the next holder is never taken for this one


def test_a_run_with_a_free_slot_never_waits_and_gives_the_slot_back(cli, installed, home, waiting):
    assert cli("--json", "run", sys_=waiting).data["run"]["outcome"] == "success"
    assert waiting.sleeps == [] and waiting.uniform_calls == []
    assert (home / "state" / ".slots" / "slot-0.lock").exists()
    assert ls.FileLock(ls.Paths(waiting).slot(0)).try_acquire()


def test_trigger_says_it_waits_on_stderr_and_exits_1_skipped_when_no_slot_frees_up(cli, installed, home, waiting):
    write_settings(home, "max_concurrent_runs = 1\ntrigger_busy_wait_seconds = 60\n")
    result = run_while_held(cli, waiting, [hold_slot(waiting, 0, "svc-a")], "trigger")
    assert result.code == 1 and result.doc["error"]["code"] == "skipped"
    assert result.doc["error"]["message"] == "not synced: host busy (1 run in progress)"
    assert sum(waiting.sleeps) == pytest.approx(60)
    assert result.err == "waiting for a free run slot (1 of 1 in use by: svc-a)…\n"
    assert result.doc["data"]["run"]["condition"] == "host_busy"  # stdout: the envelope alone


def test_a_scheduled_run_waits_no_longer_than_its_run_budget_still_fits_in_a_schedulers_time_limit():
    settings = ls.Settings()
    cfg = ls.ServiceConfig()

    def wait(backend: str, trigger: str = "scheduled") -> int:
        return ls.slot_wait_seconds(settings, cfg, types.SimpleNamespace(backend=backend), trigger)  # type: ignore[arg-type]

    assert wait("systemd") == wait("schtasks") == 30  # 900 s limit - 840 s budget - 30 s margin
    assert wait("cron") == wait("launchd") == wait("none") == 300  # no limit: busy_wait_seconds
    cfg.run_budget_seconds = 600
    assert wait("systemd") == 270
    cfg.run_budget_seconds = 2000  # the limit grows with the budget (budget + 60 s)
    assert wait("systemd") == 30
    assert wait("systemd", "manual") == 1800  # a person at a terminal: no scheduler limit


BAD_SETTINGS = [
    ("max_concurrent_runs = 0\n", "max_concurrent_runs must be an integer in 1..100, not 0"),
    ("max_concurrent_runs = true\n", "max_concurrent_runs must be an integer in 1..100, not True"),
    ('busy_wait_seconds = "5m"\n', "busy_wait_seconds must be an integer in 0..3600, not '5m'"),
    ("max_concurent_runs = 3\n", "unknown key 'max_concurent_runs' (the keys are max_concurrent_runs, "),
    ("max_concurrent_runs = \n", "is not valid TOML"),
    ("[limits]\nmax_concurrent_runs = 2\n", "unknown key 'limits'"),
]


@pytest.mark.parametrize(("text", "why"), BAD_SETTINGS)
def test_a_broken_settings_file_stops_every_run_with_one_line_exit_4_and_a_hint(
    text, why, cli, installed, project, home
):
    path = write_settings(home, text)
    for command in ("run", "trigger"):
        result = cli(command)
        assert result.code == 4
        error, hint = result.err.splitlines()
        assert error.startswith(f"error: settings {path}") and why in error
        assert hint.startswith("hint: fix it by hand, or delete") and "max_concurrent_runs = 2" in hint
    assert cli("--json", "run").doc["error"]["code"] == "config_invalid"
    assert calls(project) == [] and not (home / "state" / installed["service_id"] / "status.json").exists()
    check = next(c for c in cli("--json", "doctor").data["checks"] if c["name"] == "run limit")
    assert check["status"] == "fail" and why in check["message"]


def test_a_settings_file_others_can_write_or_a_link_is_not_trusted(cli, installed, home, tmp_path):
    path = write_settings(home, "max_concurrent_runs = 5\n")
    path.chmod(0o666)
    result = cli("--json", "run")
    assert result.code == 4 and result.doc["error"]["code"] == "untrusted_path"
    path.unlink()
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text("max_concurrent_runs = 5\n")
    path.symlink_to(elsewhere)
    result = cli("--json", "run")
    assert result.code == 4 and "symbolic link" in result.doc["error"]["message"]


def test_a_settings_file_with_a_bom_and_comments_is_read(cli, installed, home, system):
    path = write_settings(home, "\ufeff# mine\nmax_concurrent_runs = 4 # four\n")
    settings = ls.load_settings(ls.Paths(system))
    assert (settings.max_concurrent_runs, settings.busy_wait_seconds, settings.path) == (4, 300, str(path))
    assert cli("--json", "run").data["run"]["outcome"] == "success"


def test_doctor_shows_the_limit_where_it_comes_from_and_who_uses_it(cli, installed, home, system):
    check = next(c for c in cli("--json", "doctor").data["checks"] if c["name"] == "run limit")
    assert check["status"] == "ok"
    assert check["message"] == (
        f"at most 2 run(s) of all services at once (the default: there is no {home / 'config' / 'settings.toml'}); "
        "0 in use now; a scheduled run waits up to 5m for a free slot, trigger up to 30m"
    )
    path = write_settings(home, "max_concurrent_runs = 3\nbusy_wait_seconds = 90\n")
    held = hold_slot(system, 1, "svc-b")
    try:
        text = cli("doctor").out
    finally:
        held.release()
    assert f"ok    run limit: at most 3 run(s) of all services at once ({path}); 1 in use now by svc-b; " in text
    assert "waits up to 90s for a free slot" in text


def test_doctor_on_a_machine_without_services_shows_the_limit_too(cli, home):
    checks = cli("--json", "doctor").data["checks"]
    assert next(c for c in checks if c["name"] == "run limit")["message"].startswith("at most 2 run(s)")


def test_a_run_in_a_sandbox_from_before_the_limit_syncs_without_a_slot_and_says_how_to_fix_it(
    cli, installed, project, home, waiting
):
    """A systemd unit written before the run limit lets the run write only
    its own folders: the slots' folder is read-only there. The run must not
    fail for that; it syncs, and its log says to install again."""
    write_settings(home, "max_concurrent_runs = 1\nbusy_wait_seconds = 0\n")
    slots = str(home / "state" / ".slots")
    waiting.can_write = lambda folder: folder != slots  # type: ignore[method-assign]
    result = run_while_held(cli, waiting, [hold_slot(waiting, 0, "svc-a")])
    assert result.code == 0 and result.data["run"]["outcome"] == "success"
    log = log_text(home, installed["service_id"])
    assert f"warning: the run limit is not enforced: {slots} is read-only here" in log
    assert "run `lore-service install` again" in log
