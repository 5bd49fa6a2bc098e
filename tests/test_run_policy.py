"""The run policy end to end: stages, severity, backoff, breaker, pause."""

from __future__ import annotations

import json

import pytest
from conftest import TOKEN, calls, log_text, status_file, write_plan

import lore_service as ls


def test_successful_trigger_runs_balanced_stages_in_project_with_token(cli, installed, project):
    result = cli("--json", "trigger")
    assert result.code == 0, result.err
    run = result.data["run"]
    assert run["outcome"] == "success" and run["trigger"] == "manual"
    assert [s["stage"] for s in run["stage_results"]] == ["issues", "mrs", "docs"]
    seen = calls(project)
    assert [c["stage"] for c in seen] == ["issues", "mrs", "docs"]
    assert all(c["cwd"] == str(project) and c["token_set"] for c in seen)
    assert seen[0]["argv"] == ["ingest", "--type", "issues"]


def test_optional_failure_degrades_without_backoff(cli, installed, project, home):
    write_plan(project, {"docs": {"exit": 1}})
    result = cli("--json", "run")
    assert result.code == 0
    assert result.data["run"]["outcome"] == "degraded"
    st = status_file(home, installed["service_id"])
    assert st["consecutive_failures"] == 0 and st["next_retry_at_ms"] is None
    assert cli("--json", "status").data["state"] == "degraded"


def test_critical_stages_both_run_and_optional_skipped_when_none_succeeds(cli, installed, project):
    write_plan(project, {"issues": {"exit": 75}, "mrs": {"exit": 75}})
    result = cli("--json", "run")
    assert result.code == 1
    doc = result.doc
    assert doc["ok"] is False and doc["error"]["code"] == "run_failed"
    outcomes = {s["stage"]: s["outcome"] for s in doc["data"]["run"]["stage_results"]}
    assert outcomes == {"issues": "failed", "mrs": "failed", "docs": "skipped"}
    assert [c["stage"] for c in calls(project)] == ["issues", "mrs"]


def test_optional_runs_when_one_critical_succeeds_but_run_still_fails(cli, installed, project):
    write_plan(project, {"issues": {"exit": 75}})
    result = cli("--json", "run")
    assert result.code == 1
    outcomes = {s["stage"]: s["outcome"] for s in result.doc["data"]["run"]["stage_results"]}
    assert outcomes == {"issues": "failed", "mrs": "success", "docs": "success"}


def test_transient_failure_persists_full_jitter_retry_time_once(cli, installed, project, home, system):
    write_plan(project, {"issues": {"exit": 75}})
    system.clock_ms = 1_000_000_000
    system.jitter = 0.25
    assert cli("--json", "run").code == 1
    st = status_file(home, installed["service_id"])
    assert st["consecutive_failures"] == 1
    # base 60 s, n=1: uniform(0, 60) with jitter 0.25 -> 15 s
    assert st["next_retry_at_ms"] == 1_000_000_000 + 15_000
    assert (0, 60) in system.uniform_calls
    # a read never recomputes it
    for _ in range(3):
        assert cli("--json", "status").data["next_retry_at_ms"] == 1_000_015_000
    # scheduled run before the retry time is skipped and changes nothing
    system.clock_ms += 10_000
    skipped = cli("--json", "run")
    assert skipped.code == 0 and skipped.data["skipped"] is True
    assert "backing off" in skipped.data["skip_reason"]
    assert status_file(home, installed["service_id"])["consecutive_failures"] == 1
    assert len([c for c in calls(project) if c["stage"] == "issues"]) == 1


def test_backoff_ceiling_doubles_then_caps(cli, installed, project, system):
    write_plan(project, {"issues": {"exit": 75}})
    system.clock_ms = 5_000_000
    for _ in range(8):
        cli("--json", "trigger")  # trigger ignores the wait
    highs = [high for _, high in system.uniform_calls if high >= 60]
    assert highs[:7] == [60, 120, 240, 480, 960, 1920, 3600]


def test_circuit_breaker_pauses_after_threshold(cli, installed, project, system, home):
    write_plan(project, {"issues": {"exit": 75}})
    system.clock_ms = 1_000
    for i in range(8):
        result = cli("--json", "trigger")
        assert result.code == 1, i
    status = cli("--json", "status").data
    assert status["state"] == "paused"
    assert status["paused"]["kind"] == "circuit_breaker"
    assert "resume" in status["paused"]["hint"]
    assert status["consecutive_failures"] == 8
    # paused: scheduled runs skip, trigger refuses with a hint
    assert cli("--json", "run").data["skip_reason"].startswith("paused")
    refused = cli("--json", "trigger")
    assert refused.code == 1 and refused.doc["error"]["code"] == "paused"
    assert "resume" in refused.doc["error"]["hint"]
    resumed = cli("--json", "resume")
    assert resumed.code == 0 and resumed.data["was_paused"]["kind"] == "circuit_breaker"
    st = status_file(home, installed["service_id"])
    assert st["paused"] is None and st["consecutive_failures"] == 0 and st["next_retry_at_ms"] is None


@pytest.mark.parametrize("code", [2, 64, 78, 126, 127])
def test_permanent_exit_code_pauses_at_once(cli, installed, project, code):
    write_plan(project, {"mrs": {"exit": code}})
    result = cli("--json", "run")
    assert result.code == 1
    assert result.doc["data"]["run"]["error_class"] == "permanent"
    status = cli("--json", "status").data
    assert status["paused"]["kind"] == "permanent_error"
    assert "mrs" in status["paused"]["reason"]
    assert status["next_retry_at_ms"] is None


def test_uncommon_exit_and_signal_are_transient(cli, installed, project):
    write_plan(project, {"issues": {"signal": 9}, "mrs": {"exit": 3}})
    result = cli("--json", "run")
    stages = {s["stage"]: s for s in result.doc["data"]["run"]["stage_results"]}
    assert stages["issues"]["error_class"] == "transient" and "signal 9" in stages["issues"]["message"]
    assert stages["mrs"]["error_class"] == "transient" and stages["mrs"]["exit_code"] == 3
    assert result.doc["data"]["run"]["error_class"] == "transient"


def test_command_that_cannot_start_is_permanent(cli, installed, project, home):
    cfg = home / "config" / installed["service_id"] / "service.toml"
    cfg.write_text(cfg.read_text().replace(str(project.parent.parent / "bin" / "lore"), "/nonexistent/lore", 1))
    result = cli("--json", "run")
    issues = result.doc["data"]["run"]["stage_results"][0]
    assert issues["stage"] == "issues" and issues["outcome"] == "failed"
    assert issues["error_class"] == "permanent" and issues["exit_code"] is None
    assert "cannot start" in issues["message"]


def test_success_after_failures_clears_backoff(cli, installed, project, home):
    write_plan(project, {"issues": {"exit": 75}})
    cli("--json", "trigger")
    cli("--json", "trigger")
    assert status_file(home, installed["service_id"])["consecutive_failures"] == 2
    write_plan(project, {})
    assert cli("--json", "trigger").code == 0
    st = status_file(home, installed["service_id"])
    assert st["consecutive_failures"] == 0 and st["next_retry_at_ms"] is None
    assert [r["outcome"] for r in st["history"]] == ["success", "failed", "failed"]


def test_manual_pause_skips_scheduled_runs_and_keeps_last_run(cli, installed, project, home):
    cli("--json", "trigger")
    before = status_file(home, installed["service_id"])["last_run"]
    paused = cli("--json", "pause", "--reason", "maintenance window")
    assert paused.code == 0 and paused.data["paused"]["kind"] == "manual"
    skipped = cli("--json", "run")
    assert skipped.code == 0 and skipped.data["skipped"]
    assert status_file(home, installed["service_id"])["last_run"] == before
    log = log_text(home, installed["service_id"])
    assert "[skip] paused (manual)" in log


def test_token_is_redacted_from_the_log_and_outputs(cli, installed, project, home):
    write_plan(project, {"issues": {"print_token": True}})
    result = cli("--json", "trigger")
    assert TOKEN not in result.out
    log = log_text(home, installed["service_id"])
    assert "token is <redacted>" in log and TOKEN not in log
    for path in home.rglob("*"):
        if path.is_file() and path.name != "token.env":
            assert TOKEN not in path.read_text(errors="replace"), path


def test_history_is_bounded(cli, installed, project, home):
    write_plan(project, {})
    for _ in range(ls.HISTORY_LIMIT + 3):
        cli("--json", "trigger")
    st = status_file(home, installed["service_id"])
    assert len(st["history"]) == ls.HISTORY_LIMIT
    assert st["history"][0] == st["last_run"]


def test_coarse_schedule_skips_until_interval_elapsed(cli, installed, project, home, system):
    """A scheduler firing every 15m for a 45m interval (cron) runs every 45m."""
    sid = installed["service_id"]
    manifest_path = home / "config" / sid / "manifest.json"
    m = json.loads(manifest_path.read_text())
    m["interval_seconds"], m["schedule_step_seconds"] = 2700, 900
    manifest_path.write_text(json.dumps(m))
    system.clock_ms = 10_000_000
    assert cli("--json", "run").data["skipped"] is False
    system.clock_ms += 900_000
    r = cli("--json", "run")
    assert r.data["skipped"] and "not due" in r.data["skip_reason"]
    system.clock_ms += 1_800_000
    assert cli("--json", "run").data["skipped"] is False
