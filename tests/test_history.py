"""Run history: the strip of marks on the `status` screen (and its ASCII
stand-ins where the terminal's encoding cannot show the symbols), and the
`history` command that lists the runs status.json keeps."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from conftest import edit_config, write_plan

import lore_service as ls

STRIP = re.compile(r"^  history     (\S+)  newest last$", re.M)


def run_four_kinds(tool, project: Path, tmp_path: Path) -> str:
    """A degraded, a failed and a successful run, then three scheduled runs
    skipped because the project folder is gone (one coalesced entry); the
    service id. Leaves the folder away."""
    installed = tool("--json", "install", "--backend", "none")
    assert installed.code == 0, installed.err
    sid = installed.data["service_id"]
    for plan, code in (({"docs": {"exit": 3}}, 0), ({"mrs": {"exit": 75}}, 1), ({}, 0)):
        write_plan(project, plan)
        assert tool("trigger").code == code
    project.rename(tmp_path / "unmounted")
    for _ in range(3):
        assert tool("run", "--name", sid, cwd=tmp_path).code == 0
    return sid


@pytest.mark.parametrize(
    ("env", "strip"),
    [
        ({}, "\u25d0\u2718\u2714\u25cb"),  # LANG=C.UTF-8: ◐✘✔○
        ({"PYTHONIOENCODING": "ascii"}, "~x+-"),  # the encoding cannot write them
        ({"LC_ALL": "C"}, "~x+-"),  # Python would write UTF-8, but a C-locale terminal cannot show it
    ],
)
def test_status_shows_the_last_runs_as_marks_newest_last(tool, environ, project, tmp_path, env, strip):
    sid = run_four_kinds(tool, project, tmp_path)
    if "PYTHONIOENCODING" in env and not tool.program[-1].endswith(".py"):
        # the frozen program ignores PYTHON* variables (PyInstaller's interpreter
        # runs without them): its stdout stays UTF-8, so the marks are right there
        strip = "\u25d0\u2718\u2714\u25cb"
    result = tool("status", "--name", sid, cwd=tmp_path, env={**environ, **env})
    assert result.code == 0, result.err
    assert STRIP.findall(result.out) == [strip]  # the three skips in a row are one entry, one mark
    assert "\x1b" not in result.out  # a pipe gets no colour


def test_history_lists_each_run_newest_last_with_its_stages_and_a_skip_with_its_count(tool, environ, project, tmp_path):
    sid = run_four_kinds(tool, project, tmp_path)
    result = tool("history", "--name", sid, cwd=tmp_path)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split() == ["started", "trigger", "took", "outcome", "stages"]
    when = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    took = r" *[0-9.]+s"
    assert re.fullmatch(rf"{when}  manual   {took}  degraded  issues \u2714 mrs \u2714 docs \u2718", lines[1])
    assert re.fullmatch(rf"{when}  manual   {took}  failed    issues \u2714 mrs \u2718 docs \u2714", lines[2])
    assert re.fullmatch(rf"{when}  manual   {took}  success   issues \u2714 mrs \u2714 docs \u2714", lines[3])
    skip = rf"{when}  scheduled       -  skipped   project folder missing \({re.escape(str(project))}\)"
    assert re.fullmatch(rf"{skip} \(3 in a row, the last at {when}\)", lines[4]), lines[4]
    assert len(lines) == 5
    ascii_only = tool("history", "--name", sid, cwd=tmp_path, env={**environ, "LC_ALL": "C"})
    assert ascii_only.out.splitlines()[1].endswith("  degraded  issues + mrs + docs x")


def test_history_shows_a_stage_that_timed_out_and_one_that_never_ran_in_words(cli, installed, home, project):
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc["stages"]["docs"].update(timeout_seconds=1))
    write_plan(project, {"docs": {"hang": True}})
    assert cli("trigger").code == 0  # degraded
    write_plan(project, {"issues": {"exit": 75}, "mrs": {"exit": 75}})
    assert cli("trigger").code == 1
    lines = cli("history").out.splitlines()
    assert lines[1].endswith("  degraded  issues \u2714 mrs \u2714 docs timeout")
    assert lines[2].endswith("  failed    issues \u2718 mrs \u2718 docs -")


def test_history_limit_gives_the_newest_runs_and_json_has_them_newest_first(cli, installed, project):
    for plan in ({"docs": {"exit": 3}}, {}, {"mrs": {"exit": 75}}):
        write_plan(project, plan)
        cli("trigger")
    two = cli("--json", "history", "--limit", "2")
    assert two.code == 0 and two.doc["command"] == "history"
    assert two.data["limit"] == 2 and two.data["history_limit"] == ls.HISTORY_LIMIT
    assert [r["outcome"] for r in two.data["runs"]] == ["failed", "success"]
    assert two.data["service_id"] == installed["service_id"]
    text = cli("history", "--limit", "2").out.splitlines()
    assert [re.search(r"  (\w+) +issues ", line)[1] for line in text[1:]] == ["success", "failed"]  # type: ignore[index]
    assert [r["outcome"] for r in cli("--json", "history", "--limit", "999").data["runs"]] == [
        "failed",
        "success",
        "degraded",
    ]


def test_history_keeps_the_last_twenty_runs(cli, installed, home):
    """HISTORY_LIMIT stays 20: status.json is rewritten whole by every run and
    read by every `status` (and `status --all` reads every service's)."""
    for _ in range(ls.HISTORY_LIMIT + 2):
        assert cli("trigger").code == 0
    runs = cli("--json", "history", "--limit", "100").data["runs"]
    assert len(runs) == ls.HISTORY_LIMIT == 20
    assert runs == sorted(runs, key=lambda r: r["started_at_ms"], reverse=True)


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "", "2.5", "\uff13", "1" * 12, " 3"])
def test_a_bad_limit_is_a_usage_error(cli, installed, limit):
    result = cli("--json", "history", "--limit", limit)
    assert result.code == 2
    assert result.doc["ok"] is False and result.doc["error"]["code"] in ("usage", "empty_value")
    assert "--limit" in result.doc["error"]["message"]


def test_history_of_a_service_without_runs_and_of_none_installed(cli, installed):
    result = cli("history")
    assert result.code == 0 and result.out == f"{installed['service_id']}: no runs yet\n"
    assert cli("--json", "history").data["runs"] == []
    assert cli("--json", "history", "--name", "ghost").code == 3


def test_status_without_runs_has_no_history_line(cli, installed):
    out = cli("status").out
    assert "history" not in out and "last run    none yet" in out


def test_the_strip_marks_every_outcome_and_a_coalesced_skip_once():
    def run(outcome: str, repeats: int = 1) -> ls.RunRecord:
        at = ls.iso_from_ms(int(time.time() * 1000))
        skipped = outcome == "skipped"
        return ls.RunRecord(
            "1-1", "scheduled", at, at, 0, outcome, None, [], 0,
            "offline" if skipped else None, "offline (gitlab.example.com:443 unreachable)" if skipped else None,
            repeats,
        )  # fmt: skip

    history = [run("skipped", 7), run("success"), run("degraded"), run("failed")]  # newest first
    unicode = ls.Console(unicode=True)
    assert ls.history_strip(history, unicode).plain == "\u2718\u25d0\u2714\u25cb"
    assert ls.history_strip(history, ls.Console()).plain == "x~+-"
    colours = [c for _, c in ls.history_strip(history, unicode).pieces]
    assert colours == [ls.RED, ls.YELLOW, ls.GREEN, ls.DIM]
