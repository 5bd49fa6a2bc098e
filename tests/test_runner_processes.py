"""Stages as real processes: timeouts, process groups, streaming, budget."""

from __future__ import annotations

import re
import signal
import sys
import time
from typing import Any

import pytest
from conftest import FakeSystem, calls, edit_config, pid_alive, start_hanging_run, wait_for_exit, write_plan

import lore_service as ls


def test_hanging_stage_times_out_and_its_grandchild_dies(cli, installed, project, home):
    sid = installed["service_id"]
    # long enough for the stage to start its grandchild and write its pid on a loaded machine
    edit_config(home, sid, lambda doc: doc["stages"]["issues"].update(timeout_seconds=5))
    write_plan(project, {"issues": {"grandchild": True, "hang": True}})
    started = time.monotonic()
    result = cli("--json", "run")
    elapsed = time.monotonic() - started
    assert result.code == 1
    issues = result.doc["data"]["run"]["stage_results"][0]
    assert issues["outcome"] == "timeout" and issues["error_class"] == "transient"
    assert "process group killed" in issues["message"]
    assert elapsed < 30
    grandchild = int((project / ".fake-lore-grandchild-issues.pid").read_text())
    wait_for_exit(grandchild)
    assert not pid_alive(grandchild)
    # the other critical stage still ran, and so did docs
    assert [c["stage"] for c in calls(project)] == ["issues", "mrs", "docs"]


def test_grandchild_left_behind_by_a_finished_stage_is_killed(cli, installed, project):
    write_plan(project, {"mrs": {"grandchild": True}})
    assert cli("--json", "run").code == 0
    grandchild = int((project / ".fake-lore-grandchild-mrs.pid").read_text())
    wait_for_exit(grandchild)
    assert not pid_alive(grandchild)


def test_run_budget_bounds_the_whole_run(cli, installed, project, home):
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc.update(run_budget_seconds=6))
    write_plan(project, {"issues": {"sleep": 0.5}, "mrs": {"hang": True}})
    result = cli("--json", "run")
    stages = {s["stage"]: s for s in result.doc["data"]["run"]["stage_results"]}
    assert stages["issues"]["outcome"] == "success"
    assert stages["mrs"]["outcome"] == "timeout" and "run budget" in stages["mrs"]["message"]
    # mrs got what issues left of the 6 s, not a budget of its own
    limit = re.search(r"timed out after ([\d.]+)s", stages["mrs"]["message"])
    assert limit is not None and float(limit[1]) <= 5.5, stages["mrs"]["message"]
    # the budget, the kill grace and some slack; the hanging mrs alone would take its 600 s timeout
    assert result.doc["data"]["run"]["duration_ms"] < (6 + ls.KILL_GRACE_SECONDS + 6) * 1000


def test_output_is_streamed_line_by_line_with_stage_prefix(cli, installed, project, home):
    write_plan(project, {"docs": {"print_mb": 3}})
    assert cli("--json", "run").code == 0
    log = home / "logs" / installed["service_id"] / "service.log"
    lines = log.read_text().splitlines()
    docs = [line for line in lines if "[docs] xxxx" in line]
    assert len(docs) > 30_000
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[docs\] x{99}$", docs[0])


def test_log_rotates_by_size_and_keeps_the_configured_backups(cli, installed, project, home):
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc.update(log={"max_bytes": 1048576, "backups": 2}))
    write_plan(project, {"issues": {"print_mb": 5}})
    assert cli("--json", "run").code == 0
    logdir = home / "logs" / sid
    names = sorted(p.name for p in logdir.iterdir())
    assert names == ["service.log", "service.log.1", "service.log.2"]
    for p in logdir.iterdir():
        assert p.stat().st_size <= 1048576
    assert "run" in (logdir / "service.log").read_text().splitlines()[-1]


@pytest.mark.parametrize("mode", ["0700"])
def test_state_and_log_folders_are_private(cli, installed, home, mode):
    cli("--json", "trigger")
    sid = installed["service_id"]
    for folder in (home / "config" / sid, home / "state" / sid, home / "logs" / sid):
        assert oct(folder.stat().st_mode & 0o777) == "0o700", folder
    for f in (
        home / "config" / sid / "manifest.json",
        home / "state" / sid / "status.json",
        home / "config" / sid / "token.env",
        home / "logs" / sid / "service.log",
    ):
        assert oct(f.stat().st_mode & 0o777) == "0o600", f


def test_sigterm_from_the_scheduler_kills_the_stage_and_still_records_the_run(tool, environ, project, home):
    import json
    import signal

    runner, stage_pid, grandchild = start_hanging_run(tool, environ, project, "run")
    runner.send_signal(signal.SIGTERM)  # to the run only, as systemd's stop would start
    out, _ = runner.communicate(timeout=30)
    assert runner.returncode == 1
    doc = json.loads(out)
    stages = {s["stage"]: s for s in doc["data"]["run"]["stage_results"]}
    assert "stopped by signal 15" in stages["issues"]["message"]
    assert stages["mrs"]["outcome"] == "skipped" and stages["docs"]["outcome"] == "skipped"
    for pid in (stage_pid, grandchild):
        wait_for_exit(pid)
        assert not pid_alive(pid)
    status = json.loads(tool("--json", "status").out)["data"]
    assert status["last_run"]["outcome"] == "failed" and status["consecutive_failures"] == 1


class StoppingSystem(FakeSystem):
    """Delivers a SIGTERM to the run's handler at a chosen moment: `when`
    is 'starting <stage>' (while that stage is being started) or 'after
    <stage>' (after it ended, before the next one)."""

    def __init__(self, environ: dict[str, str], when: str) -> None:
        super().__init__(environ)
        self.when = when
        self.spawned: list[str] = []
        self.pids: list[int] = []
        self.handler: Any = None

    def on_stop_signals(self, handler):  # type: ignore[override]
        self.handler = handler  # the test delivers the signal itself
        return lambda: None

    def spawn(self, argv, *, cwd, env):  # type: ignore[override]
        stage = _stage_of(argv)
        self.spawned.append(stage)
        proc = super().spawn(argv, cwd=cwd, env=env)
        self.pids.append(proc.pid)
        if self.when == f"starting {stage}":
            self.handler(signal.SIGTERM, None)  # as the OS would call the installed handler
        return proc

    def kill_group(self, proc, *, hard: bool) -> None:  # type: ignore[override]
        super().kill_group(proc, hard=hard)
        if self.spawned and self.when == f"after {self.spawned[-1]}" and self.handler.signum is None:
            self.handler(signal.SIGTERM, None)


def _stage_of(argv: list[str]) -> str:
    return argv[argv.index("--type") + 1] if "--type" in argv else {"generate-docs": "docs"}.get(argv[-1], "embeddings")


@pytest.mark.parametrize(
    ("when", "outcomes"),
    [
        ("starting issues", {"issues": "failed", "mrs": "skipped", "docs": "skipped"}),
        ("after issues", {"issues": "success", "mrs": "failed", "docs": "skipped"}),
        # only the optional stage is cut: still a stopped run, not a degraded success
        ("after mrs", {"issues": "success", "mrs": "success", "docs": "failed"}),
    ],
)
def test_sigterm_outside_a_stage_wait_still_ends_the_run_cleanly_and_records_it(
    cli, installed, project, environ, when, outcomes
):
    """A stop that lands while a stage is starting, or between two stages,
    is not lost and does not cut the run's bookkeeping in half."""
    write_plan(project, {"issues": {"grandchild": True, "sleep": 0 if when.startswith("after") else 30}})
    stopping = StoppingSystem(environ, when)
    started = time.monotonic()
    r = cli("--json", "trigger", sys_=stopping)
    assert time.monotonic() - started < 20  # the 30 s stage was ended, not waited for
    assert r.code == 1, r.out
    stages = {s["stage"]: s for s in r.data["run"]["stage_results"]}
    assert {k: v["outcome"] for k, v in stages.items()} == outcomes
    assert any("stopped by signal 15" in s["message"] for s in stages.values())
    assert stopping.spawned == ["issues", "mrs"][: 2 if when == "after mrs" else 1]  # nothing started after the stop
    pidfile = project / ".fake-lore-grandchild-issues.pid"  # absent if the stage was ended that early
    for pid in stopping.pids + ([int(pidfile.read_text())] if pidfile.exists() else []):
        wait_for_exit(pid)
        assert not pid_alive(pid)
    status = cli("--json", "status").data
    assert status["last_run"]["run_id"] == r.data["run"]["run_id"] and status["consecutive_failures"] == 1


def test_a_console_less_process_runs_without_streams(installed, project, environ, system, monkeypatch):
    """pythonw.exe / lore-service-w.exe start with sys.stdout and sys.stderr None."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(sys, "stderr", None)
    assert ls.main(["--json", "trigger"], system=system) == 0
    assert ls.main(["status", "--name", "no-such-service"], system=system) == 3


def test_a_console_less_error_lands_in_a_small_file_next_to_the_logs(installed, project, home, system, monkeypatch):
    """Without a console (the task's no-console build), an error before the service log opens is not lost."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(sys, "stderr", None)
    assert ls.main(["status", "--name", "no-such-service"], system=system) == 3
    sys.stderr.flush()
    text = (home / "logs" / "console-less.log").read_text()
    assert "error: no service named 'no-such-service' is installed" in text and "hint: " in text
