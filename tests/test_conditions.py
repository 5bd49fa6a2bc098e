"""Conditions of the machine (issue 13): a run that a condition keeps from
starting is skipped, never a failure; the next firing tries again."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import calls

import lore_service as ls

DAY_MS = 24 * 3600 * 1000


def status_file(home: Path, sid: str) -> dict:
    return json.loads((home / "state" / sid / "status.json").read_text())


def test_a_missing_project_folder_skips_the_run_and_never_pauses_the_service(
    cli, installed, project, home, tmp_path, monkeypatch
):
    sid = installed["service_id"]
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "unmounted")
    threshold = ls.ServiceConfig().circuit_breaker_threshold
    for _ in range(threshold + 2):  # more than the breaker would allow failures
        result = cli("--json", "run", "--name", sid)
        assert result.code == 0, result.err
        assert result.data["skipped"] is True
        assert result.data["skip_reason"] == f"project folder missing ({project})"
        assert result.data["run"]["outcome"] == "skipped" and result.data["run"]["condition"] == "project_missing"
    st = status_file(home, sid)
    assert st["consecutive_failures"] == 0 and st["next_retry_at_ms"] is None and st["paused"] is None
    assert st["last_run"] is None
    assert [(r["outcome"], r["repeats"]) for r in st["history"]] == [("skipped", threshold + 2)]
    assert st["last_skip"]["repeats"] == threshold + 2


def test_the_run_after_the_folder_is_back_syncs_and_the_skips_stay_in_the_history(
    cli, installed, project, home, tmp_path, monkeypatch
):
    sid = installed["service_id"]
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "away")
    for _ in range(3):
        assert cli("--json", "run", "--name", sid).code == 0
    (tmp_path / "away").rename(project)
    result = cli("--json", "run", "--name", sid)
    assert result.code == 0 and result.data["run"]["outcome"] == "success"
    assert [c["stage"] for c in calls(project)] == ["issues", "mrs", "docs"]
    st = status_file(home, sid)
    assert [(r["outcome"], r["repeats"]) for r in st["history"]] == [("success", 1), ("skipped", 3)]
    assert cli("--json", "status", "--name", sid).data["state"] == "healthy"


def test_a_skip_never_moves_an_earlier_backoff(cli, installed, project, home, system, tmp_path, monkeypatch):
    from conftest import write_plan

    sid = installed["service_id"]
    write_plan(project, {"issues": {"exit": 75}})
    assert cli("--json", "trigger").code == 1
    before = status_file(home, sid)
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "away")
    system.clock_ms = before["next_retry_at_ms"] + 1  # due for its retry
    assert cli("--json", "run", "--name", sid).data["run"]["condition"] == "project_missing"
    after = status_file(home, sid)
    assert after["consecutive_failures"] == before["consecutive_failures"] == 1
    assert after["next_retry_at_ms"] == before["next_retry_at_ms"]
    assert after["next_due_at_ms"] == before["next_due_at_ms"]
    assert after["last_run"] == before["last_run"]


def test_a_trigger_skipped_by_a_condition_exits_1_with_code_skipped_and_the_record(
    cli, installed, project, tmp_path, monkeypatch
):
    sid = installed["service_id"]
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "away")
    result = cli("--json", "trigger", "--name", sid)
    assert result.code == 1
    assert result.doc["error"]["code"] == "skipped"
    assert result.doc["error"]["message"] == f"not synced: project folder missing ({project})"
    assert result.doc["data"]["run"]["condition"] == "project_missing"
    plain = cli("trigger", "--name", sid)
    assert plain.code == 1 and "not synced: project folder missing" in plain.err and "hint" in plain.err.lower()


def test_status_shows_the_last_skip_and_a_stale_service_names_the_condition_as_its_cause(
    cli, installed, project, system, tmp_path, monkeypatch
):
    sid = installed["service_id"]
    system.clock_ms = system.now_ms()
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "away")
    for _ in range(4):
        system.clock_ms += 3600 * 1000
        assert cli("run", "--name", sid).code == 0
    system.clock_ms += DAY_MS
    text = cli("status", "--name", sid).out
    assert "last skip" in text and f"project folder missing ({project}) (4 in a row)" in text
    assert "STALE" in text
    assert f"cause: the runs are skipped: project folder missing ({project}) (4 in a row)" in text
    doc = cli("--json", "status", "--name", sid).data
    assert doc["state"] == "stale" and doc["stale"] is True


def test_doctor_fails_a_missing_project_folder_with_the_fix(cli, installed, project, tmp_path, monkeypatch):
    sid = installed["service_id"]
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "away")
    result = cli("--json", "doctor", "--name", sid)
    check = next(c for c in result.data["checks"] if c["name"] == "project")
    assert check["status"] == "fail" and "runs are skipped" in check["message"]
    assert "mount the drive" in check["hint"]


def test_identical_skips_coalesce_but_a_different_condition_starts_a_new_entry():
    cfg = ls.ServiceConfig()
    status = ls.Status(service_id="svc")

    def skip(at: int, condition: str, reason: str) -> ls.RunRecord:
        iso = ls.iso_from_ms(at)
        return ls.RunRecord(f"{at:x}-1", "scheduled", iso, iso, 0, "skipped", None, [], at, condition, reason)

    ls.apply_skip(status, skip(1_000, "offline", "offline (a:443 unreachable)"), cfg)
    ls.apply_skip(status, skip(2_000, "offline", "offline (a:443 unreachable)"), cfg)
    ls.apply_skip(status, skip(3_000, "project_missing", "project folder missing (/p)"), cfg)
    ls.apply_skip(status, skip(4_000, "offline", "offline (a:443 unreachable)"), cfg)
    assert [(r.condition, r.repeats) for r in status.history] == [
        ("offline", 1),
        ("project_missing", 1),
        ("offline", 2),
    ]
    first = status.history[2]
    assert first.started_at_ms == 1_000 and first.finished_at_iso == ls.iso_from_ms(2_000)
    assert status.last_skip is status.history[0]
    assert status.consecutive_failures == 0 and status.next_retry_at_ms is None


def test_a_status_file_from_an_older_build_without_skip_fields_still_reads(home, tmp_path):
    iso = ls.iso_from_ms(5_000)
    old_run = {
        "run_id": "1388-1",
        "trigger": "scheduled",
        "started_at_iso": iso,
        "started_at_ms": 5_000,
        "finished_at_iso": iso,
        "duration_ms": 0,
        "outcome": "success",
        "error_class": None,
        "stage_results": [],
    }
    doc = {
        "schema_version": 1,
        "updated_at_iso": iso,
        "service_id": "svc",
        "last_run": old_run,
        "consecutive_failures": 0,
        "next_retry_at_ms": None,
        "next_due_at_ms": None,
        "paused": None,
        "history": [old_run],
    }
    status = ls.Status.from_dict(doc, "status.json")
    assert status.last_skip is None and status.history[0].repeats == 1 and status.history[0].condition is None
