"""Task Scheduler backend: task XML against the 1.3 XSD, Windows argument quoting,
schtasks sequences and failures, state parsing of captured real outputs.

On Linux everything runs through FakeSystem (platform "win32") and the real
`--dry-run`; the tests marked `windows` drive the real schtasks and run only on Windows.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ROOT,
    TOKEN,
    FakeSystem,
    MemoryKeyring,
    WinSystem,
    backend_and_manifest,
    commands_during,
    detect,
    doctor_checks,
    fixture_bytes,
    fixture_text,
    install,
    python_folder,
    res,
    scheduler_state,
    shared_schema,
    status_all_beside_each,
    windows_from,
)

import lore_service as ls

NS = {"t": ls.TASK_NS}


def schemas_dir() -> Path:
    return shared_schema("task-scheduler-1.3.xsd").parent


def validate_task(content: str | bytes) -> Any:
    """Parse the task as schtasks would read it (UTF-16LE + BOM) and validate it against the XSD."""
    etree = pytest.importorskip("lxml.etree")
    raw = content if isinstance(content, bytes) else ls.task_xml_bytes(content)
    assert raw.startswith(b"\xff\xfe")
    schema = etree.XMLSchema(etree.parse(str(schemas_dir() / "task-scheduler-1.3.xsd")))
    doc = etree.fromstring(raw)
    assert schema.validate(doc), schema.error_log.filter_from_errors()
    return doc


def parse_windows_args(cmdline: str) -> list[str]:
    """CommandLineToArgvW / MS C runtime rules for arguments after argv[0] (written for the test)."""
    args: list[str] = []
    i, n = 0, len(cmdline)
    while True:
        while i < n and cmdline[i] in " \t":
            i += 1
        if i >= n:
            return args
        arg: list[str] = []
        quoted = False
        while i < n:
            c = cmdline[i]
            if c == "\\":
                j = i
                while j < n and cmdline[j] == "\\":
                    j += 1
                count = j - i
                if j < n and cmdline[j] == '"':
                    arg.append("\\" * (count // 2))
                    if count % 2:  # odd: a literal quote
                        arg.append('"')
                        j += 1
                    i = j
                else:
                    arg.append("\\" * count)
                    i = j
                continue
            if c == '"':
                if quoted and i + 1 < n and cmdline[i + 1] == '"':  # MSVC 2008+: "" inside quotes
                    arg.append('"')
                    i += 2
                    continue
                quoted = not quoted
                i += 1
                continue
            if c in " \t" and not quoted:
                break
            arg.append(c)
            i += 1
        args.append("".join(arg))


@pytest.fixture
def python_dir(tmp_path: Path) -> Path:
    """A Python folder with an awkward name, holding python.exe and its windowed twin."""
    return python_folder(tmp_path / 'Zoë\'s "Python" 3.11')


@pytest.fixture
def win(environ: dict[str, str], memory_keyring: MemoryKeyring, python_dir: Path, monkeypatch) -> WinSystem:
    return windows_from(python_dir, environ, monkeypatch)


def task_file(data: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in data["files"] if f["path"].endswith("task.xml"))


def task_xml(backend: ls.SchtasksBackend, manifest: ls.Manifest) -> str:
    """The task XML install renders, from the service's own service.toml."""
    return backend.task_xml(manifest, ls.load_config(backend.paths, manifest.service_id))


def children(el: Any) -> list[str]:
    return [c.tag.split("}")[1] for c in el]


# -- dry-run on Linux, real subprocess ------------------------------------------------


def test_dry_run_on_linux_previews_a_valid_task(tool, home: Path, project: Path) -> None:
    r = tool("--json", "install", "--backend", "schtasks", "--dry-run")
    assert r.code == 0, r.err + r.out
    data = r.data
    sid = data["service_id"]
    f = task_file(data)
    assert f["path"] == str(home / "config" / sid / "task.xml")
    assert f["content"].startswith('<?xml version="1.0" encoding="UTF-16"?>')
    doc = validate_task(f["content"])
    assert doc.get("version") == "1.3"
    assert children(doc) == ["RegistrationInfo", "Triggers", "Principals", "Settings", "Actions"]
    trigger = doc.find("t:Triggers/t:TimeTrigger", NS)
    assert children(trigger) == ["Enabled", "StartBoundary", "Repetition"]
    assert trigger.findtext("t:Repetition/t:Interval", namespaces=NS) == "PT30M"
    principal = doc.find("t:Principals/t:Principal", NS)
    assert doc.find("t:Actions", NS).get("Context") == principal.get("id")
    assert principal.findtext("t:LogonType", namespaces=NS) == "InteractiveToken"
    assert principal.findtext("t:RunLevel", namespaces=NS) == "LeastPrivilege"
    settings = {c.tag.split("}")[1]: c.text for c in doc.find("t:Settings", NS)}
    assert settings["StartWhenAvailable"] == "true"
    assert settings["MultipleInstancesPolicy"] == "IgnoreNew"
    assert settings["DisallowStartIfOnBatteries"] == settings["StopIfGoingOnBatteries"] == "false"
    assert settings["Hidden"] == "true" and settings["Priority"] == "7"
    assert settings["ExecutionTimeLimit"] == "PT15M"  # run budget 840 s, scheduler limit 900 s
    exec_ = doc.find("t:Actions/t:Exec", NS)
    assert exec_.findtext("t:Command", namespaces=NS) == f'"{data["program"][0]}"'  # quoted; no windowed twin on Linux
    assert parse_windows_args(exec_.findtext("t:Arguments", namespaces=NS)) == data["program"][1:]
    assert exec_.findtext("t:WorkingDirectory", namespaces=NS) == str(project)
    assert data["commands"] == [["schtasks", "/Create", "/TN", f"LoreSync-{sid}", "/XML", f["path"], "/F"]]
    assert data["token_source"] == "credential-manager"
    assert any("Windows only" in m for m in data["missing"])
    assert any("console window" in w for w in data["warnings"])
    assert TOKEN not in r.out + r.err


@pytest.mark.parametrize(
    ("interval", "iso"),
    [("5m", "PT5M"), ("45m", "PT45M"), ("90m", "PT1H30M"), ("2h", "PT2H"), ("7h", "PT7H"), ("24h", "PT24H")],
)
def test_every_interval_validates_and_catches_up_after_sleep(cli, interval: str, iso: str) -> None:
    r = install(cli, "schtasks", "--dry-run", "--interval", interval)
    assert r.code == 0, r.out
    doc = validate_task(task_file(r.data)["content"])  # the 1.3 XSD
    assert doc.findtext("t:Triggers/t:TimeTrigger/t:Repetition/t:Interval", namespaces=NS) == iso
    # a repetition missed while the PC sleeps or is off starts as soon as it is available again
    assert doc.findtext("t:Settings/t:StartWhenAvailable", namespaces=NS) == "true"
    assert r.data["schedule_step_seconds"] == ls.parse_interval(interval)  # the task fires at the interval itself


def test_embedded_token_is_refused(tool, cli, win: WinSystem, memory_keyring: MemoryKeyring) -> None:
    r = tool("--json", "install", "--backend", "schtasks", "--dry-run", "--token-source", "embedded")
    assert r.code == ls.EXIT_USAGE
    assert r.doc["error"]["code"] == "bad_token_source"
    assert "credential-manager" in r.doc["error"]["hint"]
    assert TOKEN not in r.out
    r = install(cli, "schtasks", "--token-source", "embedded", system=win)
    assert r.code == ls.EXIT_USAGE
    assert win.commands == [] and memory_keyring.store == {}
    assert ls.Paths(win).installed_ids() == []


def test_detect(environ: dict[str, str]) -> None:
    assert detect(ls.SchtasksBackend, FakeSystem(environ)) == (False, "schtasks is Windows only")
    win = WinSystem(environ)
    ok, why = detect(ls.SchtasksBackend, win)
    assert ok and "schtasks.exe" in why
    assert ls.choose_backend(win)[0] == "schtasks"
    win.which_map["schtasks"] = None
    assert detect(ls.SchtasksBackend, win) == (False, "schtasks is not on PATH")


# -- quoting and the windowed executable ---------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [
        ("C:\\My Dir\\", '"C:\\My Dir\\\\"'),
        ('a"b', '"a\\"b"'),
        ("", '""'),
        ('x\\\\"y', '"x\\\\\\\\\\"y"'),
        ("plain", "plain"),
        ("C:\\no\\spaces\\", "C:\\no\\spaces\\"),
        ("tab\there", '"tab\there"'),
        ("50% & <more> ^|", '"50% & <more> ^|"'),
    ],
)
def test_windows_quote_examples(arg: str, quoted: str) -> None:
    assert ls.windows_quote_arg(arg) == quoted
    assert parse_windows_args(quoted) == [arg]


def test_windows_quote_round_trip_fuzz() -> None:
    rng = random.Random(20261128)
    alphabet = 'ab\\" \tü%'
    for _ in range(5000):
        argv = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(rng.randint(1, 5))]
        line = ls.windows_join_args(argv)
        assert parse_windows_args(line) == argv, (argv, line)
        assert parse_windows_args(subprocess.list2cmdline(argv)) == argv  # the same rules as the stdlib's


@pytest.mark.parametrize(
    ("program", "windowed"),
    [
        ("C:\\Python311\\python.exe", "C:\\Python311\\pythonw.exe"),
        ("C:\\venv\\Scripts\\Python.EXE", "C:\\venv\\Scripts\\pythonw.exe"),
        ("C:\\Py\\python3.exe", "C:\\Py\\pythonw.exe"),
        ("C:\\Program Files\\lore-service\\lore-service.exe", "C:\\Program Files\\lore-service\\lore-service-w.exe"),
        ("C:\\Py\\pythonw.exe", "C:\\Py\\pythonw.exe"),
        ("/usr/bin/python3", "/usr/bin/python3"),
        ("python.exe", "pythonw.exe"),
    ],
)
def test_windowed_program(program: str, windowed: str) -> None:
    assert ls.windowed_program(program) == windowed


def test_iso_duration() -> None:
    assert [ls.iso_duration(s) for s in (300, 1800, 3600, 5400, 86400, 900, 61, 0)] == [
        "PT5M", "PT30M", "PT1H", "PT1H30M", "PT24H", "PT15M", "PT1M1S", "PT0S",
    ]  # fmt: skip


# -- install / uninstall through FakeSystem (platform win32) -------------------------------


def test_install_sequence_file_and_exec(
    cli, win: WinSystem, memory_keyring: MemoryKeyring, python_dir: Path, tmp_path: Path, home: Path
) -> None:
    project = tmp_path / 'My "Quoted" Prøject 100% & <x>'
    project.mkdir()
    win.respond(["schtasks", "/Create"], res(0, fixture_text("schtasks", "create_success.stdout.txt")))
    r = install(cli, "schtasks", "--project", str(project), system=win)
    assert r.code == 0, r.out + r.err
    sid = r.data["service_id"]
    xml_path = home / "config" / sid / "task.xml"
    assert win.commands == [["schtasks", "/Create", "/TN", f"LoreSync-{sid}", "/XML", str(xml_path), "/F"]]
    assert r.data["commands"] == win.commands
    raw = xml_path.read_bytes()
    assert raw.startswith(b"\xff\xfe<\x00?\x00x\x00m\x00l\x00")  # UTF-16LE with BOM, as /XML requires
    assert xml_path.stat().st_mode & 0o777 == 0o600
    doc = validate_task(raw)
    exec_ = doc.find("t:Actions/t:Exec", NS)
    assert exec_.findtext("t:Command", namespaces=NS) == f'"{python_dir / "pythonw.exe"}"'
    assert parse_windows_args(exec_.findtext("t:Arguments", namespaces=NS)) == r.data["program"][1:]
    assert exec_.findtext("t:WorkingDirectory", namespaces=NS) == str(project)
    assert str(project) in doc.findtext("t:RegistrationInfo/t:Description", namespaces=NS)
    assert any("'%'" in w for w in r.data["warnings"])
    assert memory_keyring.store[(ls.KEYRING_SERVICE, sid)] == TOKEN
    for path in home.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes()
            assert TOKEN.encode("utf-16-le") not in path.read_bytes()
    assert TOKEN not in r.out + r.err


def test_access_denied_is_exit_6_with_hint_and_rolls_back(cli, win: WinSystem, memory_keyring, home: Path) -> None:
    win.respond(["schtasks", "/Create"], res(1, "", fixture_text("schtasks", "create_access_denied.stderr.txt")))
    r = install(cli, "schtasks", system=win)
    assert r.code == ls.EXIT_SCHEDULER, r.out
    err = r.doc["error"]
    assert err["code"] == "schtasks_access_denied"
    assert "Access is denied" in err["message"]
    assert "elevated" in err["hint"]
    assert list(home.rglob("task.xml")) == []
    assert ls.Paths(win).installed_ids() == []
    assert memory_keyring.store == {}


def test_too_long_command_is_refused(cli, win: WinSystem, tmp_path: Path, monkeypatch) -> None:
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    for exe in ("python.exe", "pythonw.exe"):
        (deep / exe).write_text("")
    monkeypatch.setattr(ls, "self_command", lambda: [str(deep / "python.exe"), str(ROOT / "lore_service.py")])
    d = install(cli, "schtasks", "--dry-run", system=win)
    assert d.code == 0
    assert any("Task Scheduler allows 260" in m for m in d.data["missing"])
    r = install(cli, "schtasks", system=win)
    assert r.code == ls.EXIT_SCHEDULER
    assert "260" in r.doc["error"]["message"] and "shorter folder" in r.doc["error"]["hint"]
    assert win.commands == []


def test_missing_windowed_twin_is_a_prerequisite_failure(cli, win: WinSystem, python_dir: Path) -> None:
    (python_dir / "pythonw.exe").unlink()
    r = install(cli, "schtasks", system=win)
    assert r.code == ls.EXIT_SCHEDULER
    assert "pythonw.exe" in r.doc["error"]["message"]
    assert win.commands == []


def test_uninstall_sequences(cli, win: WinSystem, memory_keyring: MemoryKeyring, home: Path) -> None:
    assert install(cli, "schtasks", system=win).code == 0
    backend, manifest = backend_and_manifest(win, ls.SchtasksBackend)
    name = backend.task_name(manifest)
    # access denied while the task still exists: exit 6, nothing removed
    win.respond(["schtasks", "/Delete"], res(1, "", fixture_text("schtasks", "create_access_denied.stderr.txt")))
    win.commands.clear()
    r = cli("--json", "uninstall", sys_=win)
    assert r.code == ls.EXIT_SCHEDULER
    assert win.commands == [["schtasks", "/Delete", "/TN", name, "/F"], ["schtasks", "/Query", "/TN", name]]
    assert Path(backend.xml_path(manifest)).exists()
    # already gone (a localised "cannot find"): the Query confirms it and uninstall finishes
    win.respond(["schtasks", "/Delete"], res(1, "", fixture_text("schtasks", "query_missing.stderr.txt")))
    win.respond(["schtasks", "/Query"], res(1, "", fixture_text("schtasks", "query_missing.stderr.txt")))
    r = cli("--json", "uninstall", sys_=win)
    assert r.code == 0, r.out
    assert not Path(backend.xml_path(manifest)).exists()
    assert memory_keyring.store == {}


def test_uninstall_plain(cli, win: WinSystem) -> None:
    assert install(cli, "schtasks", system=win).code == 0
    backend, manifest = backend_and_manifest(win, ls.SchtasksBackend)
    win.commands.clear()
    assert cli("--json", "uninstall", sys_=win).code == 0
    assert win.commands == [["schtasks", "/Delete", "/TN", backend.task_name(manifest), "/F"]]


# -- state: real captured outputs ----------------------------------------------------------


@pytest.fixture
def installed_win(cli, win: WinSystem) -> tuple[ls.SchtasksBackend, ls.Manifest]:
    assert install(cli, "schtasks", system=win).code == 0
    return backend_and_manifest(win, ls.SchtasksBackend)


def answer(win: WinSystem, backend: ls.SchtasksBackend, manifest: ls.Manifest, csv: str, xml: str | None) -> None:
    name = backend.task_name(manifest)
    win.respond(["schtasks", "/Query", "/TN", name, "/V"], res(0, csv))
    if xml is None:
        xml = task_xml(backend, manifest)
    win.respond(["schtasks", "/Query", "/TN", name, "/XML"], res(0, xml))


def local_iso(text: str, fmt: str) -> str:
    return ls.iso_from_ms(int(time.mktime(time.strptime(text, fmt))) * 1000)


def test_state_never_run(installed_win, win: WinSystem) -> None:
    backend, manifest = installed_win
    answer(win, backend, manifest, fixture_text("schtasks", "csv_verbose_never_run.csv"), None)
    st = scheduler_state(backend, manifest)
    assert st["registered"] is True and st["active"] is True
    assert st["last_result"] is None and st["running"] is False
    assert st["next_run_iso"] is None and st["last_trigger_iso"] is None  # N/A and the 1999 sentinel
    assert "has not run yet" in st["detail"]
    assert st["drift"] == []
    name = backend.task_name(manifest)
    assert win.commands[-2:] == [
        ["schtasks", "/Query", "/TN", name, "/V", "/FO", "CSV"],
        ["schtasks", "/Query", "/TN", name, "/XML"],
    ]


def test_state_ok_with_times(installed_win, win: WinSystem) -> None:
    backend, manifest = installed_win
    answer(win, backend, manifest, fixture_text("schtasks", "csv_verbose_ok_first9cols.csv"), None)
    st = scheduler_state(backend, manifest)
    assert st["last_result"] == 0
    assert st["next_run_iso"] == local_iso("8/2/2026 1:00:00 PM", "%m/%d/%Y %I:%M:%S %p")
    assert st["last_trigger_iso"] == local_iso("8/1/2026 1:00:01 PM", "%m/%d/%Y %I:%M:%S %p")
    assert "last result 0" in st["detail"]


@pytest.mark.parametrize(
    ("code", "running", "last"), [("267009", True, None), ("1", False, 1), ("-2147024894", False, -2147024894)]
)
def test_state_result_codes(installed_win, win: WinSystem, code: str, running: bool, last) -> None:
    backend, manifest = installed_win
    csv = fixture_text("schtasks", "csv_verbose_ok_first9cols.csv").replace('"0"', f'"{code}"', 1)
    answer(win, backend, manifest, csv, None)
    st = scheduler_state(backend, manifest)
    assert st["running"] is running and st["last_result"] == last


def test_state_localised_header_maps_by_position(installed_win, win: WinSystem) -> None:
    backend, manifest = installed_win
    header, row = fixture_text("schtasks", "csv_verbose_never_run.csv").splitlines()[:2]
    russian = header.replace(
        '"HostName","TaskName","Next Run Time"', '"Имя узла","Имя задачи","Время следующего запуска"'
    )
    russian = russian.replace('"Last Result"', '"Последний результат"')
    csv = f"{russian}\r\n{row.replace('267011', '0')}\r\n{russian}\r\n"  # the header repeats per folder
    rows = ls.parse_schtasks_csv(csv)
    assert len(rows) == 1 and rows[0]["Last Result"] == "0" and rows[0]["Status"] == "Ready"
    assert len(rows[0]) == 28 and rows[0]["Repeat: Stop If Still Running"] == "Disabled"
    answer(win, backend, manifest, csv, None)
    assert scheduler_state(backend, manifest)["last_result"] == 0


def test_state_not_registered(installed_win, win: WinSystem, cli) -> None:
    backend, manifest = installed_win
    win.respond(["schtasks", "/Query"], res(1, "", fixture_text("schtasks", "query_missing.stderr.txt")))
    st = scheduler_state(backend, manifest)
    assert st["registered"] is False
    assert st["drift"] == [f"task {backend.task_name(manifest)} is not registered"]
    s = cli("status", sys_=win)
    assert "DRIFT" in s.out and "not registered" in s.out


def test_state_access_denied_is_an_error(installed_win, win: WinSystem) -> None:
    backend, manifest = installed_win
    win.respond(["schtasks", "/Query"], res(1, "", fixture_text("schtasks", "create_access_denied.stderr.txt")))
    with pytest.raises(ls.SchedulerError) as exc:
        scheduler_state(backend, manifest)
    assert exc.value.code == "schtasks_access_denied"


def test_state_drift_from_registered_xml_and_local_file(installed_win, win: WinSystem) -> None:
    backend, manifest = installed_win
    # a task that Windows stores for someone else's command (the real /Query /XML capture)
    foreign = fixture_bytes("schtasks", "query_xml_schtasks_created.utf16le.xml").decode("utf-16")
    answer(win, backend, manifest, fixture_text("schtasks", "csv_verbose_never_run.csv"), foreign)
    drift = scheduler_state(backend, manifest)["drift"]
    assert any("runs cmd.exe /c echo hello" in d for d in drift)
    assert any("repeats every None" in d for d in drift)
    # our own XML as it arrives through a code-page pipe (UTF-16 bytes read as single bytes)
    piped = ls.task_xml_bytes(task_xml(backend, manifest)).decode("latin-1")
    answer(win, backend, manifest, fixture_text("schtasks", "csv_verbose_never_run.csv"), piped)
    assert scheduler_state(backend, manifest)["drift"] == []
    xml_path = Path(backend.xml_path(manifest))
    xml_path.write_bytes(ls.task_xml_bytes(task_xml(backend, manifest).replace("PT30M", "PT1M")))
    edited = f"{xml_path} was edited (it differs from what install writes)"
    assert scheduler_state(backend, manifest)["drift"] == [edited]
    xml_path.unlink()
    assert scheduler_state(backend, manifest)["drift"] == [f"{xml_path} is missing"]


def test_decode_task_xml_variants() -> None:
    from xml.etree import ElementTree as ET

    for raw in (
        fixture_bytes("schtasks", "query_xml_schtasks_created.utf16le.xml"),
        fixture_bytes("schtasks", "query_xml_schtasks_created.utf8.xml"),
    ):
        root = ET.fromstring(ls.decode_task_xml(raw))
        assert root.findtext("t:Actions/t:Exec/t:Command", namespaces=NS) == "cmd.exe"
    text = fixture_bytes("schtasks", "query_xml_schtasks_created.utf16le.xml").decode("utf-16")
    assert ET.fromstring(ls.decode_task_xml(text)).get("version") == "1.2"
    # the real export puts StartBoundary before Enabled, which the XSD rejects: our lint is stricter
    etree = pytest.importorskip("lxml.etree")
    schema = etree.XMLSchema(etree.parse(str(schemas_dir() / "task-scheduler-1.3.xsd")))
    assert not schema.validate(etree.fromstring(fixture_bytes("schtasks", "query_xml_schtasks_created.utf16le.xml")))
    assert validate_task(fixture_bytes("schtasks", "sample_valid_task.xml")) is not None


def test_parse_list_fixtures_are_not_csv() -> None:
    # LIST output is for humans; the backend asks for CSV. Parsing LIST as CSV must not crash.
    for name in ("list_verbose_never_run_ru-RU.txt", "list_verbose_failed_ko-KR.txt"):
        rows = ls.parse_schtasks_csv(fixture_text("schtasks", name))
        assert isinstance(rows, list)


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("8/2/2026 1:00:00 PM", "%m/%d/%Y %I:%M:%S %p"),
        ("18.02.2026 5:37:00", "%d.%m.%Y %H:%M:%S"),
        ("2026-04-07 13:30:00", "%Y-%m-%d %H:%M:%S"),
    ],
)
def test_parse_schtasks_time(text: str, fmt: str) -> None:
    assert ls.parse_schtasks_time(text) == local_iso(text, fmt)


@pytest.mark.parametrize(
    "text",
    [
        "N/A",
        "",
        None,
        "11/30/1999 12:00:00 AM",
        "30.11.1999 0:00:00",
        "2026-04-07 오전 8:30:00",
        "27/08/2026 3:00:00 SA",
    ],
)
def test_parse_schtasks_time_unknown_or_never(text: str | None) -> None:
    assert ls.parse_schtasks_time(text) is None


# -- doctor ----------------------------------------------------------------------------------


def test_doctor_reports_task_and_battery(installed_win, win: WinSystem, cli, python_dir: Path) -> None:
    backend, manifest = installed_win
    answer(win, backend, manifest, fixture_text("schtasks", "csv_verbose_never_run.csv"), None)
    with commands_during(win) as ran:
        checks = doctor_checks(cli, sys_=win)
    assert checks["task"]["status"] == "ok"
    assert checks["battery"]["status"] == "ok"
    queries = [c for c in ran if c[:2] == ["schtasks", "/Query"]]
    assert len(queries) == len({tuple(q) for q in queries}) == 2  # the task's CSV row and its XML, once each
    assert checks["windowed program"]["message"] == f"the task runs {python_dir / 'pythonw.exe'} (no console window)"
    # a task Windows stored with its defaults: no runs on battery
    foreign = fixture_bytes("schtasks", "query_xml_schtasks_created.utf16le.xml").decode("utf-16")
    answer(win, backend, manifest, fixture_text("schtasks", "csv_verbose_never_run.csv"), foreign)
    checks = doctor_checks(cli, sys_=win)
    assert checks["battery"]["status"] == "warn"
    assert "DisallowStartIfOnBatteries" in checks["battery"]["message"]
    win.respond(["schtasks", "/Query"], res(1, "", fixture_text("schtasks", "query_missing.stderr.txt")))
    checks = doctor_checks(cli, sys_=win)
    assert checks["task"]["status"] == "fail"


# -- real schtasks (Windows only) -------------------------------------------------------------

on_windows = pytest.mark.skipif(sys.platform != "win32", reason="needs Windows and schtasks")


@pytest.mark.windows
@on_windows
def test_real_schtasks_install_status_uninstall(tool, environ: dict[str, str], tmp_path: Path) -> None:
    lore = tmp_path / "lore.cmd"
    lore.write_text("@echo off\r\nexit /b 0\r\n")
    env = {**os.environ, **environ}
    # the runner's real Credential Manager, as users get by default (env-file is Linux only)
    argv = ["--backend", "schtasks", "--token-source", "credential-manager", "--lore", str(lore)]
    r = tool("--json", "install", *argv, env=env)
    assert r.code == 0, r.err + r.out
    name = f"LoreSync-{r.data['service_id']}"
    try:
        q = subprocess.run(["schtasks", "/Query", "/TN", name, "/XML"], capture_output=True)
        assert q.returncode == 0, q.stderr
        s = tool("--json", "status", env=env)
        assert s.data["scheduler"]["registered"] is True, s.out
        assert s.data["scheduler"]["drift"] == [], s.out
    finally:
        u = tool("--json", "uninstall", "--purge", env=env)
    assert u.code == 0, u.err + u.out
    assert subprocess.run(["schtasks", "/Query", "/TN", name], capture_output=True).returncode != 0


def test_reinstall_with_the_same_options_changes_nothing(cli, win: WinSystem) -> None:
    """task.xml is UTF-16 on disk: comparing it as text would report a change
    every time. A task deleted, disabled or edited in the app is registered again."""
    assert install(cli, "schtasks", system=win).data["changed"] is True
    backend, manifest = backend_and_manifest(win, ls.SchtasksBackend)
    registered = {"xml": Path(backend.xml_path(manifest)).read_bytes().decode("utf-16")}
    win.respond(
        ["schtasks", "/Query", "/TN", backend.task_name(manifest), "/XML"], lambda a, i: res(0, registered["xml"])
    )
    win.commands.clear()
    again = install(cli, "schtasks", system=win)
    assert again.code == 0 and again.data["changed"] is False
    assert not any(c[:2] == ["schtasks", "/Create"] for c in win.commands)
    # disabled in the Task Scheduler app: the same XML on disk, but install repairs it
    head, _, tail = registered["xml"].rpartition("<Enabled>true</Enabled>")  # the task's (Settings), not its trigger's
    registered["xml"] = head + "<Enabled>false</Enabled>" + tail
    win.commands.clear()
    assert install(cli, "schtasks", system=win).data["changed"] is True
    assert any(c[:2] == ["schtasks", "/Create"] for c in win.commands)
    # deleted in the app
    win.respond(["schtasks", "/Query", "/TN"], res(1, "", "ERROR: The system cannot find the file specified."))
    win.commands.clear()
    assert install(cli, "schtasks", system=win).data["changed"] is True
    assert any(c[:2] == ["schtasks", "/Create"] for c in win.commands)


# -- Windows as its users meet it: locales, durations, quoting -------------------------------------


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("3/04/2026 2:00:00 PM", "%d/%m/%Y %I:%M:%S %p"),  # en-AU: day first, month zero-padded
        ("23/4/2026 9:15:00 AM", "%d/%m/%Y %I:%M:%S %p"),  # the day shows
        ("4/23/2026 9:15:00 AM", "%m/%d/%Y %I:%M:%S %p"),  # en-US, the day shows
        ("4/4/2026 9:15:00 AM", "%m/%d/%Y %I:%M:%S %p"),  # the same either way
    ],
)
def test_slash_dates_are_read_day_or_month_first_by_what_the_text_shows(text: str, fmt: str) -> None:
    assert ls.parse_schtasks_time(text) == local_iso(text, fmt)


def test_a_slash_date_nothing_disambiguates_is_refused_not_guessed() -> None:
    assert ls.parse_schtasks_time("03/04/2026 2:00:00 PM") is None


@pytest.mark.parametrize(
    ("text", "seconds"), [("PT30M", 1800), ("PT24H", 86400), ("P1D", 86400), ("P1DT2H", 93600), ("PT90S", 90)]
)
def test_task_intervals_compare_as_durations(text: str, seconds: int) -> None:
    assert ls.iso_duration_seconds(text) == seconds


@pytest.mark.parametrize("text", [None, "", "30M", "PT", "PTXM", "P1H"])
def test_what_is_not_a_duration_is_none(text: str | None) -> None:
    assert ls.iso_duration_seconds(text) is None


def test_a_daily_task_windows_stored_as_p1d_with_an_unquoted_command_is_not_drift(
    installed_win: tuple[ls.SchtasksBackend, ls.Manifest],
) -> None:
    from xml.etree import ElementTree as ET

    backend, manifest = installed_win
    manifest.interval_seconds = manifest.schedule_step_seconds = 86400
    registered = ET.fromstring(ls.decode_task_xml(task_xml(backend, manifest)))
    registered.find("t:Triggers/t:TimeTrigger/t:Repetition/t:Interval", NS).text = "P1D"  # as Windows may keep PT24H
    command = registered.find("t:Actions/t:Exec/t:Command", NS)
    command.text = command.text.strip('"')  # as an older install (or the app) wrote it
    assert backend._registered_drift(manifest, registered) == []


@pytest.mark.parametrize(
    ("data", "codepage", "text"),
    [
        ("C:\\Users\\Jürgen\\proj".encode("cp850"), "cp850", "C:\\Users\\Jürgen\\proj"),  # no BOM, OEM code page
        ("C:\\Users\\Jürgen".encode("utf-16"), "cp850", "C:\\Users\\Jürgen"),  # UTF-16 with its BOM
        ("C:\\Users\\Jürgen".encode("utf-16-le"), "cp850", "C:\\Users\\Jürgen"),  # UTF-16 without one
        ("C:\\Users\\Jürgen".encode(), "cp850", "C:\\Users\\Jürgen"),  # chcp 65001
        (b"\xef\xbb\xbfok", None, "ok"),
    ],
)
def test_schtasks_output_is_decoded_by_what_it_is(data: bytes, codepage: str | None, text: str) -> None:
    assert ls.decode_console(data, codepage) == text


def test_access_denied_is_recognised_in_the_users_language(cli, win: WinSystem) -> None:
    class GermanWindows(WinSystem):
        def access_denied_text(self) -> str:
            return "Zugriff verweigert"  # what FormatError(5) gives on a German Windows

    german = GermanWindows(win.environ)
    german.respond(["schtasks", "/Create"], res(1, "", "FEHLER: Zugriff verweigert\n"))
    r = install(cli, "schtasks", system=german)
    assert r.code == ls.EXIT_SCHEDULER and r.doc["error"]["code"] == "schtasks_access_denied"
    other = GermanWindows(win.environ)
    other.respond(["schtasks", "/Create"], res(1, "", "FEHLER: Die Aufgabe existiert bereits.\n"))
    assert install(cli, "schtasks", system=other).doc["error"]["code"] == "schtasks"


@pytest.mark.windows
@on_windows
def test_real_status_all_says_for_each_task_what_its_own_status_says(tool, environ: dict[str, str], tmp_path: Path):
    """status --all reads every task from one `/Query /V /FO CSV` and one
    `/Query /XML ONE` (issue 12.6): the real outputs give each service what
    `status` of that one service gives."""
    lore = tmp_path / "lore.cmd"
    lore.write_text("@echo off\r\nexit /b 0\r\n")
    env = {**os.environ, **environ}
    argv = ["--backend", "schtasks", "--token-source", "credential-manager", "--lore", str(lore)]
    for batched, own in status_all_beside_each(tool, argv, env, tmp_path):
        assert batched == own and own["registered"] is True and own["drift"] == [], (batched, own)
