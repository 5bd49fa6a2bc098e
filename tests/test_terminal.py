"""What a person at a terminal sees: `trigger`'s live progress and the
coloured state word of `status`, through a real pseudo-terminal running the
real CLI; and what a pipe, NO_COLOR and TERM=dumb get instead (no escape
codes). The view's own mechanics (thread safety, a terminal that goes away,
widths) are tested in-process."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, FakeSystem, wait_until, write_plan

import lore_service as ls

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="pseudo-terminals are a Unix thing")

SPINNER = ls.SPINNERS[0]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TOOK = r"[0-9.]+[smh][0-9]*m?"  # human_duration: 1.2s, 42s, 3m, 2h05m


def set_columns(fd: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))


class Terminal:
    """The real CLI with a pseudo-terminal as its stdin, stdout and stderr,
    `columns` wide (TIOCSWINSZ); a thread collects everything it writes."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, columns: int = 60) -> None:
        self.master, slave = os.openpty()
        set_columns(slave, columns)
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
        os.close(slave)
        self.data = bytearray()
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every writer has closed its end
                return
            if not chunk:
                return
            with self.lock:
                self.data += chunk

    @property
    def screen(self) -> str:
        with self.lock:
            return bytes(self.data).decode("utf-8", "replace")

    def frames(self, stage: str) -> list[str]:
        """The live lines drawn for `stage` (colours taken out), in order."""
        plain = ANSI.sub("", self.screen)
        return [f for f in re.split(r"\r(?!\n)", plain) if re.match(rf"[{SPINNER}|/\\-] {stage} ", f)]

    def wait_for(self, what: str, holds: Any) -> None:
        wait_until(lambda: holds(self), 60)
        assert holds(self), f"never saw {what}; the terminal shows: {self.screen!r}"

    def resize(self, columns: int) -> None:
        set_columns(self.master, columns)

    def finish(self) -> int:
        code = self.proc.wait(timeout=120)
        self.reader.join(10)
        os.close(self.master)
        return code


def release(project: Path, stage: str) -> None:
    (project / f".release-{stage}").write_text("")


@pytest.fixture
def installed_here(tool) -> None:
    result = tool("--json", "install", "--backend", "none")
    assert result.code == 0, result.err


def terminal_env(environ: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k not in ("NO_COLOR", "COLUMNS")}
    return {**env, "TERM": "xterm-256color", **extra}


# -- trigger's live progress ------------------------------------------------------------


def test_trigger_at_a_terminal_shows_each_stage_live_then_one_finished_line_each(
    tool, installed_here, environ, project
):
    long_line = "x" * 300
    write_plan(
        project,
        {
            "issues": {"print_token": True, "wait_for": ".release-issues"},
            "mrs": {"print_raw": long_line + "\n", "wait_for": ".release-mrs"},
            "docs": {"exit": 3},
        },
    )
    term = Terminal([*tool.program, "trigger"], terminal_env(environ), project, columns=60)
    # the running stage: its name, elapsed time, a spinner that turns, and its latest line, redacted
    term.wait_for(
        "the spinner turning on issues' latest line",
        lambda t: len({f[0] for f in t.frames("issues") if f.rstrip(" ").endswith("token is <redacted>")}) >= 2,
    )
    redacted = [f.rstrip(" ") for f in term.frames("issues") if f.rstrip(" ").endswith("token is <redacted>")]
    assert all(re.fullmatch(rf"[{SPINNER}] issues +{TOOK}  token is <redacted>", f) for f in redacted), redacted
    release(project, "issues")
    # mrs's line of 300 x is cut to the terminal's width, less the last column (which would wrap)
    term.wait_for("mrs's latest line", lambda t: any("xxx" in f for f in t.frames("mrs")))
    assert all(len(f.rstrip(" ")) <= 59 for f in term.frames("mrs"))
    assert max(len(f) for f in term.frames("mrs") if "xxx" in f) == 59
    term.resize(40)  # asked at every redraw: a narrower window gets shorter lines
    term.wait_for("a redraw at 40 columns", lambda t: len(t.frames("mrs")[-1].rstrip(" ")) == 39)
    release(project, "mrs")
    assert term.finish() == 0  # degraded: an optional stage failed
    screen = ANSI.sub("", term.screen)
    assert TOKEN not in term.screen
    finished = [line.split("\r")[-1] for line in screen.split("\r\n")]
    assert any(re.fullmatch(rf"\u2714 issues +{TOOK}  success", line) for line in finished), finished
    assert any(re.fullmatch(rf"\u2714 mrs +{TOOK}  success", line) for line in finished), finished
    assert any(re.fullmatch(rf"\u2718 docs +{TOOK}  failed: exit status 3", line) for line in finished), finished
    assert any(re.fullmatch(rf"run [0-9a-f]+-[0-9a-f]+: degraded in {TOOK}", line) for line in finished)
    assert not any(line.startswith("  issues ") for line in finished)  # the summary does not list them again
    # colours at a terminal: the marks and outcomes, and nothing but SGR codes
    assert "\x1b[32m\u2714\x1b[0m issues" in term.screen and "\x1b[31mfailed\x1b[0m" in term.screen
    sgr = {"\x1b[0m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[36m"}
    assert set(re.findall(r"\x1b\[[0-9;]*[A-Za-z]", term.screen)) <= sgr


def test_no_color_at_a_terminal_still_draws_the_stages_but_sends_no_escape_code(tool, installed_here, environ, project):
    write_plan(project, {"issues": {"wait_for": ".release-issues"}, "docs": {"exit": 3}})
    term = Terminal([*tool.program, "trigger"], terminal_env(environ, NO_COLOR="1"), project)
    term.wait_for("issues running", lambda t: any("fake lore: stage issues" in f for f in t.frames("issues")))
    release(project, "issues")
    assert term.finish() == 0
    assert "\x1b" not in term.screen
    assert "\u2714 issues" in term.screen and "\u2718 docs" in term.screen


def test_a_dumb_terminal_gets_plain_lines_without_escape_codes_or_redraws(tool, installed_here, environ, project):
    write_plan(project, {"docs": {"exit": 3}})
    term = Terminal([*tool.program, "trigger"], terminal_env(environ, TERM="dumb"), project)
    assert term.finish() == 0
    screen = term.screen
    assert "\x1b" not in screen and not re.search(r"\r(?!\n)", screen)  # a pty turns \n into \r\n
    lines = screen.split("\r\n")
    assert lines[0] == "issues ..." and re.fullmatch(rf"\u2714 issues +{TOOK}  success", lines[1]), lines
    assert lines[2] == "mrs ..." and "docs ..." in lines
    assert any(re.fullmatch(rf"\u2718 docs +{TOOK}  failed: exit status 3", line) for line in lines), lines


def test_without_a_terminal_trigger_prints_what_it_always_did(tool, installed_here, environ, project):
    write_plan(project, {"docs": {"exit": 3}})
    result = tool("trigger")
    assert result.code == 0
    assert "\r" not in result.out and "\x1b" not in result.out
    lines = result.out.splitlines()
    assert re.fullmatch(rf"run [0-9a-f]+-[0-9a-f]+: degraded in {TOOK}", lines[0])
    assert [line.split()[:2] for line in lines[1:]] == [["issues", "success"], ["mrs", "success"], ["docs", "failed"]]


def test_json_at_a_terminal_is_the_one_document_it_always_was(tool, installed_here, environ, project):
    term = Terminal([*tool.program, "--json", "trigger"], terminal_env(environ), project)
    assert term.finish() == 0
    doc = json.loads(term.screen)
    assert doc["ok"] is True and doc["data"]["run"]["outcome"] == "success"
    assert "\x1b" not in term.screen


# -- status colours its state word -------------------------------------------------------


def test_status_at_a_terminal_colours_the_state_word_and_the_history_marks(tool, installed_here, environ, project):
    assert tool("trigger").code == 0
    write_plan(project, {"mrs": {"exit": 75}})
    assert tool("trigger").code == 1
    term = Terminal([*tool.program, "status"], terminal_env(environ), project)
    assert term.finish() == 0
    assert re.match(r"[a-z0-9-]+: \x1b\[33mBACKOFF\x1b\[0m\r\n", term.screen), term.screen
    assert "  history     \x1b[32m\u2714\x1b[0m\x1b[31m\u2718\x1b[0m  newest last" in term.screen
    for extra in ({"NO_COLOR": "1"}, {"TERM": "dumb"}):
        term = Terminal([*tool.program, "status"], terminal_env(environ, **extra), project)
        assert term.finish() == 0
        assert "\x1b" not in term.screen and ": BACKOFF\r\n" in term.screen
        assert "  history     \u2714\u2718  newest last" in term.screen
    piped = tool("status")
    assert "\x1b" not in piped.out and ": BACKOFF\n" in piped.out


def test_escape_codes_in_a_pause_reason_stay_harmless_in_a_coloured_status(cli, installed, system):
    assert cli("pause", "--reason", "red \x1b[31malert\x1b]0;title\x07").code == 0
    paths = ls.Paths(system)
    manifest = ls.load_manifest(paths, installed["service_id"])
    assert manifest is not None
    report = ls.service_report(ls.Context(system, paths, False), manifest)
    text = ls._render_status(report, system.now_ms(), ls.Console(tty=True, color=True, unicode=True)).render(True)
    assert "\x1b[31mPAUSED\x1b[0m" in text
    assert "red \\x1b[31malert\\x1b]0;title\\x07" in text  # the reason's own codes are shown, not sent


# -- the view's mechanics, in-process ----------------------------------------------------


class TtyStream(io.StringIO):
    """A terminal for in-process tests: a tty whose writes are recorded one by one,
    and that notices two writes at once (the view must hold its lock for each)."""

    encoding = "utf-8"

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.busy = False
        self.overlaps = 0

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.busy:
            self.overlaps += 1
        self.busy = True
        time.sleep(0.0002)  # widens the window in which a second, unlocked writer would be seen
        self.writes.append(text)
        self.busy = False
        return len(text)


class BrokenTerminal(TtyStream):
    """The terminal went away (its window closed): every write fails with EIO."""

    def write(self, text: str) -> int:
        raise OSError(5, "Input/output error")


class NarrowSystem(FakeSystem):
    def terminal_columns(self, stream: Any) -> int | None:
        return 40


def test_the_view_redraws_from_one_thread_at_a_time_and_never_after_the_stage_ends(environ):
    stream = TtyStream()
    view = ls.LiveProgress(NarrowSystem(environ), stream, ls.Console(tty=True, color=False, unicode=True))
    view.stage_started("issues")

    def pump(n: int) -> None:  # what a stage's pump thread does: note lines as they come
        for i in range(3000):
            view.stage_output("issues", f"line {n}-{i}")

    pumps = [threading.Thread(target=pump, args=(n,)) for n in range(4)]
    for t in pumps:
        t.start()
    for t in pumps:
        t.join()
    drawn = len(stream.writes)
    wait_until(lambda: len(stream.writes) >= max(5, drawn + 1), 60)  # a frame drawn after the last line came
    view.stage_finished(ls.StageResult("issues", True, "success", 0, 1200, None, "ok"))
    ticks = view.ticks
    wait_until(lambda: view.ticks >= ticks + 3, 30)  # three more ticks: none may draw the ended stage
    view.close()
    assert view.ticks >= ticks + 3 and stream.overlaps == 0
    finished = stream.writes.index("\u2714 issues       1.2s  success\n")
    assert not any(re.match(rf"\r[{SPINNER}]", w) for w in stream.writes[finished:])
    frames = [w for w in stream.writes[:finished] if re.match(rf"\r[{SPINNER}]", w)]
    assert len(frames) >= 5 and all(len(f[1:].rstrip(" ")) <= 39 for f in frames)
    assert all(re.fullmatch(rf"\r[{SPINNER}] issues +{TOOK}  (line \d-\d+)? *", f) for f in frames), frames[:3]
    assert re.match(rf"\r[{SPINNER}] issues +{TOOK}  line \d-2999 *$", frames[-1]), frames[-1]


def test_a_terminal_that_goes_away_silences_the_view_and_the_run_is_still_recorded(cli, installed, system, home):
    paths = ls.Paths(system)
    manifest = ls.load_manifest(paths, installed["service_id"])
    assert manifest is not None
    view = ls.LiveProgress(system, BrokenTerminal(), ls.Console(tty=True, color=True, unicode=True))
    result = ls.run_service(system, paths, manifest, "manual", observer=view)
    view.close()
    assert view.broken
    assert result.record is not None and result.record.outcome == "success"
    assert ls.load_status(paths, manifest.service_id).last_run == result.record


class Recorder(ls.RunObserver):
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []
        self.lock = threading.Lock()

    def stage_started(self, stage: str) -> None:
        with self.lock:
            self.events.append(("started", stage))

    def stage_output(self, stage: str, line: str) -> None:
        with self.lock:
            self.events.append(("output", stage, line))

    def stage_finished(self, result: ls.StageResult) -> None:
        with self.lock:
            self.events.append(("finished", result.stage, result.outcome))


def test_the_run_tells_its_observer_each_stage_its_redacted_lines_and_its_end(installed, system, project):
    write_plan(project, {"issues": {"exit": 75, "print_token": True}, "mrs": {"exit": 75}})
    paths = ls.Paths(system)
    manifest = ls.load_manifest(paths, installed["service_id"])
    assert manifest is not None
    seen = Recorder()
    result = ls.run_service(system, paths, manifest, "manual", observer=seen)
    assert result.record is not None and result.record.outcome == "failed"
    assert seen.events == [
        ("started", "issues"),
        ("output", "issues", "fake lore: stage issues"),
        ("output", "issues", "token is <redacted>"),
        ("output", "issues", "fake lore: failing with 75"),
        ("finished", "issues", "failed"),
        ("started", "mrs"),
        ("output", "mrs", "fake lore: stage mrs"),
        ("output", "mrs", "fake lore: failing with 75"),
        ("finished", "mrs", "failed"),
        ("finished", "docs", "skipped"),  # never started: no critical stage succeeded
    ]
    assert TOKEN not in repr(seen.events)


def test_a_view_is_made_only_for_a_person_at_a_terminal(environ, tmp_path):
    system = FakeSystem(environ)
    paths = ls.Paths(system)
    tty = ls.Console(tty=True, color=True, unicode=True)
    assert isinstance(ls.live_progress(ls.Context(system, paths, False, TtyStream(), tty)), ls.LiveProgress)
    assert ls.live_progress(ls.Context(system, paths, True, TtyStream(), tty)) is None  # --json
    assert ls.live_progress(ls.Context(system, paths, False, io.StringIO(), ls.Console())) is None  # a pipe
    container = FakeSystem({**environ, "LORE_SERVICE_LOG_STDOUT": "1"})  # log lines go to stdout already
    assert ls.live_progress(ls.Context(container, paths, False, TtyStream(), tty)) is None


@pytest.mark.parametrize(
    ("env", "platform", "encoding", "tty", "expect"),
    [
        ({"LANG": "en_US.UTF-8", "TERM": "xterm"}, "linux", "utf-8", True, (True, True, False)),
        ({"LANG": "en_US.UTF-8", "TERM": "xterm"}, "linux", "utf-8", False, (False, True, False)),
        ({"LANG": "en_US.UTF-8", "NO_COLOR": "1"}, "linux", "utf-8", True, (False, True, False)),
        ({"LANG": "en_US.UTF-8", "NO_COLOR": ""}, "linux", "utf-8", True, (True, True, False)),  # empty: not set
        ({"LANG": "en_US.UTF-8", "TERM": "dumb"}, "linux", "utf-8", True, (False, True, True)),
        ({"LANG": "en_US.UTF-8"}, "linux", "ascii", True, (True, False, False)),  # PYTHONIOENCODING=ascii
        ({"LANG": "en_US.UTF-8", "LC_ALL": "C"}, "linux", "utf-8", True, (True, False, False)),  # UTF-8 mode
        ({"LC_CTYPE": "POSIX"}, "linux", "utf-8", True, (True, False, False)),
        ({"LC_ALL": "C.UTF-8"}, "linux", "utf-8", True, (True, True, False)),
        ({}, "linux", "utf-8", True, (True, False, False)),  # no locale at all is the C locale
        ({}, "win32", "utf-8", True, (True, True, False)),  # Windows has no locale variables
        ({}, "win32", "cp1252", False, (False, False, False)),  # a Windows pipe
    ],
)
def test_what_the_console_can_show_follows_the_stream_and_the_environment(env, platform, encoding, tty, expect):
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    Stream.encoding = encoding  # type: ignore[assignment]  (a class attribute shadows StringIO's)
    stream = Stream()
    console = ls.console_of(FakeSystem(env, platform=platform), stream)
    assert (console.color, console.unicode, console.dumb) == expect and console.tty is tty


def test_lines_are_cut_by_terminal_columns_not_by_characters():
    assert ls.fit_width("abcdef", 4) == ("abcd", 4)
    assert ls.fit_width("日本語です", 5) == ("日本", 4)  # wide characters take two columns
    assert ls.fit_width("e\u0301e\u0301e\u0301", 2) == ("e\u0301e\u0301", 2)  # combining accents take none
    assert ls.fit_width("", 3) == ("", 0)
