"""The command-line contract: envelope, exit codes, errors without
tracebacks, --json anywhere, service lookup. Through main(argv) and through
real subprocesses of `python lore_service.py`."""

from __future__ import annotations

import json
import os

import pytest
from conftest import TOKEN

import lore_service as ls


def test_json_envelope_success_and_error_shapes(cli, installed):
    ok = cli("--json", "status")
    assert ok.code == 0 and set(ok.doc) == {"ok", "command", "data"} and ok.doc["command"] == "status"
    bad = cli("--json", "status", "--name", "nope")
    assert bad.code == 3 and bad.doc["ok"] is False
    assert set(bad.doc["error"]) == {"code", "message", "hint"} and bad.doc["error"]["hint"]


@pytest.mark.parametrize("argv", [["--json", "list"], ["list", "--json"], ["--robot", "list"], ["list", "--robot"]])
def test_json_and_robot_are_accepted_before_and_after_the_command(cli, installed, argv):
    r = cli(*argv)
    assert r.code == 0 and r.doc["command"] == "list"
    assert r.data["services"][0]["service_id"] == installed["service_id"]


def test_without_json_errors_are_one_error_line_and_one_hint_line(cli):
    r = cli("status")
    assert r.code == 3 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["frobnicate"], 2),
        ([], 2),
        (["install", "--interval"], 2),
        (["install", "--profile", "huge"], 2),
        (["install", "--backend", "kubernetes"], 2),
        (["logs", "--tail", "many"], 2),
        (["status", "--name", "Bad Name"], 2),
        (["status", "--name", "../../etc"], 2),
        (["status", "--name", "a" * 49], 2),
        (["install", "--name", "-leading-dash"], 2),
        (["install", "--name", "UPPER"], 2),
        (["install", "--name", "ünïcode"], 2),
        (["install", "--project", "/definitely/not/here"], 2),
        (["install", "--token-env", "1BAD"], 2),
        (["install", "--lore", "/no/such/lore"], 2),
        (["run", "--service-id", "ghost"], 3),
        (["pause"], 3),
        (["resume"], 3),
        (["logs"], 3),
        (["history"], 3),
        (["history", "--limit", "0"], 2),
        (["uninstall"], 3),
    ],
)
def test_bad_input_is_a_documented_exit_code_never_a_traceback(cli, argv, code):
    r = cli("--json", *argv)
    assert r.code == code, r.out + r.err
    doc = r.doc
    assert doc["ok"] is False and doc["error"]["message"] and "Traceback" not in r.out + r.err


@pytest.mark.parametrize(
    "interval", ["5s", "4m", "25h", "0m", "abc", "", "30", "1d", "-5m", "5.5m", "²h", "３０m", "9" * 5000 + "m"]
)
def test_intervals_outside_5m_to_24h_or_in_other_units_are_refused(cli, interval):
    r = cli("--json", "install", "--backend", "none", f"--interval={interval}", "--dry-run")
    assert r.code == 2 and r.doc["error"]["code"] == "bad_interval"


@pytest.mark.parametrize(("text", "seconds"), [("5m", 300), ("30m", 1800), ("90m", 5400), ("2h", 7200), ("24h", 86400)])
def test_intervals_in_range_parse(text, seconds):
    assert ls.parse_interval(text) == seconds


def test_version_reports_build_and_platform(cli):
    r = cli("--json", "--version")
    assert r.code == 0 and r.doc["command"] == "version"
    assert r.data["version"] == ls.__version__ and r.data["frozen"] is False
    assert r.data["python"].count(".") == 2 and r.data["platform"].startswith("linux")


def test_help_exits_zero_and_json_help_is_one_document(cli):
    assert cli("--help").code == 0
    r = cli("--json", "install", "--help")
    assert r.code == 0 and "--token-stdin" in r.data["help"]


def test_service_is_found_by_project_realpath_through_a_symlink(cli, installed, project, tmp_path, monkeypatch):
    link = tmp_path / "link-to-project"
    link.symlink_to(project)
    monkeypatch.chdir(link)
    assert cli("--json", "status").data["service_id"] == installed["service_id"]
    assert cli("--json", "status", "--project", str(link)).data["service_id"] == installed["service_id"]


def test_two_projects_get_distinct_ids_and_an_owned_id_is_refused(cli, installed, tmp_path):
    other = tmp_path / "elsewhere" / "my-project"
    other.mkdir(parents=True)
    second = cli("--json", "install", "--backend", "fake", "--project", str(other))
    assert second.code == 0 and second.data["service_id"] != installed["service_id"]
    assert second.data["service_id"].startswith("my-project-")
    stolen = cli("--json", "install", "--backend", "fake", "--project", str(other), "--name", installed["service_id"])
    assert stolen.code == 2 and stolen.doc["error"]["code"] == "id_taken" and "--name" in stolen.doc["error"]["hint"]


def test_derived_ids_are_valid_for_hostile_folder_names(tmp_path):
    for name in ["My Project", "ünïcödé", "---", "a" * 200, "x;rm -rf /", "$(id)", "🦊", "."]:
        sid = ls.derive_service_id(str(tmp_path / name))
        assert ls.is_valid_service_id(sid), (name, sid)


def test_ambiguous_project_lookup_asks_for_a_name(cli, installed, project):
    assert cli("--json", "install", "--backend", "fake", "--name", "second-one").code == 0
    r = cli("--json", "status")
    assert r.code == 2 and r.doc["error"]["code"] == "ambiguous" and "second-one" in r.doc["error"]["message"]
    assert cli("--json", "status", "--name", "second-one").code == 0


def test_real_subprocess_status_in_an_empty_home_is_not_installed(tool):
    r = tool("--json", "status")
    assert r.code == 3 and json.loads(r.out)["data"] == {"state": "not_installed"}
    assert r.err == ""


def test_real_subprocess_install_trigger_status_cycle(tool, project, lore_bin):
    install = tool("--json", "install", "--backend", "none", "--interval", "1h")
    assert install.code == 0, install.out + install.err
    assert TOKEN not in install.out
    run = tool("--json", "trigger")
    assert run.code == 0, run.out + run.err
    status = json.loads(tool("--json", "status").out)["data"]
    assert status["state"] == "healthy" and status["last_run"]["trigger"] == "manual"
    human = tool("status")
    assert "HEALTHY" in human.out and "last run" in human.out


def test_real_subprocess_garbage_input_never_prints_a_traceback(tool):
    for argv in (
        ["--json", "install", "--interval", "\udcff"],
        ["status", "--name", "\x01"],
        ["--home"],
        ["install", "--project", "x" * 5000],
        ["logs", "--tail", "-1"],
        ["history", "--limit", "\udcff"],
    ):
        r = tool(*[a.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for a in argv])
        assert "Traceback" not in r.out + r.err, argv
        assert r.code in (2, 3), (argv, r.code, r.err)


def test_run_is_found_by_service_id_from_any_folder(tool, project, tmp_path):
    assert tool("--json", "install", "--backend", "none").code == 0
    sid = json.loads(tool("--json", "list").out)["data"]["services"][0]["service_id"]
    r = tool("--json", "run", "--service-id", sid, cwd=tmp_path)
    assert r.code == 0 and json.loads(r.out)["data"]["run"]["outcome"] == "success"


def test_status_all_and_list_cover_every_service(cli, installed, tmp_path):
    other = tmp_path / "p2"
    other.mkdir()
    cli("--json", "install", "--backend", "none", "--project", str(other))
    everything = cli("--json", "status", "--all")
    assert everything.code == 0 and len(everything.data["services"]) == 2
    states = {s["service_id"]: s["state"] for s in cli("--json", "list").data["services"]}
    assert set(states.values()) == {"idle"}


def test_list_and_status_all_show_every_service_and_fail_on_an_unreadable_one(cli, installed, tmp_path, home):
    other = tmp_path / "p2"
    other.mkdir()
    second = cli("--json", "install", "--backend", "none", "--project", str(other)).data["service_id"]
    (home / "state" / second / "status.json").write_text("{torn")
    for argv in (["list"], ["status", "--all"]):
        r = cli("--json", *argv)
        assert r.code == 4 and r.doc["ok"] is False and r.doc["error"]["code"] == "state_corrupt"
        rows = {row["service_id"]: row for row in r.data["services"]}
        assert "error" in rows[second] and "error" not in rows[installed["service_id"]]
    text = cli("list")
    assert text.code == 4 and installed["service_id"] in text.out and "hint:" in text.err


def test_relocated_home_is_used_by_the_scheduler_entry(cli, installed, home):
    manifest = json.loads((home / "config" / installed["service_id"] / "manifest.json").read_text())
    program = manifest["program"]
    assert program[program.index("--home") + 1] == str(home)
    assert program[-3:] == ["run", "--service-id", installed["service_id"]]
    assert all(os.path.isabs(p) for p in program[:2])


def test_iso_timestamps_round_trip_and_garbage_is_none():
    for ms in (0, 1_700_000_000_000, 1_795_825_944_123):
        assert ls.ms_from_iso(ls.iso_from_ms(ms)) == ms
    assert ls.ms_from_iso("yesterday") is None and ls.ms_from_iso("") is None


def test_human_status_shows_times_in_local_time_with_relative_hints(cli, installed, system):
    system.clock_ms = 1_795_825_944_000
    cli("--json", "trigger")
    system.clock_ms += 90_000
    text = cli("status").out
    assert "last run    " in text and "ago), manual: success" in text


def test_robot_output_survives_an_ascii_only_stdout(tool, environ, tmp_path):
    project = tmp_path / "café"
    project.mkdir()
    env = {**environ, "PYTHONIOENCODING": "ascii"}
    assert tool("--json", "install", "--backend", "none", "--project", str(project), env=env).code == 0
    r = tool("--json", "status", "--project", str(project), env=env)
    assert r.code == 0 and json.loads(r.out)["data"]["project_root"] == str(project)
    human = tool("status", "--project", str(project), env=env)
    assert human.code == 0 and "caf" in human.out


def test_a_closed_pipe_ends_logs_follow_quietly(environ, project, tool, program):
    import subprocess
    import time

    assert tool("--json", "install", "--backend", "none").code == 0
    assert tool("--json", "trigger").code == 0
    proc = subprocess.Popen(
        [*program, "logs", "--follow", "--tail", "5"],
        cwd=project,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    time.sleep(0.3)
    tool("--json", "trigger")  # new lines hit the closed pipe
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and b"Traceback" not in err


def test_help_lists_the_exit_codes(cli):
    r = cli("--json", "--help")
    assert "exit codes: 0 success" in r.data["help"] and "6 scheduler or prerequisite failure" in r.data["help"]


@pytest.mark.parametrize(
    ("where", "name"),
    [("project", "line\nbreak"), ("project", "tab\there"), ("project", "bytes-\udcff-not-utf8"), ("home", "h\x1bome")],
)
def test_hostile_paths_are_refused_before_anything_is_written(tool, tmp_path, home, where, name):
    """Paths end up in unit files, crontab lines and XML: a control character
    could smuggle in a directive, and bytes that are not UTF-8 fit in none."""
    folder = tmp_path / name
    folder.mkdir()
    argv = ["--project", str(folder)] if where == "project" else ["--home", str(folder), "--project", str(tmp_path)]
    r = tool("--json", "install", "--backend", "none", *argv)
    assert r.code == 2 and r.doc["error"]["code"] == "bad_path" and "Traceback" not in r.err, r.out + r.err
    assert not home.exists() and not any(folder.iterdir())


def test_a_lore_path_with_a_line_break_is_refused(cli, tmp_path):
    lore = tmp_path / "evil\nExecStartPre=rm"
    lore.write_text("#!/bin/sh\n")
    lore.chmod(0o755)
    r = cli("--json", "install", "--backend", "none", "--lore", str(lore), "--dry-run")
    assert r.code == 2 and r.doc["error"]["code"] == "bad_path"
