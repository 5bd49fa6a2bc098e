"""launchd backend: plist generation, launchctl sequences, state parsing, GUI-context checks.

On Linux everything runs through FakeSystem (platform "darwin") and the real
`--dry-run`; the tests marked `macos` drive the real launchctl and run only on a Mac.
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    FAKE_LORE,
    TOKEN,
    UID,
    FakeSystem,
    MacSystem,
    MemoryKeyring,
    backend_and_manifest,
    detect,
    fixture_text,
    install,
    res,
    scheduler_state,
    shared_schema,
    status_all_beside_each,
)

import lore_service as ls


def schemas_dir() -> Path:
    return shared_schema("PropertyList-1.0.dtd").parent


def validate_plist(content: str) -> dict[str, Any]:
    """plistlib round trip plus Apple's DTD through lxml (no network: the DTD is local)."""
    etree = pytest.importorskip("lxml.etree")
    raw = content.encode("utf-8")
    job = plistlib.loads(raw)
    assert plistlib.loads(plistlib.dumps(job)) == job
    with open(schemas_dir() / "PropertyList-1.0.dtd", "rb") as fh:
        dtd = etree.DTD(fh)
    doc = etree.fromstring(raw)
    assert dtd.validate(doc), dtd.error_log.filter_from_errors()
    return job


@pytest.fixture
def mac(environ: dict[str, str], memory_keyring: MemoryKeyring) -> MacSystem:
    return MacSystem(dict(environ))


def plist_file(data: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in data["files"] if f["path"].endswith(".plist"))


# -- dry-run on Linux, real subprocess ------------------------------------------------


def test_dry_run_on_linux_previews_a_valid_plist(
    tool, environ: dict[str, str], project: Path, home: Path, lore_bin: Path
) -> None:
    r = tool("--json", "install", "--backend", "launchd", "--dry-run")
    assert r.code == 0, r.err + r.out
    data = r.data
    sid = data["service_id"]
    label = f"com.gitlore.sync.{sid}"
    f = plist_file(data)
    assert f["path"] == os.path.join(environ["HOME"], "Library", "LaunchAgents", f"{label}.plist")
    assert f["mode"] == "0644"
    job = validate_plist(f["content"])
    crash_log = str(home / "logs" / sid / "scheduler-output.log")
    # every hour at two minutes 30 apart, at the minutes cron would use: never StartInterval
    first = int(ls.cron_expression(sid, 1800).split("-")[0])
    assert data["schedule_step_seconds"] == 1800
    assert job == {
        "Label": label,
        "ProgramArguments": data["program"],
        "StartCalendarInterval": [{"Minute": first}, {"Minute": first + 30}],
        "RunAtLoad": False,
        "LowPriorityIO": True,
        "Nice": 10,
        "WorkingDirectory": str(project),
        "StandardOutPath": crash_log,
        "StandardErrorPath": crash_log,
        # lore's own folder first, then Homebrew's and the system's: never launchd's bare PATH
        "EnvironmentVariables": {"PATH": f"{lore_bin.parent}:" + ":".join(ls.LAUNCHD_PATH)},
    }
    assert data["token_source"] == "keychain"
    uid = os.getuid()
    assert data["commands"] == [
        ["launchctl", "bootout", f"gui/{uid}/{label}"],
        ["launchctl", "enable", f"gui/{uid}/{label}"],
        ["launchctl", "bootstrap", f"gui/{uid}", f["path"]],
    ]
    assert any("launchctl is macOS only" in m for m in data["missing"])
    assert TOKEN not in r.out + r.err
    assert not Path(f["path"]).exists()


def test_dry_run_text_mode_lists_missing_prerequisite(tool) -> None:
    r = tool("install", "--backend", "launchd", "--dry-run", "--interval", "2h")
    assert r.code == 0, r.err
    assert "<key>StartCalendarInterval</key>\n\t<array>\n\t\t<dict>\n\t\t\t<key>Minute</key>" in r.out
    assert "StartInterval<" not in r.out
    assert "missing: launchctl is macOS only" in r.out


def test_dry_run_embedded_is_redacted(tool) -> None:
    r = tool("--json", "install", "--backend", "launchd", "--dry-run", "--token-source", "embedded")
    assert r.code == 0, r.err + r.out
    f = plist_file(r.data)
    assert f["mode"] == "0600"
    job = validate_plist(f["content"])
    assert job["EnvironmentVariables"]["GITLAB_TOKEN"] == ls.SECRET_PLACEHOLDER
    assert set(job["EnvironmentVariables"]) == {"GITLAB_TOKEN", "PATH"}
    assert TOKEN not in r.out + r.err
    assert any("embedded" in w for w in r.data["warnings"])


def test_env_file_is_refused_on_launchd(tool) -> None:
    r = tool("--json", "install", "--backend", "launchd", "--dry-run", "--token-source", "env-file")
    assert r.code == ls.EXIT_USAGE
    assert r.doc["error"]["code"] == "bad_token_source"


def test_awkward_project_path_survives_unquoted(tool, tmp_path: Path) -> None:
    weird = tmp_path / 'it\'s a "quoted" dïr & $HOME' / "prø jekt"
    weird.mkdir(parents=True)
    r = tool("--json", "install", "--backend", "launchd", "--dry-run", "--project", str(weird))
    assert r.code == 0, r.err + r.out
    job = validate_plist(plist_file(r.data)["content"])
    assert job["WorkingDirectory"] == str(weird)
    assert job["ProgramArguments"] == r.data["program"]


def test_real_install_refused_on_linux(tool) -> None:
    r = tool("--json", "install", "--backend", "launchd")
    assert r.code == ls.EXIT_SCHEDULER
    assert "macOS only" in r.doc["error"]["message"]


def test_detect(environ: dict[str, str]) -> None:
    assert detect(ls.LaunchdBackend, FakeSystem(environ)) == (False, "launchctl is macOS only")
    mac = MacSystem(environ)
    ok, why = detect(ls.LaunchdBackend, mac)
    assert ok and "/bin/launchctl" in why
    mac.which_map["launchctl"] = None
    assert detect(ls.LaunchdBackend, mac) == (False, "launchctl is not on PATH")
    assert ls.choose_backend(MacSystem(environ))[0] == "launchd"


# -- install / uninstall sequences through FakeSystem -------------------------------------


def test_fresh_install_sequence(cli, mac: MacSystem, memory_keyring: MemoryKeyring, home: Path) -> None:
    r = install(cli, "launchd", system=mac)
    assert r.code == 0, r.err + r.out
    sid = r.data["service_id"]
    label = f"com.gitlore.sync.{sid}"
    plist = os.path.join(mac.environ["HOME"], "Library", "LaunchAgents", f"{label}.plist")
    assert mac.commands == [
        ["launchctl", "print", f"gui/{UID}"],
        ["launchctl", "print-disabled", f"gui/{UID}"],  # not switched off under Login Items
        ["launchctl", "print", f"gui/{UID}/{label}"],
        ["launchctl", "enable", f"gui/{UID}/{label}"],
        ["launchctl", "bootstrap", f"gui/{UID}", plist],
    ]
    assert r.data["commands"] == mac.commands[3:]
    assert plist in r.data["files"]
    job = validate_plist(Path(plist).read_text(encoding="utf-8"))
    assert set(job["EnvironmentVariables"]) == {"PATH"}  # the token is in the keychain, not the plist
    assert job["StandardOutPath"] == str(home / "logs" / sid / "scheduler-output.log")
    assert memory_keyring.store[(ls.KEYRING_SERVICE, sid)] == TOKEN
    for root in (home, Path(mac.environ["HOME"])):
        for path in root.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in r.out + r.err


def test_reinstall_unchanged_only_enables_and_changed_reloads(cli, mac: MacSystem) -> None:
    assert install(cli, "launchd", system=mac).code == 0
    sid = ls.Paths(mac).installed_ids()[0]
    label = f"com.gitlore.sync.{sid}"
    target = f"gui/{UID}/{label}"
    assert target in mac.loaded  # bootstrapped by the first install

    mac.commands.clear()
    r = install(cli, "launchd", system=mac)
    assert r.code == 0, r.err
    assert mac.commands == [["launchctl", "print", f"gui/{UID}"], ["launchctl", "print-disabled", f"gui/{UID}"]] + [
        ["launchctl", "print", target],
        ["launchctl", "enable", target],
    ]

    mac.commands.clear()
    r = install(cli, "launchd", "--interval", "1h", system=mac)
    assert r.code == 0, r.err
    plist = os.path.join(mac.environ["HOME"], "Library", "LaunchAgents", f"{label}.plist")
    assert mac.commands[3:] == [
        ["launchctl", "bootout", target],
        ["launchctl", "print", target],  # gone: launchd let go of the label at once this time
        ["launchctl", "enable", target],
        ["launchctl", "bootstrap", f"gui/{UID}", plist],
    ]
    assert plistlib.loads(Path(plist).read_bytes())["StartCalendarInterval"] == ls.launchd_calendar(sid, 3600)


@pytest.mark.parametrize(
    ("code", "stderr_file", "error_code", "hint_word"),
    [
        (5, "bootstrap_failed_5.stderr.txt", "launchctl_bootstrap", "plutil -lint"),
        (125, "bootstrap_failed_125.stderr.txt", "no_gui_domain", "Terminal"),
    ],
)
def test_bootstrap_failure_is_exit_6_with_hint_and_rolls_back(
    cli, mac: MacSystem, memory_keyring: MemoryKeyring, code: int, stderr_file: str, error_code: str, hint_word: str
) -> None:
    mac.respond(["launchctl", "bootstrap"], res(code, "", fixture_text("launchd", stderr_file)))
    r = install(cli, "launchd", system=mac)
    assert r.code == ls.EXIT_SCHEDULER, r.out
    err = r.doc["error"]
    assert err["code"] == error_code
    assert hint_word in err["hint"]
    assert f"({code})" in err["message"]
    assert ["launchctl", "bootstrap"] in [c[:2] for c in mac.commands]
    # the failed first install is rolled back: bootout (harmless if not loaded) and no files
    assert mac.commands[-2:] == [
        ["launchctl", "bootout", mac.commands[-1][2]],
        ["launchctl", "print", mac.commands[-1][2]],
    ]
    # nothing half-installed: no plist for launchd to load at next login, no config, no secret
    assert list(Path(mac.environ["HOME"]).rglob("*.plist")) == []
    assert ls.Paths(mac).installed_ids() == []
    assert memory_keyring.store == {}


def test_bootstrap_failure_on_reinstall_restores_previous_plist(cli, mac: MacSystem) -> None:
    assert install(cli, "launchd", system=mac).code == 0
    plist = next(Path(mac.environ["HOME"]).rglob("*.plist"))
    before = plist.read_bytes()
    mac.respond(["launchctl", "bootstrap"], res(5, "", fixture_text("launchd", "bootstrap_failed_5.stderr.txt")))
    r = install(cli, "launchd", "--interval", "1h", system=mac)
    assert r.code == ls.EXIT_SCHEDULER
    assert plist.read_bytes() == before


@pytest.mark.parametrize(
    ("env", "uid", "euid", "console", "why"),
    [
        ({"SUDO_USER": "alice"}, UID, UID, UID, "sudo"),
        ({}, UID, 0, UID, "effective uid"),
        ({}, 0, 0, 0, "root"),
        ({"SSH_CONNECTION": "10.0.0.2 50000 10.0.0.1 22"}, UID, UID, 0, "SSH session"),
        ({"SSH_TTY": "/dev/ttys003"}, UID, UID, 502, "uid 502"),
        ({"SSH_CLIENT": "10.0.0.2 50000 22"}, UID, UID, None, "SSH session"),
    ],
)
def test_non_gui_context_stops_before_launchctl_and_keychain(
    cli, mac: MacSystem, memory_keyring: MemoryKeyring, env, uid, euid, console, why
) -> None:
    mac.environ.update(env)
    mac.fake_uid, mac.fake_euid, mac.console_uid = uid, euid, console
    r = install(cli, "launchd", system=mac)
    assert r.code == ls.EXIT_SCHEDULER, r.out
    err = r.doc["error"]
    assert err["code"] == "prerequisite"
    assert why in err["message"]
    assert "keychain" in err["hint"] and "Terminal" in err["hint"] and "GUI" in err["hint"]
    assert mac.commands == []  # launchctl never ran
    assert memory_keyring.store == {}  # keychain never touched
    # the dry-run still previews, listing the problem under `missing`
    d = install(cli, "launchd", "--dry-run", system=mac)
    assert d.code == 0
    assert any(why in m for m in d.data["missing"])
    assert mac.commands == []


def test_ssh_while_owning_the_console_is_fine(cli, mac: MacSystem) -> None:
    mac.environ["SSH_CONNECTION"] = "10.0.0.2 50000 10.0.0.1 22"
    assert install(cli, "launchd", system=mac).code == 0


def test_missing_gui_domain_is_a_prerequisite_failure(cli, mac: MacSystem) -> None:
    mac.respond(["launchctl", "print", f"gui/{UID}"], res(113, "", "Could not find domain for user gui: 501\n"))
    r = install(cli, "launchd", system=mac)
    assert r.code == ls.EXIT_SCHEDULER
    assert "gui/501 is not available" in r.doc["error"]["message"]
    assert mac.commands == [["launchctl", "print", f"gui/{UID}"]]


def test_embedded_install_puts_token_only_in_the_plist(cli, mac: MacSystem, memory_keyring: MemoryKeyring) -> None:
    r = install(cli, "launchd", "--token-source", "embedded", system=mac)
    assert r.code == 0, r.err
    assert TOKEN not in r.out
    plist = next(Path(mac.environ["HOME"]).rglob("*.plist"))
    assert plist.stat().st_mode & 0o777 == 0o600
    job = validate_plist(plist.read_text(encoding="utf-8"))
    assert job["EnvironmentVariables"]["GITLAB_TOKEN"] == TOKEN and "PATH" in job["EnvironmentVariables"]
    assert memory_keyring.store == {}
    # status compares without the secret, so the embedded plist is not drift
    mac.respond(["launchctl", "print", f"gui/{UID}/{job['Label']}"], res(0, own_print(job, plist)))
    s = cli("--json", "status", sys_=mac)
    assert s.data["scheduler"]["drift"] == []
    assert TOKEN not in s.out


def test_uninstall_sequence_and_cleanup(cli, mac: MacSystem, memory_keyring: MemoryKeyring) -> None:
    assert install(cli, "launchd", system=mac).code == 0
    sid = ls.Paths(mac).installed_ids()[0]
    plist = next(Path(mac.environ["HOME"]).rglob("*.plist"))
    mac.commands.clear()
    r = cli("--json", "uninstall", sys_=mac)
    assert r.code == 0, r.err
    target = f"gui/{UID}/com.gitlore.sync.{sid}"
    assert mac.commands == [["launchctl", "bootout", target], ["launchctl", "print", target]]
    assert not plist.exists()
    assert str(plist) in r.data["removed"]
    assert memory_keyring.store == {}


def test_uninstall_tolerates_not_loaded_but_not_other_errors(cli, mac: MacSystem) -> None:
    assert install(cli, "launchd", system=mac).code == 0
    backend, manifest = backend_and_manifest(mac, ls.LaunchdBackend)
    mac.loaded.clear()  # unloaded by hand before: bootout answers 113
    mac.respond(["launchctl", "bootout"], res(113, "", "Boot-out failed: 113: Could not find specified service\n"))
    backend.uninstall(manifest)
    assert not Path(backend.plist_path(manifest)).exists()
    mac.respond(
        ["launchctl", "bootout"], res(125, "", "Boot-out failed: 125: Domain does not support specified action")
    )
    with pytest.raises(ls.SchedulerError) as exc:
        backend.uninstall(manifest)
    assert exc.value.exit_code == ls.EXIT_SCHEDULER and "Terminal" in exc.value.hint


# -- state: real captured `launchctl print` outputs ---------------------------------------


def own_print(job: dict[str, Any], plist: Path, state_text: str = "not running", tail: str = "") -> str:
    """A `launchctl print` in the captured format, for our own job."""
    return (
        f"gui/{UID}/{job['Label']} = {{\n\tactive count = 0\n\tpath = {plist}\n\ttype = LaunchAgent\n"
        f"\tstate = {state_text}\n\n\tprogram = {job['ProgramArguments'][0]}\n\targuments = {{\n"
        + "".join(f"\t\t{a}\n" for a in job["ProgramArguments"])
        + f"\t}}\n\n\tdomain = gui/{UID} [100003]\n{tail}"
        "\tresource coalition = {\n\t\tstate = active\n\t\tactive count = 1\n\t}\n\n"
        "\tproperties = inferred program\n}\n"
    )


@pytest.fixture
def installed_mac(cli, mac: MacSystem) -> tuple[ls.LaunchdBackend, ls.Manifest]:
    assert install(cli, "launchd", system=mac).code == 0
    return backend_and_manifest(mac, ls.LaunchdBackend)


@pytest.mark.parametrize(
    ("fixture", "running", "last_result", "runs", "pid", "detail_word"),
    [
        ("print_idle_ran.txt", False, 0, 6, None, "last exit code 0"),
        ("print_failed_exit1.txt", False, 1, 1, None, "last exit code 1"),
        ("print_spawn_scheduled_exit1.txt", False, 1, 2, None, "spawn scheduled"),
        ("print_running.txt", True, None, 2, 35711, "Terminated: 15"),
    ],
)
def test_state_from_captured_print(
    installed_mac, mac: MacSystem, fixture: str, running: bool, last_result, runs, pid, detail_word
) -> None:
    backend, manifest = installed_mac
    mac.respond(["launchctl", "print", backend.target(manifest)], res(0, fixture_text("launchd", fixture)))
    st = scheduler_state(backend, manifest)
    assert st["registered"] is True and st["active"] is True
    assert st["running"] is running
    assert st["last_result"] == last_result
    assert st["runs"] == runs
    assert st["pid"] == pid
    assert detail_word in st["detail"]
    assert st["next_run_iso"] is None
    # the captured jobs were loaded from other plists: reported as drift
    assert any("loaded" in d and "from /Users/" in d for d in st["drift"])


def test_state_not_loaded(installed_mac, mac: MacSystem) -> None:
    backend, manifest = installed_mac
    mac.loaded.clear()  # e.g. `launchctl bootout` by hand
    st = scheduler_state(backend, manifest)
    assert st["registered"] is False and st["active"] is False
    assert st["drift"] == [f"{backend.label(manifest)} is not loaded in gui/{UID}"]


def test_state_clean_and_exit_code_forms(installed_mac, mac: MacSystem) -> None:
    backend, manifest = installed_mac
    plist = Path(backend.plist_path(manifest))
    job = plistlib.loads(plist.read_bytes())
    target = backend.target(manifest)
    for line, expected in (
        ("\tlast exit code = (never exited)\n", None),
        ("\tlast exit code = 78: EX_CONFIG\n", 78),
        ("\truns = 3\n\tlast exit code = 0\n", 0),
        ("", None),
    ):
        mac.respond(["launchctl", "print", target], res(0, own_print(job, plist, tail=line)))
        st = scheduler_state(backend, manifest)
        assert st["drift"] == [], st
        assert st["last_result"] == expected
        assert st["running"] is False  # nested `state = active` is ignored


def test_state_drift_for_edited_and_missing_plist(installed_mac, mac: MacSystem, cli) -> None:
    backend, manifest = installed_mac
    plist = Path(backend.plist_path(manifest))
    job = plistlib.loads(plist.read_bytes())
    mac.respond(["launchctl", "print", backend.target(manifest)], res(0, own_print(job, plist)))
    job["StartInterval"] = 60
    plist.write_bytes(plistlib.dumps(job))
    assert scheduler_state(backend, manifest)["drift"] == [f"{plist} was edited (it differs from what install writes)"]
    plist.write_text("not a plist")
    assert scheduler_state(backend, manifest)["drift"] == [f"{plist} is not a valid plist"]
    plist.unlink()
    assert scheduler_state(backend, manifest)["drift"] == [f"{plist} is missing"]
    s = cli("status", sys_=mac)
    assert "DRIFT" in s.out and "is missing" in s.out


def test_status_in_non_gui_context_reports_error_not_not_loaded(installed_mac, mac: MacSystem, cli) -> None:
    mac.environ["SUDO_USER"] = "alice"
    mac.commands.clear()
    r = cli("--json", "status", sys_=mac)
    assert r.code == 0
    assert r.data["scheduler"]["error"]["code"] == "no_gui_session"
    assert mac.commands == []


def test_parse_launchctl_print_only_reads_top_level() -> None:
    info = ls.parse_launchctl_print(fixture_text("launchd", "print_idle_ran.txt"))
    assert info["state"] == "not running"
    assert info["active count"] == "0"
    assert info["runs"] == "6"
    assert info["domain"] == "gui/501 [100003]"
    assert "keepalive" not in info and "Minute" not in info
    running = ls.parse_launchctl_print(fixture_text("launchd", "print_running.txt"))
    assert running["pid"] == "35711" and "last exit code" not in running
    assert ls.launchd_exit_code("78: EX_CONFIG") == 78
    assert ls.launchd_exit_code("(never exited)") is None
    assert ls.launchd_exit_code(None) is None


def test_doctor_on_mac_reports_gui_and_keychain(installed_mac, mac: MacSystem, cli) -> None:
    r = cli("--json", "doctor", sys_=mac)
    checks = {c["name"]: c for c in r.data["checks"]}
    assert checks["gui session"]["status"] == "ok"
    assert checks["keychain"]["status"] == "warn"  # the test's in-memory keyring is not the macOS Keychain
    assert checks["crash log"]["status"] == "ok"
    assert checks["scheduler entry"]["status"] == "fail"  # not loaded (print answers 113)


# -- the crash log launchd keeps open ------------------------------------------------------


def test_trim_crash_log_in_place(tmp_path: Path) -> None:
    path = tmp_path / "scheduler-output.log"
    path.write_bytes(b"".join(f"line {i:06d}\n".encode() for i in range(20000)))  # 240 000 bytes
    inode = path.stat().st_ino
    writer = os.open(path, os.O_WRONLY | os.O_APPEND)  # what launchd holds
    try:
        assert ls.trim_crash_log(str(path), max_bytes=100_000, keep_bytes=1000)
        os.write(writer, b"after trim\n")
    finally:
        os.close(writer)
    data = path.read_bytes()
    assert path.stat().st_ino == inode
    assert len(data) < 1100
    lines = data.splitlines()
    assert lines[0] == b"[older output trimmed by lore-service]"
    assert lines[1].startswith(b"line ") and len(lines[1]) == 11  # starts on a whole line
    assert lines[-2] == b"line 019999" and lines[-1] == b"after trim"
    assert not ls.trim_crash_log(str(path), max_bytes=100_000)
    assert not ls.trim_crash_log(str(tmp_path / "missing.log"))


def test_before_run_hook_trims(installed_mac, mac: MacSystem) -> None:
    backend, manifest = installed_mac
    crash_log = Path(backend.paths.crash_log(manifest.service_id))
    crash_log.parent.mkdir(parents=True, exist_ok=True)
    crash_log.write_bytes(b"x\n" * (ls.CRASH_LOG_MAX_BYTES // 2 + 10))
    backend.before_run(manifest)
    assert crash_log.stat().st_size <= ls.CRASH_LOG_KEEP_BYTES + 64
    ls.NoneBackend(mac, backend.paths).before_run(manifest)  # the base hook is a no-op


# -- real launchctl (macOS only) -----------------------------------------------------------

on_macos = pytest.mark.skipif(sys.platform != "darwin", reason="needs macOS and launchctl")


@pytest.mark.macos
@on_macos
def test_real_launchctl_install_status_uninstall(tool, environ: dict[str, str], lore_bin: Path) -> None:
    # the token is embedded so that the test needs no keychain prompt on a CI runner
    env = dict(environ)
    r = tool(
        "--json", "install", "--backend", "launchd", "--token-source", "embedded", "--lore", str(lore_bin), env=env
    )
    assert r.code == 0, r.err + r.out
    sid = r.data["service_id"]
    label = f"com.gitlore.sync.{sid}"
    try:
        assert shutil.which("launchctl")
        s = tool("--json", "status", env=env)
        assert s.data["scheduler"]["registered"] is True, s.out
        assert s.data["scheduler"]["drift"] == [], s.out
        # computed from the calendar launchd loaded: within one 30m step
        assert s.data["scheduler"]["catch_up"] is None and s.data["scheduler"]["next_run_iso"], s.out
    finally:
        u = tool("--json", "uninstall", "--purge", env=env)
    assert u.code == 0, u.err + u.out
    import subprocess

    gone = subprocess.run(["launchctl", "print", f"gui/{os.getuid()}/{label}"], capture_output=True, text=True)
    assert gone.returncode == 113


def launchd_runs_it(tool: Any, env: dict[str, str], sid: str) -> dict[str, Any]:
    """Have launchd itself start the job (kickstart) and wait for the run it records."""
    import subprocess
    import time as clock

    label = f"com.gitlore.sync.{sid}"
    subprocess.run(["launchctl", "kickstart", f"gui/{os.getuid()}/{label}"], check=True)
    deadline = clock.monotonic() + 120
    while clock.monotonic() < deadline:
        clock.sleep(2)
        last = tool("--json", "status", env=env).data.get("last_run")
        if last is not None:
            return last
    raise AssertionError("launchd never ran the job")


@pytest.mark.macos
@on_macos
def test_real_launchd_runs_a_lore_that_needs_its_own_folder_on_path(tool, environ, project, tmp_path: Path) -> None:
    """A `#!/usr/bin/env python3` lore that runs a sibling program by name: it
    only works from a scheduled run if the plist's PATH has lore's folder (launchd
    gives jobs /usr/bin:/bin:/usr/sbin:/sbin). The run is started by launchd
    itself (kickstart), and its record must say every stage ran with the token."""

    shims = tmp_path / "lore-bin"
    shims.mkdir()
    helper = shims / "lore-helper"
    helper.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{FAKE_LORE}' \"$@\"\n")
    lore = shims / "lore"
    shim = '#!/usr/bin/env python3\nimport os, sys\nos.execvp("lore-helper", ["lore-helper", *sys.argv[1:]])\n'
    lore.write_text(shim)
    for path in (helper, lore):
        path.chmod(0o755)
    env = dict(environ)
    argv = ["--json", "install", "--backend", "launchd", "--token-source", "embedded", "--lore", str(lore)]
    r = tool(*argv, env=env)
    assert r.code == 0, r.err + r.out
    try:
        last = launchd_runs_it(tool, env, r.data["service_id"])
        assert last["trigger"] == "scheduled" and last["outcome"] == "success", last
    finally:
        assert tool("--json", "uninstall", "--purge", env=env).code == 0


@pytest.mark.macos
@on_macos
def test_real_launchd_run_reads_the_token_from_the_keychain_as_the_agent(tool, environ, lore_bin: Path) -> None:
    """The agent itself reads the Keychain item install stored (no prompt
    answers it): the run started by launchd records every stage with its token."""

    env = dict(environ)
    argv = ["--json", "install", "--backend", "launchd", "--token-source", "keychain", "--lore", str(lore_bin)]
    r = tool(*argv, env=env)
    assert r.code == 0, r.err + r.out
    try:
        assert tool("--json", "token", env=env).code == 0
        last = launchd_runs_it(tool, env, r.data["service_id"])
        assert last["outcome"] == "success" and last["error_class"] is None, last
    finally:
        assert tool("--json", "uninstall", "--purge", env=env).code == 0


def test_reinstall_waits_for_launchd_to_let_go_of_the_label(cli, mac: MacSystem) -> None:
    """bootout returns before launchd releases the label; a bootstrap right
    after it fails with 5 for a few seconds (a known launchctl race)."""
    assert install(cli, "launchd", system=mac).code == 0
    target = next(iter(mac.loaded))
    mac.bootout_lag = 3
    mac.commands.clear()
    r = install(cli, "launchd", "--interval", "2h", system=mac)
    assert r.code == 0, r.out
    sequence = [c[1] for c in mac.commands if c[1] != "print" or c[2] == target]
    assert sequence == ["print-disabled", "print", "bootout", "print", "print", "print", "print", "enable", "bootstrap"]
    assert mac.loaded == {target: -1}


def test_bootout_in_progress_and_a_busy_bootstrap_are_waited_out(cli, mac: MacSystem) -> None:
    assert install(cli, "launchd", system=mac).code == 0
    target = next(iter(mac.loaded))
    mac.respond(["launchctl", "bootout"], lambda argv, _i: (mac.loaded.update({target: 1}), res(36, "", "36"))[1])
    answers = [res(37, "", "Bootstrap failed: 37: Operation already in progress"), res(5, "", "5"), None]

    def bootstrap(argv, _input):
        answer = answers.pop(0)
        return answer if answer is not None else mac._bootstrap(argv, _input)

    mac.respond(["launchctl", "bootstrap"], bootstrap)
    r = install(cli, "launchd", "--interval", "2h", system=mac)
    assert r.code == 0, r.out
    assert [c[1] for c in mac.commands].count("bootstrap") == 3 + 1  # first install, then two refusals and a success


def test_a_label_launchd_never_releases_is_exit_6_and_the_old_plist_stays_private(
    cli, mac: MacSystem, memory_keyring: MemoryKeyring
) -> None:
    assert install(cli, "launchd", "--token-source", "embedded", system=mac).code == 0
    plist = next(Path(mac.environ["HOME"]).rglob("*.plist"))
    before = plist.read_bytes()
    mac.bootout_lag = 10_000  # a run that does not end
    r = install(cli, "launchd", "--token-source", "keychain", system=mac)
    assert r.code == ls.EXIT_SCHEDULER and "after bootout" in r.doc["error"]["message"]
    assert plist.read_bytes() == before and TOKEN.encode() in before
    assert plist.stat().st_mode & 0o777 == 0o600  # the token's plist is not left readable by others


def test_a_reinstall_preview_over_ssh_never_reads_the_keychain(cli, mac: MacSystem, memory_keyring: MemoryKeyring):
    assert install(cli, "launchd", "--token-source", "keychain", system=mac).code == 0
    reads: list[str] = []
    real_get = memory_keyring.get_password
    memory_keyring.get_password = lambda service, user: reads.append(user) or real_get(service, user)  # type: ignore[method-assign]
    mac.environ.pop("GITLAB_TOKEN")
    mac.environ["SSH_CONNECTION"] = "10.0.0.2 50000 10.0.0.1 22"
    mac.console_uid = 0
    r = install(cli, "launchd", "--dry-run", system=mac)
    assert r.code == 0 and any("SSH session" in m for m in r.data["missing"])
    assert reads == []


def test_a_locked_keychain_is_exit_6_with_the_macos_fix(
    cli, mac: MacSystem, memory_keyring: MemoryKeyring, monkeypatch
):
    import keyring.errors

    def locked(*_args):
        raise keyring.errors.KeyringLocked("User interaction is not allowed.")

    monkeypatch.setattr(memory_keyring, "set_password", locked)
    r = install(cli, "launchd", "--token-source", "keychain", system=mac)
    assert r.code == 6 and r.doc["error"]["code"] == "secret_store"
    assert "security unlock-keychain" in r.doc["error"]["hint"] and "env-file" not in r.doc["error"]["hint"]


# -- macOS as its users meet it: Login Items, privacy folders, PATH --------------------------------


@pytest.mark.parametrize("name", ["print_disabled_macos14.txt", "print_disabled_macos13.txt"])
def test_print_disabled_is_read_in_both_formats(name: str) -> None:
    states = ls.parse_print_disabled(fixture_text("launchd", name))
    assert states["com.gitlore.sync.my-project-1234abcd"] is True
    assert states["com.gitlore.sync.other-0000aaaa"] is False
    assert "lore-service" not in states  # the login item associations block is not the disabled list


def test_an_item_switched_off_in_login_items_is_reported_and_not_re_enabled_without_force(cli, mac: MacSystem) -> None:
    assert install(cli, "launchd", system=mac).code == 0
    sid = ls.Paths(mac).installed_ids()[0]
    label = f"com.gitlore.sync.{sid}"
    mac.switched_off.add(label)  # the user turned it off under System Settings › General › Login Items
    status = cli("--json", "status", sys_=mac).data["scheduler"]
    assert status["active"] is False and status["login_item_disabled"] is True
    assert any("Login Items" in d for d in status["drift"])
    mac.commands.clear()
    r = install(cli, "launchd", "--interval", "2h", system=mac)
    assert r.code == ls.EXIT_SCHEDULER and r.doc["error"]["code"] == "login_item_disabled"
    assert "Login Items" in r.doc["error"]["message"] and "--force" in r.doc["error"]["hint"]
    assert ["launchctl", "enable", f"gui/{UID}/{label}"] not in mac.commands  # the user's choice stands
    assert label in mac.switched_off
    r = install(cli, "launchd", "--interval", "2h", "--force", system=mac)
    assert r.code == 0, r.out
    assert label not in mac.switched_off and f"gui/{UID}/{label}" in mac.loaded


def test_the_bootstrap_error_5_hint_names_login_items(cli, mac: MacSystem) -> None:
    mac.respond(["launchctl", "bootstrap"], res(5, "", fixture_text("launchd", "bootstrap_failed_5.stderr.txt")))
    r = install(cli, "launchd", system=mac)
    assert r.code == ls.EXIT_SCHEDULER and "Login Items" in r.doc["error"]["hint"]


def test_a_project_in_a_privacy_protected_folder_warns_at_install_and_fails_doctor(
    cli, mac: MacSystem, monkeypatch
) -> None:
    documents = Path(mac.environ["HOME"]) / "Documents" / "acme"
    documents.mkdir(parents=True)
    monkeypatch.chdir(documents)
    r = install(cli, "launchd", system=mac)
    assert r.code == 0, r.out
    warning = next(w for w in r.data["warnings"] if "Documents" in w)
    assert "Full Disk Access" in warning and str(documents) in warning
    doctor = cli("--json", "doctor", sys_=mac)
    privacy = [c for c in doctor.data["checks"] if c["name"] == "privacy"]
    assert privacy and privacy[0]["status"] == "fail" and "Full Disk Access" in privacy[0]["hint"]


def test_a_project_the_run_may_not_enter_is_recorded_with_the_privacy_fix(cli, mac: MacSystem, project: Path) -> None:
    import errno

    class Protected(MacSystem):
        def spawn(self, argv, *, cwd, env):  # type: ignore[override]
            raise PermissionError(errno.EPERM, "Operation not permitted")

        def can_list(self, folder: str) -> bool:
            return folder != str(project)  # as TCC answers a launchd agent

    protected = Protected(mac.environ)
    assert install(cli, "launchd", system=protected).code == 0
    r = cli("--json", "trigger", sys_=protected)
    assert r.code == ls.EXIT_FAILED
    message = r.data["run"]["stage_results"][0]["message"]
    assert f"cannot enter the project folder {project}" in message and "Full Disk Access" in message


def test_doctor_shows_the_path_a_scheduled_run_gets(cli, mac: MacSystem, lore_bin: Path) -> None:
    assert install(cli, "launchd", system=mac).code == 0
    checks = {c["name"]: c for c in cli("--json", "doctor", sys_=mac).data["checks"]}
    assert checks["scheduled PATH"]["status"] == "ok"
    assert f"PATH={lore_bin.parent}:/opt/homebrew/bin:" in checks["scheduled PATH"]["message"]


# -- the Keychain trusts the program the agent runs ---------------------------------------------


def test_token_command_reads_and_stores_as_a_scheduled_run_would(cli, mac: MacSystem, memory_keyring) -> None:
    assert install(cli, "launchd", system=mac).code == 0
    r = cli("--json", "token", sys_=mac)
    assert r.code == 0 and r.data["found"] is True and TOKEN not in r.out
    mac.stdin_text = "glpat-rotated-token-value-77\n"
    r = cli("--json", "token", "--store", sys_=mac)
    assert r.code == 0 and r.data["stored"] is True and "glpat-rotated" not in r.out
    sid = ls.Paths(mac).installed_ids()[0]
    assert memory_keyring.store[(ls.KEYRING_SERVICE, sid)] == "glpat-rotated-token-value-77"
    memory_keyring.store.clear()
    r = cli("--json", "token", sys_=mac)
    assert r.code == 1 and r.doc["error"]["code"] == "no_token" and r.data["found"] is False


def test_a_frozen_install_stores_the_token_again_from_the_pinned_copy(mac: MacSystem, tmp_path: Path) -> None:
    pinned = str(tmp_path / "data" / "bin" / "0.1.0" / "lore-service")
    manifest = ls.Manifest(
        service_id="acme-1", project_root=str(tmp_path), backend="launchd", backend_reason="t",
        interval_seconds=1800, schedule_step_seconds=1800, profile="balanced", token_source="keychain",
        token_env="GITLAB_TOKEN", program=[pinned, "--home", str(tmp_path), "run", "--service-id", "acme-1"],
        lore_path=None, home=str(tmp_path), created_at_iso="", updated_at_iso="",
    )  # fmt: skip
    bundle = ls.Bundle("onedir", "/Users/me/Downloads/lore-service/lore-service", "/x")
    seen: list[tuple[list[str], str | None]] = []
    mac.respond([pinned], lambda argv, given: (seen.append((argv, given)), ls.CommandResult(argv, 0, "", ""))[1])
    assert ls.regrant_keychain(mac, manifest, bundle, TOKEN) is None
    argv, given = seen[0]
    assert argv == [pinned, "--home", str(tmp_path), "--json", "token", "--store", "--service-id", "acme-1"]
    assert given == TOKEN + "\n" and TOKEN not in " ".join(argv)  # on stdin, never in the argv
    mac.respond([pinned], ls.CommandResult([], 1, "", "security: SecKeychainItemCreateFromContent: locked"))
    warning = ls.regrant_keychain(mac, manifest, bundle, TOKEN)
    assert warning and "locked" in warning and "Terminal" in warning
    source = ls.Bundle("source", "/x/lore_service.py", "/usr/bin/python3")
    assert ls.regrant_keychain(mac, manifest, source, TOKEN) is None and len(seen) == 1  # the same program stored it


def test_doctor_asks_the_scheduled_program_to_read_the_token(cli, mac: MacSystem, memory_keyring) -> None:
    assert install(cli, "launchd", system=mac).code == 0
    program = ls.load_manifest(ls.Paths(mac), ls.Paths(mac).installed_ids()[0]).program[0]
    error = {"code": "secret_store", "message": "did not answer", "hint": "unlock"}
    mac.respond([program], res(1, json.dumps({"ok": False, "command": "token", "error": error})))
    check = {c["name"]: c for c in cli("--json", "doctor", sys_=mac).data["checks"]}["token (as scheduled)"]
    assert check["status"] == "fail" and "did not answer" in check["message"] and check["hint"] == "unlock"
    mac.respond([program], res(0, json.dumps({"ok": True, "command": "token", "data": {"found": True}})))
    checks = {c["name"]: c for c in cli("--json", "doctor", sys_=mac).data["checks"]}
    assert checks["token (as scheduled)"]["status"] == "ok"


# -- catch-up after sleep: calendar firings, a step of at most an hour, next run ------------

# interval -> the step launchd fires on (the largest that divides both the interval and an hour)
CALENDAR_STEPS = [("5m", 300), ("45m", 900), ("90m", 1800), ("7h", 3600), ("24h", 3600)]


@pytest.fixture
def local_zone() -> Iterator[Callable[[str], None]]:
    """Set the process's time zone (POSIX TZ strings: no tzdata needed); restored after."""
    before = os.environ.get("TZ")

    def use(zone: str) -> None:
        os.environ["TZ"] = zone
        time.tzset()

    yield use
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.mark.parametrize(("interval", "step"), CALENDAR_STEPS)
def test_the_plist_fires_on_calendar_entries_of_at_most_an_hour_and_stays_valid(
    cli, mac: MacSystem, interval: str, step: int
) -> None:
    r = install(cli, "launchd", "--dry-run", "--interval", interval, system=mac)
    assert r.code == 0, r.err + r.out
    sid, seconds = r.data["service_id"], ls.parse_interval(interval)
    job = validate_plist(plist_file(r.data)["content"])  # Apple's DTD, for every interval
    assert "StartInterval" not in job  # its firings are lost while the Mac sleeps
    assert r.data["schedule_step_seconds"] == step and seconds % step == 0
    minutes = [entry["Minute"] for entry in job["StartCalendarInterval"]]
    assert all(list(entry) == ["Minute"] for entry in job["StartCalendarInterval"])  # every hour at :m
    every = step // 60
    assert len(minutes) == 60 // every and minutes == list(range(minutes[0], 60, every)) and minutes[0] < every
    # the same minutes cron would fire at, so services are spread over the hour alike
    assert minutes[0] == ls.launchd_calendar(sid, step)[0]["Minute"] == ls._cron_seed(sid) % every


@pytest.mark.parametrize(("interval", "step"), CALENDAR_STEPS)
def test_firings_are_evenly_spaced_and_one_falls_an_interval_after_each(interval: str, step: int, local_zone) -> None:
    local_zone("UTC0")
    seconds = ls.parse_interval(interval)
    entries = ls.launchd_calendar("proj-1234abcd", ls.launchd_step(seconds))
    t, fires = 1_800_000_000_000, []
    for _ in range(3 * 3600 // step + 2):  # past at least one hour and day boundary for hourly steps
        nxt = ls.launchd_next_ms(entries, t)
        assert nxt is not None and nxt > t
        fires.append(nxt)
        t = nxt
    assert {b - a for a, b in zip(fires, fires[1:], strict=False)} == {step * 1000}
    assert ls.launchd_next_ms(entries, fires[0] + seconds * 1000 - 1) == fires[0] + seconds * 1000


def test_next_firing_rolls_over_the_hour_and_the_day(local_zone) -> None:
    local_zone("UTC0")
    day = 1_800_057_600_000  # 2027-01-16 00:00 UTC
    assert time.gmtime(day / 1000)[3:6] == (0, 0, 0)
    hourly = [{"Minute": 23}]
    minute = 60_000
    assert ls.launchd_next_ms(hourly, day + 22 * minute) == day + 23 * minute
    assert ls.launchd_next_ms(hourly, day + 23 * minute) == day + 3600_000 + 23 * minute  # strictly after
    late = day + 23 * 3600_000 + 40 * minute  # 23:40: the next :23 is tomorrow 00:23
    assert ls.launchd_next_ms(hourly, late) == day + 86400_000 + 23 * minute
    quarter = ls.launchd_calendar("x", 900)
    offset = quarter[0]["Minute"]
    last_quarter = day + 23 * 3600_000 + (offset + 45) * minute
    assert ls.launchd_next_ms(quarter, last_quarter) == day + 86400_000 + offset * minute
    # Hour is read too (a missing key is every value, as launchd reads it); other keys are not guessed
    assert ls.launchd_next_ms({"Hour": 3, "Minute": 5}, late) == day + 86400_000 + 3 * 3600_000 + 5 * minute
    assert ls.launchd_next_ms([{"Weekday": 1, "Minute": 0}], day) is None
    assert ls.launchd_next_ms([{"Minute": 60}], day) is None
    assert ls.launchd_next_ms([], day) is None


def test_calendar_minutes_are_local_time(local_zone) -> None:
    local_zone("IST-5:30")  # half an hour off UTC: local :23 is :53 UTC
    nxt = ls.launchd_next_ms([{"Minute": 23}], 1_800_057_600_000)
    assert nxt is not None
    assert time.localtime(nxt / 1000).tm_min == 23 and time.gmtime(nxt / 1000).tm_min == 53


def test_status_shows_the_next_firing_and_while_not_due_the_first_one_after_due(
    cli, mac: MacSystem, local_zone
) -> None:
    local_zone("UTC0")
    assert install(cli, "launchd", "--interval", "24h", system=mac).code == 0
    backend, manifest = backend_and_manifest(mac, ls.LaunchdBackend)
    assert (manifest.interval_seconds, manifest.schedule_step_seconds) == (86400, 3600)
    plist = Path(backend.plist_path(manifest))
    job = plistlib.loads(plist.read_bytes())
    minute = job["StartCalendarInterval"][0]["Minute"]
    mac.respond(["launchctl", "print", backend.target(manifest)], res(0, own_print(job, plist)))
    day = 1_800_057_600_000  # 00:00 UTC
    mac.clock_ms = day + 23 * 3600_000 + 59 * 60_000  # 23:59, no run yet: the next hourly firing, tomorrow
    st = scheduler_state(backend, manifest)
    assert st["drift"] == [] and st["catch_up"] is None
    assert st["next_run_iso"] == ls.iso_from_ms(day + 86400_000 + minute * 60_000)
    assert f"every hour at :{minute:02d}" in st["detail"] and "skips until the interval" in st["detail"]
    # ran at 22:00: not due until 21:59 tomorrow, and the firings before that are skipped
    due = ls.next_due_ms(manifest, day + 22 * 3600_000)
    assert due == day + 86400_000 + 21 * 3600_000 + 59 * 60_000
    ls.update_status(backend.paths, manifest.service_id, mac, lambda s: setattr(s, "next_due_at_ms", due))
    first = day + 86400_000 + 21 * 3600_000 + minute * 60_000
    first += 3600_000 if first < due else 0  # :59 is the only minute at 21h that is due
    assert scheduler_state(backend, manifest)["next_run_iso"] == ls.iso_from_ms(first)
    assert cli("--json", "status", sys_=mac).data["stale_after_seconds"] == 73 * 3600  # 3 x 24h + the 1h step
    text = cli("status", sys_=mac).out
    assert f"next run    {ls.local_time(first)}" in text
    assert "catch-up" not in text  # calendar firings missed in sleep run at wake: nothing to say


def test_a_24h_service_fires_hourly_and_runs_once_a_day(cli, mac: MacSystem, home: Path) -> None:
    assert install(cli, "launchd", "--interval", "24h", system=mac).code == 0
    mac.clock_ms = 1_800_057_600_000
    assert cli("--json", "run", sys_=mac).data["skipped"] is False
    for _ in range(23):  # the hourly firings of the next 23 hours, e.g. at wake after a night asleep
        mac.clock_ms += 3600_000
        r = cli("--json", "run", sys_=mac)
        assert r.code == 0 and r.data["skipped"] and "not due" in r.data["skip_reason"]
    mac.clock_ms += 3600_000
    assert cli("--json", "run", sys_=mac).data["skipped"] is False


def test_a_startinterval_plist_is_drift_that_a_reinstall_upgrades(mac: MacSystem, cli) -> None:
    from test_schemas import validate

    assert install(cli, "launchd", "--interval", "24h", system=mac).code == 0
    backend, manifest = backend_and_manifest(mac, ls.LaunchdBackend)
    sid, target = manifest.service_id, backend.target(manifest)
    plist = Path(backend.plist_path(manifest))
    # what lore-service wrote before calendar firings: StartInterval, and the interval as the step
    job = plistlib.loads(plist.read_bytes())
    del job["StartCalendarInterval"]
    job["StartInterval"] = 86400
    plist.write_bytes(plistlib.dumps(job))
    manifest_path = Path(backend.paths.manifest(sid))
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "schedule_step_seconds": 86400}))
    mac.respond(["launchctl", "print", target], res(0, own_print(job, plist)))

    r = cli("--json", "status", sys_=mac)  # still read
    assert r.code == 0, r.out
    validate(r.data, "status-output.schema.json")
    st = r.data["scheduler"]
    assert st["registered"] is True and st["next_run_iso"] is None and "86400 s (StartInterval)" in st["detail"]
    assert st["drift"] == [f"{plist} fires on StartInterval, which drops runs while the Mac sleeps (an older install)"]
    assert st["catch_up"].startswith("none: this plist still fires on StartInterval")
    text = cli("status", sys_=mac).out
    assert "  catch-up    none: this plist still fires on StartInterval" in text
    assert "DRIFT" in text and "fix: `lore-service install` rewrites the entry" in text
    doctor = cli("--json", "doctor", sys_=mac)
    assert any(c["name"] == "scheduler entry" and "StartInterval" in c["message"] for c in doctor.data["checks"])

    mac.responses.pop(0)  # launchctl print answers from the modelled launchd again
    mac.commands.clear()
    r = install(cli, "launchd", system=mac)  # the same options: still an upgrade
    assert r.code == 0, r.err + r.out
    assert r.data["changed"] is True
    assert ["launchctl", "bootout", target] in mac.commands
    assert mac.commands[-1] == ["launchctl", "bootstrap", f"gui/{UID}", str(plist)]
    upgraded = plistlib.loads(plist.read_bytes())
    assert "StartInterval" not in upgraded and upgraded["StartCalendarInterval"] == ls.launchd_calendar(sid, 3600)
    manifest = ls.load_manifest(backend.paths, sid)
    assert manifest is not None and manifest.schedule_step_seconds == 3600  # `run` now skips until due
    mac.respond(["launchctl", "print", target], res(0, own_print(upgraded, plist)))
    st = scheduler_state(backend, manifest)
    assert st["drift"] == [] and st["catch_up"] is None and st["next_run_iso"] is not None


@pytest.mark.macos
@on_macos
def test_real_status_all_says_for_each_job_what_its_own_status_says(tool, environ, lore_bin: Path, tmp_path: Path):
    """status --all reads every job from `print-disabled` and the GUI domain's
    own `print` (issue 12.6): the real outputs give each service what `status`
    of that one service gives, but the run count and the plist it was loaded
    from, which only the job's own print shows (spec §21)."""
    env = dict(environ)
    argv = ["--backend", "launchd", "--token-source", "embedded", "--lore", str(lore_bin)]
    for batched, own in status_all_beside_each(tool, argv, env, tmp_path):
        assert batched["runs"] is None and own["registered"] is True and own["drift"] == [], own
        assert {**batched, "runs": own["runs"], "detail": own["detail"]} == own, (batched, own)
