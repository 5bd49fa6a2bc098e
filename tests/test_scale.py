"""Scale on one machine (issue 12.6): `status --all` asks each scheduler a
fixed number of questions however many services there are, and its answer
for each service is what `status` of that one service says. `list` and
`status --check --all` ask no scheduler at all.

Each scheduler is modelled through the System seam the way it answers: the
systemd user manager (`show` of many units, blank-line separated, and
`list-timers --output=json`), a crontab in memory, launchd's `print` of a job
and of the GUI domain, and Task Scheduler's verbose CSV and `/XML ONE`. The
real user manager is in test_systemd_e2e.py."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    UID,
    FakeSystem,
    MacSystem,
    WinSystem,
    commands_during,
    cron_box,
    fixture_text,
    install,
    python_folder,
    res,
    systemd_user_manager,
    windows_from,
)
from test_cron import MemoryCrontab

import lore_service as ls

SIZES = (1, 10, 50)
# the questions `status --all` asks each scheduler, whatever the number of its services
QUESTIONS = {"systemd": 2, "cron": 2, "launchd": 2, "schtasks": 2}
# and what `status` of one service asks: systemd one show of timer and service, then list-timers
ALONE = {"systemd": 2, "cron": 2, "launchd": 2, "schtasks": 2}
CLOCK_MS = 1_795_826_000_000


class UserManagerModel:
    """`systemctl --user` of a user manager holding the units install enabled:
    `enable` links the timer into timers.target.wants as systemd does, `show
    UNIT -p A,B` prints the unit's asked properties (a unit it does not know as
    LoadState=not-found), and `list-units` / `list-timers --all --output=json
    PATTERN` one JSON row per matching unit."""

    def __init__(self, system: FakeSystem) -> None:
        self.units: dict[str, dict[str, Any]] = {}
        self.wants = Path(system.environ["HOME"]) / ".config" / "systemd" / "user" / "timers.target.wants"
        system.respond(["systemctl", "--user", "enable"], self.enable)
        system.respond(["systemctl", "--user", "--no-pager", "show"], self.show)
        system.respond(["systemctl", "--user", "--no-pager", "list-units"], self.list_units)
        system.respond(["systemctl", "--user", "--no-pager", "list-timers"], self.list_timers)

    def enable(self, argv: list[str], _input: Any) -> ls.CommandResult:
        timer = argv[-1]
        self.wants.mkdir(parents=True, exist_ok=True)
        if not (self.wants / timer).is_symlink():
            (self.wants / timer).symlink_to(self.wants.parent / timer)
        n = len(self.units)
        self.units[timer] = {
            "LoadState": "loaded",
            "ActiveState": "active",
            "SubState": "waiting",
            "UnitFileState": "enabled",
            "next": (CLOCK_MS + 600_000 + n * 1000) * 1000,
            "last": (CLOCK_MS - 3_000_000 + n * 1000) * 1000,
        }
        self.units[timer.removesuffix(".timer") + ".service"] = {
            "LoadState": "loaded",
            "ActiveState": "inactive",
            "SubState": "dead",
            "UnitFileState": "static",
            "Result": "success" if n % 4 else "exit-code",
            "ExecMainStatus": "0" if n % 4 else "1",
            "ExecMainExitTimestamp": f"@{CLOCK_MS // 1000 - 2990 + n}",
        }
        return res(0)

    def stop(self, timer: str) -> None:
        self.units[timer].update(ActiveState="inactive", SubState="dead", next=None)

    def disable(self, timer: str) -> None:
        self.units[timer]["UnitFileState"] = "disabled"
        (self.wants / timer).unlink()

    def list_units(self, argv: list[str], _input: Any) -> ls.CommandResult:
        patterns = [a for a in argv[argv.index("list-units") + 1 :] if not a.startswith("-")]
        rows = [
            {"unit": name, "load": u["LoadState"], "active": u["ActiveState"], "sub": u["SubState"], "description": ""}
            for name, u in self.units.items()
            if any(fnmatch.fnmatch(name, p) for p in patterns)
        ]
        return res(0, json.dumps(rows))

    def show(self, argv: list[str], _input: Any) -> ls.CommandResult:
        rest = argv[argv.index("show") + 1 :]
        units, props = rest[: rest.index("-p")], rest[rest.index("-p") + 1].split(",")
        blocks = []
        for unit in units:
            known = self.units.get(unit, {"LoadState": "not-found", "ActiveState": "inactive", "SubState": "dead"})
            values = {"Id": unit, **{k: v for k, v in known.items() if isinstance(v, str)}}
            blocks.append("".join(f"{p}={values.get(p, '')}\n" for p in props))
        return res(0, "\n".join(blocks))

    def list_timers(self, argv: list[str], _input: Any) -> ls.CommandResult:
        patterns = [a for a in argv[argv.index("list-timers") + 1 :] if not a.startswith("-")]
        rows = [
            {"next": u["next"], "left": 1, "last": u["last"], "passed": 1, "unit": name, "activates": "x.service"}
            for name, u in self.units.items()
            if name.endswith(".timer") and any(fnmatch.fnmatch(name, p) for p in patterns)
        ]
        return res(0, json.dumps(rows))


def windows_with_python(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> WinSystem:
    """A Windows system whose lore-service runs from a Python folder with pythonw.exe beside python.exe."""
    return windows_from(python_folder(tmp_path / "Python 3.11"), environ, monkeypatch)


class LaunchdModel(MacSystem):
    """MacSystem whose jobs were loaded from the plist install wrote, one of
    them running: `print` of a job and of the domain tell the same story."""

    running: dict[str, int]

    def __init__(self, environ: dict[str, str]) -> None:
        self.running = {}
        super().__init__(environ)

    def _print(self, argv: list[str], _input: Any) -> ls.CommandResult:
        if argv[2] == f"gui/{UID}":
            jobs = ""
            for target, left in self.loaded.items():
                label = target.rsplit("/", 1)[-1]
                if left:
                    jobs += f"\t\t{self.running.get(label, 0):>8} {'0':>8} \t{label}\n"
            return res(
                0,
                f"gui/{UID} = {{\n\ttype = login\n\tservices = {{\n{jobs}\t}}\n\n\tdisabled services = {{\n\t}}\n}}\n",
            )
        if argv[2] not in self.loaded:
            return super()._print(argv, _input)
        label = argv[2].rsplit("/", 1)[-1]
        plist = Path(self.environ["HOME"]) / "Library" / "LaunchAgents" / f"{label}.plist"
        pid = self.running.get(label)
        lines = [f"\tpath = {plist}", "\ttype = LaunchAgent", f"\tstate = {'running' if pid else 'not running'}"]
        lines += [f"\tpid = {pid}"] if pid else ["\tlast exit code = 0"]
        lines += ["\truns = 6", "\tevent channels = {", "\t\tstate = active", "\t}"]
        return res(0, f"{argv[2]} = {{\n" + "\n".join(lines) + "\n}\n")


class TaskSchedulerModel:
    """schtasks answering for the tasks /Create registered: `/Query /TN` of
    one (verbose CSV or its XML), `/Query /V /FO CSV` of every task (the header
    repeated per folder) and `/Query /XML ONE` (one <Tasks> root, a comment
    naming each task). Windows' own tasks live in other folders, one of them
    with the same name as ours."""

    def __init__(self, system: WinSystem) -> None:
        self.tasks: dict[str, dict[str, str]] = {}  # name -> status, result, xml
        header, row = fixture_text("schtasks", "csv_verbose_never_run.csv").splitlines()[:2]
        self.header, self.template = header, row
        system.respond(["schtasks", "/Create"], self.create)
        system.respond(["schtasks", "/Query"], self.query)

    def create(self, argv: list[str], _input: Any) -> ls.CommandResult:
        name, path = argv[argv.index("/TN") + 1], argv[argv.index("/XML") + 1]
        xml = ls.decode_task_xml(Path(path).read_bytes())
        self.tasks[name] = {"status": "Ready", "result": str(len(self.tasks) % 3), "xml": xml}
        return res(0, fixture_text("schtasks", "create_success.stdout.txt"))

    def disable(self, name: str) -> None:
        task = self.tasks[name]
        head, _, tail = task["xml"].rpartition("<Enabled>true</Enabled>")  # Settings' (the trigger's comes first)
        task.update(status="Disabled", xml=head + "<Enabled>false</Enabled>" + tail)

    def row(self, path: str, task: dict[str, str]) -> str:
        row = self.template.replace("\\fzuZbSwfXc", path).replace('"Ready"', f'"{task["status"]}"')
        row = row.replace('"11/30/1999 12:00:00 AM"', '"8/1/2026 1:00:01 PM"', 1)
        return row.replace('"N/A"', '"8/2/2026 1:00:00 PM"', 1).replace('"267011"', f'"{task["result"]}"')

    def query(self, argv: list[str], _input: Any) -> ls.CommandResult:
        missing = res(1, "", fixture_text("schtasks", "query_missing.stderr.txt"))
        if "/TN" in argv:
            task = self.tasks.get(argv[argv.index("/TN") + 1])
            if task is None:
                return missing
            if "/XML" in argv:
                return res(0, '<?xml version="1.0" encoding="UTF-16"?>\r\n' + task["xml"])
            return res(0, f"{self.header}\r\n{self.row(chr(92) + argv[3], task)}\r\n")
        foreign = {"status": "Ready", "result": "0", "xml": ls.decode_task_xml(self.foreign_xml())}
        if "/XML" in argv:
            body = "".join(f"<!-- \\{name} -->\r\n{task['xml']}\r\n" for name, task in self.tasks.items())
            body += f"<!-- \\Microsoft\\Windows\\{next(iter(self.tasks), 'x')} -->\r\n{foreign['xml']}\r\n"
            return res(0, f'<?xml version="1.0" encoding="UTF-16"?>\r\n<Tasks>\r\n{body}</Tasks>\r\n')
        rows = [self.header, *(self.row("\\" + name, task) for name, task in self.tasks.items())]
        rows += [self.header, self.row(f"\\Microsoft\\Windows\\{next(iter(self.tasks), 'x')}", foreign)]
        return res(0, "\r\n".join(rows) + "\r\n")

    @staticmethod
    def foreign_xml() -> bytes:
        return (Path(__file__).parent / "fixtures" / "schtasks" / "query_xml_schtasks_created.utf16le.xml").read_bytes()


# -- the machines ------------------------------------------------------------------------


def linux_systemd(system: FakeSystem, monkeypatch: pytest.MonkeyPatch) -> UserManagerModel:
    return UserManagerModel(systemd_user_manager(system, monkeypatch))


def linux_cron(system: FakeSystem) -> MemoryCrontab:
    crontab = MemoryCrontab()
    cron_box(system, crontab)
    system.sleep = lambda seconds: None  # type: ignore[method-assign]  (the crontab's reload guard)
    return crontab


@pytest.fixture(params=sorted(QUESTIONS))
def machine(request, environ, memory_keyring, monkeypatch, tmp_path) -> tuple[str, FakeSystem, Any]:
    """(backend, its System, the scheduler model) for each backend."""
    backend = request.param
    if backend == "launchd":
        mac = LaunchdModel(dict(environ))
        return backend, mac, mac
    if backend == "schtasks":
        win = windows_with_python(environ, monkeypatch, tmp_path)
        return backend, win, TaskSchedulerModel(win)
    system = FakeSystem(dict(environ))
    model = linux_systemd(system, monkeypatch) if backend == "systemd" else linux_cron(system)
    return backend, system, model


def install_services(cli, system: FakeSystem, backend: str, tmp_path: Path, count: int) -> list[str]:
    """Services for projects p000, p001, ... up to `count` (those already there stay)."""
    sids = []
    for i in range(count):
        project = tmp_path / "projects" / f"p{i:03d}"
        if not project.exists():
            project.mkdir(parents=True)
            r = install(cli, backend, "--interval", "30m", "--project", str(project), system=system)
            assert r.code == 0, r.out + r.err
        sids.append(ls.derive_service_id(ls.canonical_project(str(project))))
    return sids


def asked(cli, system: FakeSystem, *argv: str) -> tuple[Any, list[list[str]]]:
    """The command's result and the scheduler commands it ran through System."""
    with commands_during(system) as ran:
        result = cli(*argv, sys_=system)
    return result, ran


def comparable(backend: str, view: dict[str, Any]) -> dict[str, Any]:
    """A scheduler view less what spec §21 lets a batch say otherwise: launchd's
    run count, and why Task Scheduler has no such task (Windows' own message for
    one task, or that the list of every task lacks it)."""
    if backend == "launchd":
        return {**view, "runs": None, "detail": view["detail"].replace(", 6 runs", "")}
    if backend == "systemd":  # the service's last exit is `show`n per unit: status of one service has it
        gone = ("last_exit_status", "last_finished_iso")
        return {**{k: v for k, v in view.items() if k not in gone}, "last_result": None}
    if backend == "schtasks" and not view["registered"]:
        return {**view, "detail": view["detail"].partition(" (")[0]}
    return view


# -- a fixed number of questions ---------------------------------------------------------


def test_status_all_asks_each_scheduler_the_same_questions_for_1_10_and_50_services(cli, machine, tmp_path):
    backend, system, _model = machine
    system.clock_ms = CLOCK_MS
    counts = {}
    for size in SIZES:
        sids = install_services(cli, system, backend, tmp_path, size)
        result, commands = asked(cli, system, "--json", "status", "--all")
        assert result.code == 0, result.out
        rows = result.data["services"]
        assert sorted(r["service_id"] for r in rows) == sorted(sids)
        assert all("error" not in r["scheduler"] and r["scheduler"]["registered"] for r in rows), rows
        counts[size] = len(commands)
    assert counts == dict.fromkeys(SIZES, QUESTIONS[backend]), (counts, commands)


def test_list_and_status_check_all_ask_no_scheduler(cli, machine, tmp_path):
    backend, system, _model = machine
    system.clock_ms = CLOCK_MS
    install_services(cli, system, backend, tmp_path, 10)
    listed, commands = asked(cli, system, "--json", "list")
    assert listed.code == 0 and len(listed.data["services"]) == 10 and commands == []
    checked, commands = asked(cli, system, "--json", "status", "--check", "--all")
    assert checked.code == 0 and len(checked.data["services"]) == 10 and commands == []


def test_status_of_one_service_asks_about_that_service_only(cli, machine, tmp_path):
    backend, system, _model = machine
    system.clock_ms = CLOCK_MS
    sids = install_services(cli, system, backend, tmp_path, 10)
    result, alone = asked(cli, system, "--json", "status", "--name", sids[3])
    assert result.code == 0 and len(alone) == ALONE[backend], alone
    assert not [argv for argv in alone for other in sids if other != sids[3] and other in " ".join(argv)]


# -- the same answer -------------------------------------------------------------------------


def drift_some(backend: str, system: FakeSystem, model: Any, sids: list[str]) -> None:
    """Two services whose entries the user changed behind lore-service's back."""
    if backend == "systemd":
        model.stop(f"lore-sync-{sids[1]}.timer")
        model.disable(f"lore-sync-{sids[2]}.timer")
    elif backend == "cron":
        text = model.text
        block = text[text.index(f"# BEGIN lore-service {sids[1]}") : text.index(f"# END lore-service {sids[1]}")]
        model.text = text.replace(block, "")  # a lone END marker: drift for that one service only
        model.text = model.text.replace(f"# BEGIN lore-service {sids[2]}\n", f"# BEGIN lore-service {sids[2]}\n# x\n")
    elif backend == "launchd":
        del model.loaded[f"gui/{UID}/com.gitlore.sync.{sids[1]}"]
        model.switched_off.add(f"com.gitlore.sync.{sids[2]}")
        model.running[f"com.gitlore.sync.{sids[3]}"] = 4242
    else:
        del model.tasks[f"LoreSync-{sids[1]}"]
        model.disable(f"LoreSync-{sids[2]}")


def test_each_service_in_status_all_is_what_its_own_status_says(cli, machine, tmp_path):
    backend, system, model = machine
    system.clock_ms = CLOCK_MS
    sids = install_services(cli, system, backend, tmp_path, 10)
    drift_some(backend, system, model, sids)
    result, commands = asked(cli, system, "--json", "status", "--all")
    assert len(commands) == QUESTIONS[backend]
    rows = {r["service_id"]: r for r in result.data["services"]}
    for sid in sids:
        own = cli("--json", "status", "--name", sid, sys_=system).data
        batched = rows[sid]
        own["scheduler"], batched["scheduler"] = (
            comparable(backend, own["scheduler"]),
            comparable(backend, batched["scheduler"]),
        )
        assert batched == own, sid
    drifted = [sid for sid in sids if rows[sid]["scheduler"]["drift"]]
    assert drifted == [sids[1], sids[2]], {sid: rows[sid]["scheduler"]["drift"] for sid in drifted}
    if backend == "launchd":
        assert rows[sids[3]]["scheduler"]["running"] is True and rows[sids[3]]["scheduler"]["pid"] == 4242


# -- errors stay with their service -----------------------------------------------------------


def test_a_service_that_cannot_be_read_keeps_its_own_error_row_and_the_others_are_asked_once(
    cli, environ, monkeypatch, tmp_path, home
):
    system = FakeSystem(dict(environ))
    linux_systemd(system, monkeypatch)
    sids = install_services(cli, system, "systemd", tmp_path, 5)
    (home / "state" / sids[1] / "status.json").write_text("{not json")
    result, commands = asked(cli, system, "--json", "status", "--all")
    assert result.code == ls.EXIT_STATE and len(commands) == 2
    rows = {r["service_id"]: r for r in result.doc["data"]["services"]}
    assert rows[sids[1]]["error"]["code"] == "state_corrupt"
    assert all(rows[s]["scheduler"]["registered"] for s in sids if s != sids[1])


def test_services_of_several_backends_ask_each_backend_once(cli, environ, monkeypatch, tmp_path, home):
    system = FakeSystem(dict(environ))
    linux_systemd(system, monkeypatch)
    linux_cron(system)
    sids = {
        backend: install_services(cli, system, backend, tmp_path / backend, 3)
        for backend in ("systemd", "cron", "fake")
    }
    manifest = home / "config" / sids["fake"][0] / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"backend": "fake"', '"backend": "upstart"'))
    result, commands = asked(cli, system, "--json", "status", "--all")
    assert sorted(argv[0] for argv in commands) == ["crontab", "pgrep", "systemctl", "systemctl"]
    rows = {r["service_id"]: r["scheduler"] for r in result.data["services"]}
    assert len(rows) == 9
    assert rows[sids["fake"][0]]["error"]["code"] == "unknown_backend"
    assert all(rows[sid]["registered"] for group in sids.values() for sid in group if sid != sids["fake"][0])


def test_a_user_manager_that_does_not_answer_is_each_services_own_cause_as_with_one_service(
    cli, environ, monkeypatch, tmp_path
):
    system = FakeSystem(dict(environ))
    linux_systemd(system, monkeypatch)
    sids = install_services(cli, system, "systemd", tmp_path, 3)
    system.respond(["systemctl", "--user", "--no-pager"], res(1, "", "Failed to connect to bus: No such file\n"))
    rows = cli("--json", "status", "--all", sys_=system).data["services"]
    for row in rows:
        own = cli("--json", "status", "--name", row["service_id"], sys_=system).data["scheduler"]
        assert row["scheduler"] == own and own["detail"].startswith("cannot read the timer: ")
    assert len(rows) == len(sids)


def test_a_systemctl_without_json_tables_is_asked_about_each_service(cli, environ, monkeypatch, tmp_path):
    system = FakeSystem(dict(environ))
    linux_systemd(system, monkeypatch)
    sids = install_services(cli, system, "systemd", tmp_path, 3)
    table = "UNIT LOAD ACTIVE SUB DESCRIPTION\nlore-sync-x.timer loaded active waiting x\n"
    system.respond(["systemctl", "--user", "--no-pager", "list-units"], res(0, table))
    result, commands = asked(cli, system, "--json", "status", "--all")
    assert len(commands) == 1 + ALONE["systemd"] * len(sids)
    for row in result.data["services"]:
        assert row == cli("--json", "status", "--name", row["service_id"], sys_=system).data


def test_no_gui_session_is_every_launchd_services_error_as_with_one_service(cli, environ, memory_keyring, tmp_path):
    mac = LaunchdModel(dict(environ))
    sids = install_services(cli, mac, "launchd", tmp_path, 3)
    mac.environ["SUDO_USER"] = "alice"
    result, commands = asked(cli, mac, "--json", "status", "--all")
    assert commands == []  # stopped before launchctl is touched, as `status` of one is
    own = cli("--json", "status", "--name", sids[0], sys_=mac).data["scheduler"]
    assert own["error"]["code"] == "no_gui_session"
    assert [r["scheduler"] for r in result.data["services"]] == [own] * 3


def test_task_scheduler_refusing_the_whole_list_asks_each_task_on_its_own(cli, environ, monkeypatch, tmp_path):
    win = windows_with_python(environ, monkeypatch, tmp_path)
    model = TaskSchedulerModel(win)
    sids = install_services(cli, win, "schtasks", tmp_path, 3)
    query = model.query
    denied = res(1, "", fixture_text("schtasks", "create_access_denied.stderr.txt"))
    win.respond(["schtasks", "/Query"], lambda argv, i: query(argv, i) if "/TN" in argv else denied)
    result, commands = asked(cli, win, "--json", "status", "--all")
    assert len(commands) == 1 + 2 * len(sids)
    assert all(r["scheduler"]["registered"] and r["scheduler"]["drift"] == [] for r in result.data["services"])


# -- reading the answers ---------------------------------------------------------------------


# `launchctl print gui/501` as published (the services block; its other blocks trimmed)
DOMAIN_PRINT = """gui/501 = {
\ttype = login
\thandle = 100017
\tactive count = 425
\tservices = {
\t\t     887      - \tnet.jwpconsulting.postgresql
\t\t       0      - \tcom.apple.syncdefaultsd
\t\t       0      1 \tcom.gitlore.sync.failed-1
\t\t       0    -15 \tcom.gitlore.sync.killed-2
\t\t       0      0 \tcom.gitlore.sync.fine-3
\t}

\tunmanaged processes = {
\t\t     512      0 \tcom.gitlore.sync.not-a-job
\t}

\tdisabled services = {
\t\t"com.apple.rcd" => disabled
\t}
}
"""


def test_the_domains_services_list_gives_each_jobs_facts_as_its_own_print_names_them():
    jobs = ls.parse_launchd_services(DOMAIN_PRINT)
    assert set(jobs) == {
        "net.jwpconsulting.postgresql",
        "com.apple.syncdefaultsd",
        "com.gitlore.sync.failed-1",
        "com.gitlore.sync.killed-2",
        "com.gitlore.sync.fine-3",
    }
    assert jobs["net.jwpconsulting.postgresql"] == {"state": "running", "pid": "887"}
    assert jobs["com.apple.syncdefaultsd"] == {"state": "not running", "last exit code": "(never exited)"}
    assert jobs["com.gitlore.sync.failed-1"] == {"state": "not running", "last exit code": "1"}
    assert jobs["com.gitlore.sync.killed-2"] == {"state": "not running", "last terminating signal": "15"}
    assert ls.launchd_exit_code(jobs["com.gitlore.sync.fine-3"]["last exit code"]) == 0


def task(uri: str | None, command: str) -> str:
    registration = f"<RegistrationInfo><URI>{uri}</URI></RegistrationInfo>" if uri else ""
    return (
        f'<Task version="1.2" xmlns="{ls.TASK_NS}">{registration}'
        f'<Actions Context="Author"><Exec><Command>{command}</Command></Exec></Actions></Task>'
    )


def test_every_tasks_xml_is_read_by_the_path_its_comment_or_uri_gives():
    a, windows, b = task(None, "a.exe"), task(None, "windows.exe"), task("\\LoreSync-b", "b.exe")
    one = (
        '<?xml version="1.0" encoding="UTF-16"?>\r\n<Tasks>\r\n'
        f"<!-- \\LoreSync-a -->\r\n{a}\r\n"
        f"<!-- \\Microsoft\\Windows\\LoreSync-b -->\r\n{windows}\r\n"
        f"{b}\r\n"
        "</Tasks>\r\n"
    )
    for text in (one, one.replace("<Tasks>\r\n", '<Tasks>\r\n<?xml version="1.0" encoding="UTF-16"?>\r\n')):
        tasks = ls.parse_all_task_xml(text)
        assert tasks is not None and sorted(tasks) == ["LoreSync-a", "LoreSync-b"]
        assert ls.SchtasksBackend._xml_text(tasks["LoreSync-b"], "Actions/Exec/Command") == "b.exe"
    assert ls.parse_all_task_xml("ERROR: something else entirely") is None
