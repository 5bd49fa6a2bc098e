"""logs --tail reads from the end; --follow keeps going across rotation."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading

from conftest import SCRIPT, write_plan

import lore_service as ls


def test_tail_returns_the_last_lines(cli, installed, project):
    write_plan(project, {})
    for _ in range(3):
        cli("--json", "trigger")
    r = cli("--json", "logs", "--tail", "5")
    assert r.code == 0 and len(r.data["lines"]) == 5
    assert r.data["lines"][-1].endswith("success in " + r.data["lines"][-1].rsplit(" in ", 1)[1])
    assert cli("--json", "logs", "--tail", "0").data["lines"] == []


def test_tail_of_a_missing_log_is_empty_not_an_error(cli, installed):
    r = cli("--json", "logs")
    assert r.code == 0 and r.data["lines"] == []
    assert "no log lines yet" in cli("logs").out


def test_tail_function_handles_partial_blocks_long_lines_and_no_final_newline(tmp_path):
    path = tmp_path / "log"
    lines = [f"line {i} " + "y" * (i * 37 % 3000) for i in range(2000)]
    path.write_text("\n".join(lines))
    for n in (1, 2, 10, 500, 1999, 2000, 5000):
        assert ls.tail_lines(str(path), n) == lines[-n:]


def test_tail_reaches_into_the_rotated_file(tmp_path):
    path = tmp_path / "service.log"
    (tmp_path / "service.log.1").write_text("old 1\nold 2\n")
    path.write_text("new 1\n")
    assert ls.tail_lines(str(path), 3) == ["old 1", "old 2", "new 1"]


def test_follow_with_json_is_a_usage_error(cli, installed):
    r = cli("--json", "logs", "--follow")
    assert r.code == 2


def test_follow_prints_new_lines_across_rotation_and_stops_cleanly_on_sigint(tool, environ, project, home):
    assert tool("--json", "install", "--backend", "none").code == 0
    sid = json.loads(tool("--json", "list").out)["data"]["services"][0]["service_id"]
    log = home / "logs" / sid / "service.log"
    log.write_text("before-follow\n")
    follower = subprocess.Popen(
        [sys.executable, SCRIPT, "logs", "--follow", "--tail", "1"],
        cwd=project,
        env=environ,
        stdout=subprocess.PIPE,
        text=True,
    )
    # each step waits for the follower to have printed the line before it, never
    # for a fixed time: a loaded machine only makes it slower, not wrong
    printed: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [printed.put(line) for line in follower.stdout], daemon=True)
    reader.start()
    out: list[str] = []
    try:
        out.append(printed.get(timeout=30).rstrip("\n"))
        with open(log, "a") as fh:
            fh.write("appended-1\n")
        out.append(printed.get(timeout=30).rstrip("\n"))
        log.rename(log.with_name("service.log.1"))
        log.write_text("after-rotation\n")
        out.append(printed.get(timeout=30).rstrip("\n"))
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=30)
        reader.join(timeout=10)
    out += [line.rstrip("\n") for line in iter_queue(printed)]
    assert follower.returncode == 0
    assert out == ["before-follow", "appended-1", "after-rotation"]


def iter_queue(items: queue.Queue[str]) -> list[str]:
    rest = []
    while not items.empty():
        rest.append(items.get_nowait())
    return rest


def test_follow_stops_on_ctrl_c_even_when_started_with_it_ignored(tool, environ, project, home):
    """A script's background job inherits SIGINT ignored; --follow still ends on it."""
    assert tool("--json", "install", "--backend", "none").code == 0
    sid = json.loads(tool("--json", "list").out)["data"]["services"][0]["service_id"]
    (home / "logs" / sid / "service.log").write_text("a line\n")
    follower = subprocess.Popen(
        [*tool.program, "logs", "--follow", "--tail", "1"],
        cwd=project,
        env=environ,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert follower.stdout is not None and follower.stdout.readline() == "a line\n"  # following now
    follower.send_signal(signal.SIGINT)
    assert follower.wait(timeout=30) == 0
    follower.stdout.close()
