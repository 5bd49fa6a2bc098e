"""cron backend: schedule steps, the crontab block, `%` and quoting, drift, doctor.

Everything runs through FakeSystem with an in-memory crontab answering
`crontab -l` and `crontab <file>` the way Debian's crontab does; the real
daemon is exercised in test_cron_e2e.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    TOKEN,
    FakeSystem,
    MacSystem,
    WinSystem,
    backend_and_manifest,
    commands_during,
    cron_box,
    detect,
    install,
    res,
    scheduler_state,
)
from harness.cron_daemon import cron_command_as_executed, split_crontab_line

import lore_service as ls

USER = "alice"


class MemoryCrontab:
    """`crontab -l` / `crontab FILE` of one user, kept in memory."""

    def __init__(self, text: str | None = None) -> None:
        self.text = text  # None: the user has no crontab
        self.writes: list[str] = []
        self.modes: list[int] = []

    def list(self, argv: list[str], _input: str | None) -> ls.CommandResult:
        if self.text is None:
            return res(1, "", f"no crontab for {USER}\n")
        return res(0, self.text)

    def install(self, argv: list[str], _input: str | None) -> ls.CommandResult:
        if argv[1:] == ["-r"]:
            self.text = None
            return res(0)
        path = argv[1]
        self.modes.append(os.stat(path).st_mode & 0o777)
        with open(path, encoding="utf-8", newline="") as fh:
            data = fh.read()
        if data and not data.endswith("\n"):
            return res(1, "", f'new crontab file is missing newline before EOF, can\'t install.\n"{path}"')
        self.text = data
        self.writes.append(data)
        return res(0)


@pytest.fixture
def crontab() -> MemoryCrontab:
    return MemoryCrontab()


@pytest.fixture
def csys(system: FakeSystem, crontab: MemoryCrontab) -> FakeSystem:
    """A Linux box with cron installed and its daemon running."""
    cron_box(system, crontab, USER)
    system.slept = []  # type: ignore[attr-defined]

    def sleep(seconds: float) -> None:  # recorded, and the fake clock moves on
        system.slept.append(seconds)  # type: ignore[attr-defined]
        if system.clock_ms is not None:
            system.clock_ms += round(seconds * 1000)

    system.sleep = sleep  # type: ignore[method-assign]
    return system


def block_of(text: str, sid: str) -> str:
    m = re.search(rf"# BEGIN lore-service {re.escape(sid)}\n.*?# END lore-service {re.escape(sid)}\n", text, re.S)
    assert m, text
    return m.group(0)


def job_line(text: str, sid: str) -> str:
    return block_of(text, sid).splitlines()[1]


# -- schedule ---------------------------------------------------------------------------

STEP_TABLE = [
    ("5m", 300, r"[0-4]-59/5 \* \* \* \*"),
    ("30m", 1800, r"([0-9]|[12][0-9])-59/30 \* \* \* \*"),
    ("45m", 900, r"([0-9]|1[0-4])-59/15 \* \* \* \*"),
    ("90m", 1800, r"([0-9]|[12][0-9])-59/30 \* \* \* \*"),
    ("2h", 7200, r"[0-5]?[0-9] [01]-23/2 \* \* \*"),
    ("7h", 3600, r"[0-5]?[0-9] \* \* \* \*"),
    ("24h", 86400, r"[0-5]?[0-9] (1?[0-9]|2[0-3]) \* \* \*"),
]


@pytest.mark.parametrize(("interval", "step", "pattern"), STEP_TABLE)
def test_step_and_expression(interval: str, step: int, pattern: str) -> None:
    seconds = ls.parse_interval(interval)
    assert ls.cron_step(seconds) == step
    assert seconds % step == 0
    expr = ls.cron_expression("proj-1234abcd", step)
    assert re.fullmatch(pattern, expr), expr
    assert ls.cron_expression("proj-1234abcd", step) == expr  # stable per service
    # fires exactly every `step`: consecutive firings over two days are evenly spaced
    t, fires = 1_800_000_000_000, []
    for _ in range(6):
        t = ls.cron_next_ms(expr, t)
        assert t is not None
        fires.append(t)
    gaps = {b - a for a, b in zip(fires, fires[1:], strict=False)}
    assert gaps == {step * 1000}, (expr, gaps)


def test_every_step_divides_and_is_largest() -> None:
    for minutes in range(5, 24 * 60 + 1, 5):
        seconds = minutes * 60
        step = ls.cron_step(seconds)
        assert step in ls.CRON_STEPS and seconds % step == 0
        assert not [s for s in ls.CRON_STEPS if step < s <= seconds and seconds % s == 0]


def test_offsets_spread_services() -> None:
    minutes = {ls.cron_expression(f"svc-{i}", 1800).split("-")[0] for i in range(40)}
    hours = {ls.cron_expression(f"svc-{i}", 86400) for i in range(40)}
    assert len(minutes) > 10 and len(hours) > 30


def test_step_recorded_in_manifest_and_warned(cli, csys: FakeSystem) -> None:
    r = install(cli, "cron", "--interval", "45m")
    assert r.code == 0, r.err + r.out
    assert r.data["schedule_step_seconds"] == 900
    assert any("fires every 15m" in w for w in r.data["warnings"])
    _, manifest = backend_and_manifest(csys, ls.CronBackend, r.data["service_id"])
    assert (manifest.interval_seconds, manifest.schedule_step_seconds) == (2700, 900)


def test_describe() -> None:
    assert ls.cron_describe("7-59/15 * * * *") == "every 15 minutes, at :07, :22, :37, :52"
    assert ls.cron_describe("5 * * * *") == "every hour at :05"
    assert ls.cron_describe("5 3 * * *") == "daily at 03:05 (local time)"
    assert ls.cron_describe("* * * * *") == "every minute"
    assert ls.cron_describe("@reboot x") == "`@reboot x`"


def test_next_run_is_local_time() -> None:
    expr = "17 3 * * *"
    now = int(time.time() * 1000)
    nxt = ls.cron_next_ms(expr, now)
    assert nxt is not None and now < nxt <= now + 86400_000 + 3600_000
    lt = time.localtime(nxt / 1000)
    assert (lt.tm_hour, lt.tm_min, lt.tm_sec) == (3, 17, 0)
    assert ls.cron_next_ms("17 3 1 * *", now) is None  # day fields: not ours, not guessed


# -- the block in the crontab -----------------------------------------------------------

OTHERS = (
    "# m h  dom mon dow   command\n"
    'MAILTO=""\n'
    "SHELL=/bin/bash\n"
    "\n"
    "*/10 * * * * /usr/bin/backup --quiet 2>&1 | logger -t backup   \n"
    "0 5 * * 1 date +\\%F >> ~/weekly.log\n"
    "# BEGIN lore-service other-1234abcd\n"
    "1 * * * * /bin/true other\n"
    "# END lore-service other-1234abcd\n"
    "\t# indented comment  \n"
    "\n"
)


def test_install_keeps_every_other_byte(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    crontab.text = OTHERS
    r = install(cli, "cron")
    assert r.code == 0, r.err + r.out
    sid = r.data["service_id"]
    assert crontab.text.startswith(OTHERS)
    block = crontab.text[len(OTHERS) :]
    assert block == block_of(crontab.text, sid)
    assert block.count("\n") == 3  # BEGIN, one job line, END
    assert crontab.modes == [0o600]
    assert not os.path.exists(ls.Paths(csys).state_dir(sid) + "/crontab.new")  # temp file cleaned up


def test_install_twice_leaves_one_block_and_writes_once(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    crontab.text = OTHERS
    assert install(cli, "cron").code == 0
    after_first = crontab.text
    r = install(cli, "cron")
    assert r.code == 0, r.err
    assert crontab.text == after_first
    assert len(crontab.writes) == 1
    assert r.data["commands"] == [["crontab", "-l"]]
    assert r.data["changed"] is False
    assert crontab.text.count("# BEGIN lore-service") == 2  # ours and the other service's


def test_reinstall_replaces_block_in_place(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    r = install(cli, "cron", "--interval", "30m")
    sid = r.data["service_id"]
    old = block_of(crontab.text, sid)
    crontab.text = "# top\n" + old + "# bottom\n"
    assert install(cli, "cron", "--interval", "2h").code == 0
    new = block_of(crontab.text, sid)
    assert new != old and "-23/2 * * *" in new
    assert crontab.text == "# top\n" + new + "# bottom\n"


def test_duplicate_blocks_collapse_to_one(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    sid = install(cli, "cron").data["service_id"]
    block = block_of(crontab.text, sid)
    crontab.text = block + "# mine\n" + block
    assert install(cli, "cron").code == 0
    assert crontab.text == block + "# mine\n"


def test_crontab_without_final_newline(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    crontab.text = "MAILTO=me"
    r = install(cli, "cron")
    assert r.code == 0, r.err + r.out
    assert crontab.text == "MAILTO=me\n" + block_of(crontab.text, r.data["service_id"])
    # uninstall takes exactly the block away again
    assert cli("--json", "uninstall").code == 0
    assert crontab.text == "MAILTO=me\n"


@pytest.mark.parametrize(
    "broken",
    [
        "# BEGIN lore-service {sid}\n* * * * * x\n",
        "* * * * * x\n# END lore-service {sid}\n",
        "# BEGIN lore-service {sid}\n# BEGIN lore-service {sid}\nx\n# END lore-service {sid}\n",
    ],
)
def test_lone_marker_is_refused(cli, csys: FakeSystem, crontab: MemoryCrontab, project: Path, broken: str) -> None:
    sid = ls.derive_service_id(str(project.resolve()))
    crontab.text = "# keep\n" + broken.format(sid=sid)
    before = crontab.text
    r = install(cli, "cron")
    assert r.code == ls.EXIT_SCHEDULER, r.out
    err = r.doc["error"]
    assert err["code"] == "crontab_marker"
    assert "crontab -e" in err["hint"]
    assert crontab.text == before and crontab.writes == []
    assert ls.Paths(csys).installed_ids() == []  # the failed first install was rolled back


def test_markers_of_other_ids_are_not_ours(cli, csys: FakeSystem, crontab: MemoryCrontab, project: Path) -> None:
    sid = ls.derive_service_id(str(project.resolve()))
    crontab.text = f"# BEGIN lore-service {sid}-old\n* * * * * x\n"  # lone, but another id (a prefix of ours)
    r = install(cli, "cron")
    assert r.code == 0, r.err + r.out
    assert crontab.text.startswith(f"# BEGIN lore-service {sid}-old\n* * * * * x\n# BEGIN lore-service {sid}\n")


def test_uninstall_leaves_the_rest(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    crontab.text = OTHERS
    assert install(cli, "cron").code == 0
    r = cli("--json", "uninstall")
    assert r.code == 0, r.err + r.out
    assert crontab.text == OTHERS
    assert all(c[:2] != ["crontab", "-r"] for c in csys.commands)


def test_uninstall_of_the_only_block_keeps_an_empty_crontab(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    assert install(cli, "cron").code == 0  # no crontab before
    assert cli("--json", "uninstall").code == 0
    assert crontab.text == ""
    assert all(c[:2] != ["crontab", "-r"] for c in csys.commands)


def test_uninstall_without_block_writes_nothing(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    assert install(cli, "cron").code == 0
    crontab.text = OTHERS
    crontab.writes.clear()
    assert cli("--json", "uninstall").code == 0
    assert crontab.text == OTHERS and crontab.writes == []


def test_uninstall_refuses_a_lone_marker(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    sid = install(cli, "cron").data["service_id"]
    crontab.text = f"# END lore-service {sid}\n"
    r = cli("--json", "uninstall")
    assert r.code == ls.EXIT_SCHEDULER
    assert r.doc["error"]["code"] == "crontab_marker"
    assert "uninstall" in r.doc["error"]["hint"]
    assert ls.Paths(csys).installed_ids() == [sid]  # nothing removed half-way


def test_exact_command_sequence(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    r = install(cli, "cron")
    assert r.code == 0, r.err
    tmp = os.path.join(ls.Paths(csys).state_dir(r.data["service_id"]), "crontab.new")
    assert csys.commands == [
        ["crontab", "-l"],  # prerequisites: the crontab is readable
        ["pgrep", "-x", "cron"],  # and the daemon runs
        ["crontab", "-l"],
        ["crontab", tmp],
        ["crontab", "-l"],  # the block landed
    ]
    assert r.data["commands"] == csys.commands[2:4]
    assert r.data["files"][-1] == f"crontab:{USER}"


def test_crontab_write_failure_is_exit_6(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    def refuse(argv: list[str], _input: str | None) -> ls.CommandResult:
        return res(1, "", '"/x":1: bad minute\nerrors in crontab file, can\'t install.') if argv[1] != "-l" else res(0)

    csys.respond(["crontab"], refuse)
    r = install(cli, "cron")
    assert r.code == ls.EXIT_SCHEDULER
    assert r.doc["error"]["code"] == "crontab_write"
    assert ls.Paths(csys).installed_ids() == []


def test_non_utf8_crontab_is_not_rewritten(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    crontab.text = "# caf\ufffd\n"  # what System.run makes of a Latin-1 byte
    r = install(cli, "cron")
    assert r.code == ls.EXIT_SCHEDULER
    assert r.doc["error"]["code"] == "crontab_encoding"
    assert crontab.writes == []


# -- the command line -------------------------------------------------------------------


def executed_words(line: str) -> list[str]:
    """What /bin/sh will see after cron's own processing, split like sh does."""
    command, stdin = cron_command_as_executed(split_crontab_line(line))
    assert stdin is None  # no unescaped % cut the command
    return shlex.split(command)


def test_line_sets_environment_and_quotes_program(
    cli, csys: FakeSystem, crontab: MemoryCrontab, tmp_path: Path
) -> None:
    weird = tmp_path / "home 100% 'q' \"x\" $HOME é"
    csys.environ["LORE_SERVICE_HOME"] = str(weird)
    csys.environ["HOME"] = str(tmp_path / "u 50%")
    r = install(cli, "cron")
    assert r.code == 0, r.err + r.out
    sid = r.data["service_id"]
    line = job_line(crontab.text, sid)
    assert "\\%" in line and not re.search(r"(?<!\\)%", line)
    words = executed_words(line)
    crash_log = str(weird / "logs" / sid / "scheduler-output.log")
    assert words == [
        f"HOME={tmp_path / 'u 50%'}",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "LANG=C.UTF-8",
        *r.data["program"],
        ">>",
        crash_log,
        "2>&1",
    ]
    assert r.data["program"][-4:] == ["--home", str(weird), "run", "--service-id", sid][-4:]
    assert str(weird) in r.data["program"]
    assert TOKEN not in crontab.text


def test_xdg_folders_are_pinned_when_not_default(csys: FakeSystem, tmp_path: Path) -> None:
    env = dict(csys.environ)
    env.pop("LORE_SERVICE_HOME")
    env["XDG_STATE_HOME"] = str(tmp_path / "state here")
    env["XDG_CONFIG_HOME"] = os.path.join(env["HOME"], ".config")  # the default: not repeated
    system = FakeSystem(env)
    paths = ls.Paths(system)
    backend = ls.CronBackend(system, paths)
    manifest = fake_manifest(paths, "svc-1")
    words = executed_words(backend.line(manifest))
    assert f"XDG_STATE_HOME={tmp_path / 'state here'}" in words
    assert not any(w.startswith(("XDG_CONFIG_HOME=", "XDG_DATA_HOME=")) for w in words)
    # what `run` resolves under cron's env + these assignments is what install used
    assignments = dict(w.split("=", 1) for w in words[: words.index(manifest.program[0])])
    cron_env = {"HOME": env["HOME"], "LOGNAME": USER, "SHELL": "/bin/sh", "PATH": "/usr/bin:/bin", **assignments}
    again = ls.Paths(FakeSystem(cron_env))
    assert (again.config_root, again.state_root, again.data_root) == (
        paths.config_root,
        paths.state_root,
        paths.data_root,
    )


def fake_manifest(paths: ls.Paths, sid: str, **kw) -> ls.Manifest:
    base = dict(
        service_id=sid,
        project_root="/p",
        backend="cron",
        backend_reason="test",
        interval_seconds=1800,
        schedule_step_seconds=1800,
        profile="balanced",
        token_source="env-file",
        token_env="GITLAB_TOKEN",
        program=["/usr/bin/python3", "/opt/lore_service.py", "run", "--service-id", sid],
        lore_path="/usr/bin/lore",
        home=paths.home,
        created_at_iso="",
        updated_at_iso="",
    )
    base.update(kw)
    return ls.Manifest(**base)


def test_backslash_is_refused(cli, csys: FakeSystem, tmp_path: Path) -> None:
    csys.environ["LORE_SERVICE_HOME"] = str(tmp_path / "a\\b")
    for extra in ((), ("--dry-run",)):
        r = install(cli, "cron", *extra)
        assert r.code == ls.EXIT_USAGE, r.out
        assert r.doc["error"]["code"] == "cron_unsafe"
        assert "backslash" in r.doc["error"]["hint"]


def test_too_long_line_is_refused(cli, csys: FakeSystem, tmp_path: Path, crontab: MemoryCrontab) -> None:
    csys.environ["LORE_SERVICE_HOME"] = str(tmp_path / "/".join(["x" * 60] * 8))
    r = install(cli, "cron")
    assert r.code == ls.EXIT_USAGE, r.out
    assert r.doc["error"]["code"] == "cron_line_too_long"
    assert "999" in r.doc["error"]["message"]
    assert crontab.writes == []


# -- the token --------------------------------------------------------------------------


def test_the_token_is_never_in_the_crontab_and_embedded_is_refused(
    cli, csys: FakeSystem, crontab: MemoryCrontab
) -> None:
    r = install(cli, "cron")
    assert r.code == 0
    assert TOKEN not in crontab.text and "GITLAB_TOKEN" not in crontab.text
    before = crontab.text
    # cron hands its line to `sh -c`: an embedded token would be in a visible argv
    for extra in ((), ("--dry-run",)):
        refused = install(cli, "cron", "--token-source", "embedded", *extra)
        assert refused.code == 2 and refused.doc["error"]["code"] == "bad_token_source"
        assert "process list" in refused.doc["error"]["message"] and "env-file" in refused.doc["error"]["hint"]
        assert TOKEN not in refused.out
    assert crontab.text == before


# -- dry run ----------------------------------------------------------------------------


def test_dry_run_shows_block_and_changes_nothing(cli, csys: FakeSystem, crontab: MemoryCrontab, home: Path) -> None:
    crontab.text = OTHERS
    r = cli("install", "--backend", "cron", "--interval", "45m", "--dry-run")
    assert r.code == 0, r.err + r.out
    sid = ls.Paths(csys).installed_ids() or [None]
    assert sid == [None]
    assert f"--- file crontab:{USER} (mode 0600)\n# BEGIN lore-service " in r.out
    assert "-59/15 * * * * HOME=" in r.out
    assert "\n  $ crontab -l\n  $ crontab " in r.out
    assert "fires every 15m" in r.out
    assert crontab.text == OTHERS and crontab.writes == []
    assert not home.exists()
    assert not list(Path.cwd().glob("crontab*"))


def test_dry_run_real_subprocess(tool) -> None:
    r = tool("--json", "install", "--backend", "cron", "--dry-run")
    assert r.code == 0, r.err + r.out
    f = r.data["files"][-1]
    assert f["path"].startswith("crontab:")
    assert f["content"].startswith("# BEGIN lore-service ")
    assert r.data["commands"][0] == ["crontab", "-l"]
    assert TOKEN not in r.out


# -- state, drift, doctor ---------------------------------------------------------------


def test_state_reads_the_block_back(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    sid = install(cli, "cron", "--interval", "30m").data["service_id"]
    backend, manifest = backend_and_manifest(csys, ls.CronBackend, sid)
    csys.clock_ms = 1_800_000_000_000
    st = scheduler_state(backend, manifest)
    expr = ls.cron_expression(sid, 1800)
    assert st["registered"] is True and st["active"] is True and st["drift"] == []
    assert st["schedule"] == expr and st["step_seconds"] == 1800
    assert st["next_run_iso"] == ls.iso_from_ms(ls.cron_next_ms(expr, csys.clock_ms))
    assert "every 30 minutes" in st["detail"] and "pid 4242" in st["detail"]


def test_next_run_skips_ticks_that_are_not_due(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    sid = install(cli, "cron", "--interval", "45m").data["service_id"]
    backend, manifest = backend_and_manifest(csys, ls.CronBackend, sid)
    now = 1_800_000_000_000
    csys.clock_ms = now
    due = now + 40 * 60_000
    ls.update_status(ls.Paths(csys), sid, csys, lambda s: setattr(s, "next_due_at_ms", due))
    st = scheduler_state(backend, manifest)
    expected = ls.cron_next_ms(ls.cron_expression(sid, 900), due - 1)
    assert st["next_run_iso"] == ls.iso_from_ms(expected)
    assert "skips" in st["detail"]


@pytest.mark.parametrize("edit", ["minute", "removed", "extra line", "token added"])
def test_drift_detected_and_repaired(cli, csys: FakeSystem, crontab: MemoryCrontab, edit: str) -> None:
    sid = install(cli, "cron").data["service_id"]
    block = block_of(crontab.text, sid)
    line = block.splitlines()[1]
    if edit == "minute":
        crontab.text = crontab.text.replace(line, "0 " + line.split(" ", 1)[1])
    elif edit == "removed":
        crontab.text = "# only mine\n"
    elif edit == "extra line":
        crontab.text = crontab.text.replace(line, line + "\n* * * * * echo hi")
    else:
        crontab.text = crontab.text.replace("LANG=C.UTF-8", f"LANG=C.UTF-8 GITLAB_TOKEN={TOKEN}")
    backend, manifest = backend_and_manifest(csys, ls.CronBackend, sid)
    st = scheduler_state(backend, manifest)
    assert st["drift"], st
    assert st["registered"] is (edit != "removed")
    r = cli("--json", "doctor")
    assert r.code == ls.EXIT_FAILED
    assert any(c["name"] == "scheduler entry" and c["status"] == "fail" for c in r.data["checks"])
    status = cli("--json", "status").data
    assert status["scheduler"]["drift"]
    assert install(cli, "cron").code == 0
    assert scheduler_state(backend, manifest)["drift"] == []
    assert crontab.text.count(f"# BEGIN lore-service {sid}\n") == 1


def test_lone_marker_is_drift_in_status(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    sid = install(cli, "cron").data["service_id"]
    crontab.text = f"# BEGIN lore-service {sid}\n"
    st = cli("--json", "status").data["scheduler"]
    assert st["registered"] is False and "lone" in st["drift"][0]


def test_doctor_all_ok(cli, csys: FakeSystem) -> None:
    assert install(cli, "cron").code == 0
    r = cli("--json", "doctor")
    checks = {c["name"]: c for c in r.data["checks"]}
    assert r.code == 0, [c for c in r.data["checks"] if c["status"] != "ok"]
    assert checks["cron daemon"]["status"] == "ok"
    assert checks["crontab"]["status"] == "ok"
    assert checks["crash log"]["status"] == "ok"


def test_doctor_asks_crontab_and_pgrep_once_for_its_checks_and_its_report(cli, csys: FakeSystem) -> None:
    assert install(cli, "cron").code == 0
    with commands_during(csys) as ran:
        assert cli("--json", "doctor").code == 0
    asked = [tuple(c) for c in ran]
    assert asked.count(("crontab", "-l")) == 1 and asked.count(("pgrep", "-x", "cron")) == 1
    with commands_during(csys) as ran:  # the same System for the next commands, as main() may be called again
        cli("--json", "status")
        cli("--json", "status")
    assert [tuple(c) for c in ran].count(("crontab", "-l")) == 2  # nothing kept between commands


def test_status_says_in_one_line_that_cron_does_not_catch_up(cli, csys: FakeSystem) -> None:
    assert install(cli, "cron").code == 0
    r = cli("--json", "status")
    assert r.data["scheduler"]["catch_up"] == "none: cron skips runs missed while the machine sleeps or is off"
    lines = [line for line in cli("status").out.splitlines() if "catch-up" in line]
    assert lines == ["  catch-up    none: cron skips runs missed while the machine sleeps or is off"]


def test_doctor_suggests_a_systemd_user_manager_only_where_one_answers(cli, csys: FakeSystem) -> None:
    sid = install(cli, "cron").data["service_id"]
    csys.which_map["systemctl"] = "/usr/bin/systemctl"
    csys.respond(["systemctl", "--user", "is-system-running"], res(0, "running\n"))
    r = cli("--json", "doctor")
    assert r.code == 0, r.out  # a warning: cron still syncs while the machine is awake
    check = next(c for c in r.data["checks"] if c["name"] == "catch-up")
    assert check["status"] == "warn" and check["message"].startswith(ls.CRON_CATCH_UP)
    assert "loginctl enable-linger $USER" in check["hint"]
    assert f"install --backend systemd --name {sid}" in check["hint"]
    text = cli("doctor").out
    assert "  warn  catch-up: none: cron skips runs missed" in text and "fix: `loginctl enable-linger $USER`" in text
    # no user manager to move to: said, but nothing to fix
    csys.which_map["systemctl"] = None
    check = next(c for c in cli("--json", "doctor").data["checks"] if c["name"] == "catch-up")
    assert check["status"] == "ok" and "systemctl is not installed" in check["message"]


def test_doctor_warns_without_daemon(cli, csys: FakeSystem) -> None:
    assert install(cli, "cron").code == 0
    csys.respond(["pgrep"], res(1))
    r = cli("--json", "doctor")
    check = next(c for c in r.data["checks"] if c["name"] == "cron daemon")
    assert check["status"] == "warn"
    assert "sudo service cron start" in check["hint"]
    assert r.code == 0
    st = cli("--json", "status").data["scheduler"]
    assert st["active"] is False and st["next_run_iso"] is None and st["daemon_running"] is False
    text = cli("doctor").out
    assert "warn  cron daemon: no cron daemon" in text and "fix: start it: `sudo service cron start`" in text


def test_daemon_found_as_crond(csys: FakeSystem) -> None:
    csys.respond(["pgrep", "-x", "cron"], res(1))
    csys.respond(["pgrep", "-x", "crond"], res(0, "77\n"))
    running, why = ls.CronBackend(csys, ls.Paths(csys)).daemon()
    assert running is True and "crond" in why


def test_daemon_without_pgrep_reads_proc(csys: FakeSystem) -> None:
    csys.respond(["pgrep"], res(127, "", "pgrep: command not found"))
    running, _ = ls.CronBackend(csys, ls.Paths(csys)).daemon()
    expected = any(
        Path(f"/proc/{p}/comm").read_text().strip() in ("cron", "crond")
        for p in os.listdir("/proc")
        if p.isdigit() and os.path.exists(f"/proc/{p}/comm")
    )
    assert running is expected


def test_doctor_fails_when_crontab_missing(cli, csys: FakeSystem) -> None:
    assert install(cli, "cron").code == 0
    csys.respond(["crontab"], res(127, "", "crontab: command not found"))
    r = cli("--json", "doctor")
    assert r.code == ls.EXIT_FAILED
    check = next(c for c in r.data["checks"] if c["name"] == "crontab")
    assert check["status"] == "fail" and "apt install --no-install-recommends cron" in check["hint"]
    # and uninstall still works: with no crontab program nothing can fire
    assert cli("--json", "uninstall").code == 0


def test_install_refused_when_crontab_missing(cli, csys: FakeSystem) -> None:
    csys.respond(["crontab"], res(127, "", "crontab: command not found"))
    r = install(cli, "cron")
    assert r.code == ls.EXIT_SCHEDULER
    assert "apt install" in r.doc["error"]["hint"]


def test_crash_log_trimmed_before_run(cli, csys: FakeSystem) -> None:
    sid = install(cli, "cron").data["service_id"]
    backend, manifest = backend_and_manifest(csys, ls.CronBackend, sid)
    crash = Path(ls.Paths(csys).crash_log(sid))
    crash.write_bytes(b"x" * 99 + b"\n" + b"y" * 99 + b"\n" * (ls.CRASH_LOG_MAX_BYTES // 100 + 10))
    before = crash.stat().st_ino
    r = cli("--json", "run", "--name", sid)
    assert r.code == 0, r.err + r.out
    assert crash.stat().st_size <= ls.CRASH_LOG_KEEP_BYTES + 100
    assert crash.stat().st_ino == before


def test_doctor_flags_missing_log_folder(cli, csys: FakeSystem) -> None:
    sid = install(cli, "cron").data["service_id"]
    shutil.rmtree(ls.Paths(csys).log_dir(sid))
    r = cli("--json", "doctor")
    check = next(c for c in r.data["checks"] if c["name"] == "crash log")
    assert check["status"] == "fail" and r.code == ls.EXIT_FAILED


# -- detection and the automatic choice -------------------------------------------------


def test_detect(environ: dict[str, str]) -> None:
    mac = MacSystem(environ)
    assert detect(ls.CronBackend, mac)[0] is False and "macOS" in detect(ls.CronBackend, mac)[1]
    assert detect(ls.CronBackend, WinSystem(environ))[0] is False
    linux = FakeSystem(environ)
    linux.respond(["crontab", "-l"], res(1, "", "no crontab for alice\n"))
    assert detect(ls.CronBackend, linux) == (True, "the user's crontab can be read (`crontab -l`)")
    linux.respond(["crontab", "-l"], res(0, "# x\n"))
    assert detect(ls.CronBackend, linux)[0] is True
    linux.respond(["crontab", "-l"], res(127, "", "crontab: command not found"))
    assert detect(ls.CronBackend, linux) == (False, "crontab is not installed")
    linux.respond(["crontab", "-l"], res(1, "", "You (alice) are not allowed to use this program (crontab)\n"))
    ok, why = detect(ls.CronBackend, linux)
    assert not ok and "not allowed" in why


@pytest.fixture
def no_user_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    if "systemd" in ls.BACKENDS:
        unavailable = ls.Check("user manager", "fail", "no systemd user manager")
        monkeypatch.setattr(ls.BACKENDS["systemd"], "availability", classmethod(lambda cls, system: unavailable))


def test_auto_picks_cron_without_user_manager(cli, csys: FakeSystem, crontab: MemoryCrontab, no_user_manager) -> None:
    chosen, reason, _ = ls.choose_backend(csys)
    assert chosen == "cron" and "crontab" in reason
    r = cli("--json", "install")
    assert r.code == 0, r.err + r.out
    assert r.data["backend"] == "cron" and r.data["backend_reason"].startswith("auto: ")
    assert crontab.text.count("# BEGIN lore-service") == 1
    st = cli("--json", "status").data
    assert st["backend"] == "cron" and st["backend_reason"] == r.data["backend_reason"]


def test_auto_with_nothing_usable_is_exit_6(cli, csys: FakeSystem, no_user_manager) -> None:
    csys.respond(["crontab"], res(127, "", "crontab: command not found"))
    r = cli("--json", "install")
    assert r.code == ls.EXIT_SCHEDULER
    err = r.doc["error"]
    assert "cron: crontab is not installed" in err["message"]
    assert "cron" in err["hint"] and "--backend none" in err["hint"]


def test_readiness_doctor_names_cron_and_daemon(cli, csys: FakeSystem, no_user_manager) -> None:
    csys.respond(["pgrep"], res(1))
    r = cli("--json", "doctor")
    checks = r.data["checks"]
    assert checks[0]["name"] == "backend" and "install would use cron" in checks[0]["message"]
    daemon = next(c for c in checks if c["name"] == "cron daemon")
    assert daemon["status"] == "warn" and "service cron start" in daemon["hint"]


def test_switching_to_cron_removes_the_old_entry(cli, csys: FakeSystem, crontab: MemoryCrontab) -> None:
    r = install(cli, "fake")
    assert r.code == 0, r.err + r.out
    r = install(cli, "cron")
    assert r.code == 0, r.err + r.out
    assert any("removed the fake entry" in w for w in r.data["warnings"])
    # and back: the cron block goes away
    r = install(cli, "fake")
    assert r.code == 0, r.err + r.out
    assert "# BEGIN lore-service" not in crontab.text


def test_outputs_match_the_schemas(cli, csys: FakeSystem) -> None:
    from test_schemas import validate

    r = install(cli, "cron", "--interval", "45m")
    assert r.code == 0, r.err + r.out
    validate(r.doc, "envelope.schema.json")
    sid = r.data["service_id"]
    validate(cli("--json", "status").data, "status-output.schema.json")
    validate(cli("--json", "doctor").data, "doctor-output.schema.json")
    manifest = ls.Paths(csys).manifest(sid)
    validate(json.loads(Path(manifest).read_text()), "manifest.schema.json")
    csys.respond(["pgrep"], res(1))
    validate(cli("--json", "doctor").data, "doctor-output.schema.json")


@pytest.mark.parametrize(
    ("second", "slept"), [(0.5, [2.5]), (2.0, [1.0]), (3.0, []), (57.5, []), (58.5, [4.5]), (59.9, [3.1])]
)
def test_no_write_in_the_reload_second(cli, csys: FakeSystem, crontab: MemoryCrontab, second, slept) -> None:
    csys.clock_ms = int((1_800_000_000 // 60 * 60 + second) * 1000)
    assert install(cli, "cron").code == 0
    assert csys.slept == pytest.approx(slept)  # type: ignore[attr-defined]
    assert len(crontab.writes) == 1


def test_concurrent_installs_never_drop_each_others_blocks(environ, tmp_path: Path) -> None:
    """Three installs at once against a crontab program that is slow to read:
    each must end up in the crontab (a lock serialises read-splice-write)."""
    import subprocess
    import sys

    store = tmp_path / "spool"
    fake = tmp_path / "fakebin" / "crontab"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\n"
        f'store="{store}"\n'
        'if [ "$1" = "-l" ]; then sleep 0.3; [ -f "$store" ] || { echo "no crontab for me" >&2; exit 1; }; '
        'cat "$store"; exit 0; fi\n'
        'cp "$1" "$store"\n'
    )
    fake.chmod(0o755)
    env = {**environ, "PATH": f"{fake.parent}:{environ['PATH']}"}
    projects = []
    for i in range(3):
        projects.append(tmp_path / f"p{i}")
        projects[-1].mkdir()
    from conftest import SCRIPT

    procs = [
        subprocess.Popen(
            [sys.executable, SCRIPT, "--json", "install", "--backend", "cron", "--project", str(p)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in projects
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    text = store.read_text()
    assert text.count("# BEGIN lore-service ") == 3 and text.count("# END lore-service ") == 3


def test_system_run_keeps_a_crontabs_carriage_returns_only_when_asked():
    """`crontab -l` is read with keep_newlines: a CR byte in the user's
    crontab is theirs to keep (text mode would turn it into a line break)."""
    script = "import sys; sys.stdout.buffer.write(b'# a\\r\\n# b\\rc\\n')"
    system = ls.System(dict(os.environ))
    kept = system.run([sys.executable, "-c", script], keep_newlines=True)
    assert kept.ok and kept.stdout == "# a\r\n# b\rc\n"
    assert system.run([sys.executable, "-c", script]).stdout == "# a\n# b\nc\n"


def test_cr_bytes_in_the_crontab_survive_install_and_uninstall(cli, csys: FakeSystem, crontab: MemoryCrontab):
    theirs = "# saved on Windows\r\n17 3 * * * /bin/true\n# lone\rbyte\n"
    crontab.text = theirs
    assert install(cli, "cron").code == 0
    assert crontab.text.startswith(theirs)
    assert cli("--json", "uninstall").code == 0
    assert crontab.text == theirs


def test_a_slow_read_that_ends_in_the_reload_window_still_waits_before_writing(
    cli, csys: FakeSystem, crontab: MemoryCrontab
) -> None:
    csys.clock_ms = int((1_800_000_000 // 60 * 60 + 57.0) * 1000)

    def slow_list(argv, _input):
        csys.clock_ms += 3500  # `crontab -l` took 3.5 s: now second 0.5 of the next minute
        return crontab.list(argv, _input)

    csys.respond(["crontab", "-l"], slow_list)
    assert install(cli, "cron").code == 0
    assert csys.slept == pytest.approx([2.5])  # type: ignore[attr-defined]
    assert len(crontab.writes) == 1
