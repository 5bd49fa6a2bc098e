"""Alerts (section 4b): events sent once per transition to a webhook and the
desktop, Healthchecks pings per run. Against real HTTP servers on 127.0.0.1
(one that answers, one that returns 500, one that never answers, a refused
port) and, on Linux, a real private D-Bus session bus with a Notifications
service of the test harness; macOS and Windows by their command lines."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    TOKEN,
    FakeSystem,
    MacSystem,
    WinSystem,
    edit_config,
    install,
    log_text,
    status_file,
    wait_until,
    write_plan,
)
from test_schemas import validate

import lore_service as ls

HARNESS = Path(__file__).resolve().parent / "harness"
SECRET_PATH = "/ping/0f1e2d3c-secret-uuid"


class Endpoint:
    """A real HTTP server on 127.0.0.1 that records every request, and answers
    as `behaviour` says: "ok" (200), "error" (500) or "hang" (reads the
    request, then answers nothing until the test ends)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                endpoint.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if endpoint.behaviour == "hang":
                    endpoint.release.wait(60)
                    return
                self.send_response(200 if endpoint.behaviour == "ok" else 500)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.requests if r["path"] == SECRET_PATH]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[Any]:
    made: list[Endpoint] = []

    def make(behaviour: str = "ok") -> Endpoint:
        made.append(Endpoint(behaviour))
        return made[-1]

    yield make
    for server in made:
        server.close()


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was just free)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def set_notify(home: Path, sid: str, **notify: Any) -> None:
    edit_config(home, sid, lambda doc: doc.__setitem__("notify", notify))


# -- configuration ---------------------------------------------------------------------


def test_install_writes_the_notify_table_and_shows_its_urls_only_as_scheme_and_host(cli, lore_bin, home):
    hook, ping = "https://hooks.example.com/services/T0/B0/key-123", "https://hc-ping.com/0f1e2d3c-uuid"
    result = install(cli, "fake", "--no-notify-desktop", "--notify-webhook", hook, "--healthchecks-url", ping)
    assert result.code == 0, result.err
    assert result.data["notify"] == {
        "desktop": False,
        "webhook": "https://hooks.example.com",
        "healthchecks_url": "https://hc-ping.com",
    }
    assert "key-123" not in result.out and "0f1e2d3c" not in result.out
    sid = result.data["service_id"]
    cfg = ls.load_config(ls.Paths(ls.System({"LORE_SERVICE_HOME": str(home), "HOME": str(home)})), sid)
    assert (cfg.notify.desktop, cfg.notify.webhook, cfg.notify.healthchecks_url) == (False, hook, ping)
    dry = cli("--json", "install", "--backend", "fake", "--dry-run")
    toml = next(f["content"] for f in dry.data["files"] if f["path"].endswith("service.toml"))
    assert 'webhook = "https://hooks.example.com/(secret)"' in toml and "key-123" not in dry.out
    text = cli("install", "--backend", "fake", "--notify-webhook", "")  # "" removes the webhook
    assert text.code == 0 and "alerts    no desktop; healthchecks https://hc-ping.com" in text.out
    notify = tomllib.loads((home / "config" / sid / "service.toml").read_text())["notify"]
    assert notify == {"desktop": False, "healthchecks_url": ping}


@pytest.mark.parametrize(
    "url",
    ["ftp://files.example.com/secret-part", "https:///secret-part", "no-url-secret-part", "https://h.example/a\nb"],
    ids=["ftp", "no-host", "no-scheme", "newline"],
)
def test_a_bad_notify_url_is_exit_2_bad_url_in_one_line_that_never_repeats_it(cli, lore_bin, url):
    result = cli("install", "--backend", "fake", "--notify-webhook", url)
    assert result.code == 2
    lines = result.err.splitlines()
    assert lines[0].startswith("error: --notify-webhook ") and lines[1].startswith("hint: ")
    assert len(lines) == 2 and "secret-part" not in result.err
    assert cli("--json", "install", "--backend", "fake", "--healthchecks-url", url).doc["error"]["code"] == "bad_url"


def test_a_bad_notify_table_in_service_toml_is_config_invalid(cli, installed, home):
    sid = installed["service_id"]
    set_notify(home, sid, webhook="gopher://example.com/secret-part")
    result = cli("--json", "run")
    assert result.code == 4 and result.doc["error"]["code"] == "config_invalid"
    assert "notify.webhook" in result.doc["error"]["message"] and "secret-part" not in result.out
    set_notify(home, sid, web_hook="https://example.com/")
    assert "unknown key notify.web_hook" in cli("--json", "run").doc["error"]["message"]


# -- events once per transition ------------------------------------------------------------


def test_failed_is_sent_once_across_three_failing_runs_then_recovered_once(cli, installed, project, home, endpoint):
    hook = endpoint("ok")
    sid = installed["service_id"]
    set_notify(home, sid, webhook=hook.url + SECRET_PATH)
    write_plan(project, {"issues": {"exit": 75, "print_token": True}})
    for _ in range(3):
        assert cli("--json", "trigger").code == 1
    assert [e["event"] for e in hook.events()] == ["failed"]
    write_plan(project, {})
    assert cli("--json", "trigger").code == 0
    assert cli("--json", "trigger").code == 0
    events = hook.events()
    assert [e["event"] for e in events] == ["failed", "recovered"]
    for event in events:
        validate(event, "event.schema.json")
    failed, recovered = events
    assert failed["service_id"] == sid and failed["project_root"] == str(project)
    assert failed["message"] == "sync failed: issues failed: exit status 75"
    assert failed["last_run"]["outcome"] == "failed" and failed["state"] == "backoff"
    assert [s["outcome"] for s in failed["last_run"]["stage_results"]] == ["failed", "success", "success"]
    assert recovered["state"] == "healthy" and recovered["last_run"]["outcome"] == "success"
    assert all(TOKEN not in r["body"].decode() for r in hook.requests)
    assert hook.requests[0]["headers"]["Content-Type"] == "application/json"
    st = status_file(home, sid)
    assert st["last_alert"] == "recovered" and st["last_alert_at_ms"] > 0
    validate(st, "status.schema.json")
    log = log_text(home, sid)
    assert f"[notify] failed event of {sid} to webhook {hook.url}" in log and SECRET_PATH not in log


def test_the_circuit_breaker_sends_paused_after_failed(cli, installed, project, home, endpoint):
    hook = endpoint("ok")
    sid = installed["service_id"]
    edit_config(
        home, sid, lambda d: d.update(circuit_breaker={"threshold": 2}, notify={"webhook": hook.url + SECRET_PATH})
    )
    write_plan(project, {"issues": {"exit": 75}})
    for _ in range(3):
        cli("--json", "trigger")
    events = hook.events()
    assert [e["event"] for e in events] == ["failed", "paused"]
    assert events[1]["paused"]["kind"] == "circuit_breaker" and events[1]["state"] == "paused"
    assert events[1]["message"].startswith("paused (circuit_breaker): 2 transient failures in a row")
    validate(events[1], "event.schema.json")


def test_a_permanent_error_sends_paused_alone_and_a_manual_pause_sends_nothing(cli, installed, project, home, endpoint):
    hook = endpoint("ok")
    sid = installed["service_id"]
    set_notify(home, sid, webhook=hook.url + SECRET_PATH)
    write_plan(project, {"issues": {"exit": 2}})  # a permanent exit code
    assert cli("--json", "run").code == 1
    assert [e["event"] for e in hook.events()] == ["paused"]
    assert cli("resume").code == 0
    write_plan(project, {})
    assert cli("--json", "run").code == 0
    assert cli("pause").code == 0 and cli("--json", "run").code == 0  # skipped: paused by a person
    assert [e["event"] for e in hook.events()] == ["paused", "recovered"]


def test_a_skipped_run_never_sends_failed(cli, installed, project, home, endpoint, system):
    """A run skipped by policy runs no stage: the last run that ran stages
    stays what it was, and nothing is sent, however often it is skipped."""
    hook = endpoint("ok")
    sid = installed["service_id"]
    set_notify(home, sid, webhook=hook.url + SECRET_PATH, healthchecks_url=hook.url + "/hc")
    assert cli("--json", "run").code == 0
    path = home / "state" / sid / "status.json"
    st = status_file(home, sid)
    st["next_retry_at_ms"] = system.now_ms() + 3_600_000  # backing off, as after a failure
    path.write_text(json.dumps(st))
    for _ in range(3):
        result = cli("--json", "run")
        assert result.code == 0 and result.data["skipped"] is True
    assert hook.events() == []
    assert [r["path"] for r in hook.requests] == ["/hc/start", "/hc"]  # the one run that ran stages
    assert status_file(home, sid)["last_alert"] is None


def test_a_run_skipped_by_a_condition_never_sends_failed_nor_pings(cli, installed, project, home, endpoint, tmp_path):
    """outcome skipped (the project folder is gone): no stage ran, so neither
    `failed` nor a Healthchecks ping; the failure sent before stays the last."""
    hook = endpoint("ok")
    sid = installed["service_id"]
    set_notify(home, sid, webhook=hook.url + SECRET_PATH, healthchecks_url=hook.url + "/hc")
    write_plan(project, {"issues": {"exit": 75}})
    assert cli("--json", "trigger").code == 1
    project.rename(tmp_path / "moved-away")
    assert cli("resume", "--name", sid).code == 0  # no backoff wait: each run is due, and skipped
    for _ in range(3):
        result = cli("--json", "run", "--name", sid)
        assert result.code == 0 and result.data["run"]["outcome"] == "skipped", result.out
    assert [e["event"] for e in hook.events()] == ["failed"]
    assert [r["path"] for r in hook.requests if r["path"].startswith("/hc")] == ["/hc/start", "/hc/fail"]
    st = status_file(home, sid)
    assert st["last_alert"] == "failed" and st["last_skip"]["condition"] == "project_missing"


def test_another_services_run_sends_its_stale_event_once(cli, installed, project, home, endpoint, system, tmp_path):
    hook = endpoint("ok")
    other_project = tmp_path / "other"
    other_project.mkdir()
    assert install(cli, "fake", "--project", str(other_project), "--name", "other").code == 0
    set_notify(home, "other", webhook=hook.url + SECRET_PATH)
    system.clock_ms = system.now_ms() + 3 * 3600 * 1000  # three hours without a run of `other`
    assert cli("--json", "trigger").code == 0  # the first service's run
    assert cli("--json", "trigger").code == 0
    events = hook.events()
    assert [(e["event"], e["service_id"]) for e in events] == [("stale", "other")]
    validate(events[0], "event.schema.json")
    assert events[0]["state"] == "stale" and events[0]["stale"] is True
    assert events[0]["message"] == "no successful sync since install (expected every 30m)"
    assert status_file(home, "other")["last_alert"] == "stale"
    assert f"[notify] stale event of other to webhook {hook.url}" in log_text(home, installed["service_id"])


@pytest.mark.parametrize("purge", [True, False])
def test_an_alert_claimed_after_its_service_was_uninstalled_writes_nothing_and_makes_no_folder(
    cli, installed, home, system, tmp_path, purge
):
    """A run claims its alerts after its run lock is released, so an uninstall
    can come between; what is left after it must stay as uninstall left it."""
    other_project = tmp_path / "other"
    other_project.mkdir()
    assert install(cli, "fake", "--project", str(other_project), "--name", "other").code == 0
    manifest = ls.load_manifest(ls.Paths(system), "other")
    assert cli("--json", "uninstall", "--name", "other", *(["--purge"] if purge else [])).code == 0
    state = home / "state" / "other"
    before = sorted(p.name for p in state.iterdir()) if state.exists() else None
    system.clock_ms = system.now_ms() + 3 * 3600 * 1000  # stale by now, were it installed
    assert ls.claim_alert(system, ls.Paths(system), manifest, ("stale",)) is None
    assert (sorted(p.name for p in state.iterdir()) if state.exists() else None) == before
    assert state.exists() is not purge
    assert [p.name for p in (home / "state").iterdir() if "removed" in p.name] == []  # set aside, then deleted
    if purge:  # a late writer's lock finds no folder, and makes none
        late = ls.FileLock(str(state / "status.lock"), make_folder=False)
        assert not late.try_acquire() and late.folder_gone and not state.exists()


# -- Healthchecks pings and endpoints that fail -----------------------------------------------


def test_healthchecks_gets_start_then_success_or_fail_with_the_runs_redacted_log(
    cli, installed, project, home, endpoint
):
    hc = endpoint("ok")
    sid = installed["service_id"]
    set_notify(home, sid, healthchecks_url=hc.url + SECRET_PATH)
    write_plan(project, {"issues": {"print_token": True}})
    assert cli("--json", "trigger").code == 0
    write_plan(project, {"issues": {"exit": 75}})
    assert cli("--json", "trigger").code == 1
    paths = [r["path"] for r in hc.requests]
    assert paths == [SECRET_PATH + "/start", SECRET_PATH, SECRET_PATH + "/start", SECRET_PATH + "/fail"]
    ok_body = hc.requests[1]["body"].decode()
    assert "[issues]" in ok_body and "[run]" in ok_body and ls.SECRET_PLACEHOLDER in ok_body
    assert TOKEN not in ok_body and len(hc.requests[1]["body"]) <= ls.PING_LOG_BYTES
    assert "[issues] end: failed (exit status 75)" in hc.requests[3]["body"].decode()
    assert SECRET_PATH not in log_text(home, sid)


def test_a_ping_body_holds_the_last_10_kib_of_a_long_run(cli, installed, project, home, endpoint):
    hc = endpoint("ok")
    set_notify(home, installed["service_id"], healthchecks_url=hc.url + SECRET_PATH)
    write_plan(project, {"issues": {"print_mb": 1}})
    assert cli("--json", "trigger").code == 0
    body = hc.requests[-1]["body"]
    assert ls.PING_LOG_BYTES - 200 < len(body) <= ls.PING_LOG_BYTES
    last = body.decode().splitlines()[-1]  # the newest lines: the run's own last line is there
    assert "[run] run " in last and " success in " in last


@pytest.mark.parametrize("kind", ["error", "refused"])
def test_a_failing_endpoint_is_logged_and_never_fails_the_run(cli, installed, project, home, endpoint, kind):
    base = endpoint("error").url if kind == "error" else refused_url()
    sid = installed["service_id"]
    set_notify(home, sid, webhook=base + SECRET_PATH, healthchecks_url=base + SECRET_PATH)
    assert cli("--json", "trigger").code == 0
    write_plan(project, {"issues": {"exit": 75}})
    result = cli("--json", "trigger")
    assert result.code == 1 and result.doc["error"]["code"] == "run_failed"  # as without alerts
    assert status_file(home, sid)["last_run"]["outcome"] == "failed"
    log = log_text(home, sid)
    why = "HTTP 500 Internal Server Error" if kind == "error" else "Connection refused"
    assert f"[notify] failed: webhook {base}: {why}" in log
    assert f"[notify] failed: healthchecks {base}: {why}" in log
    assert f"[notify] failed: healthchecks {base} (start): {why}" in log
    assert SECRET_PATH not in log


def test_an_endpoint_that_never_answers_delays_the_run_a_few_seconds_and_holds_no_lock(
    cli, installed, project, home, endpoint
):
    hung = endpoint("hang")
    sid = installed["service_id"]
    set_notify(home, sid, webhook=hung.url + SECRET_PATH, healthchecks_url=hung.url + SECRET_PATH)
    write_plan(project, {"issues": {"exit": 75}})
    began = time.monotonic()
    result = cli("--json", "trigger")
    took = time.monotonic() - began
    # the server answers none of them until the test ends: the run ended without an answer
    wait_until(lambda: len(hung.requests) >= 2, 10)
    assert not hung.release.is_set() and {r["path"] for r in hung.requests} >= {SECRET_PATH + "/start", SECRET_PATH}
    assert result.code == 1 and status_file(home, sid)["last_run"]["outcome"] == "failed"
    log = log_text(home, sid)
    assert f"[notify] failed: webhook {hung.url}: no answer within" in log
    assert f"[notify] failed: healthchecks {hung.url}" in log
    assert not ls.lock_is_held(str(home / "state" / sid / "run.lock"), ls.System())
    delay = took - result.doc["data"]["run"]["duration_ms"] / 1000
    print(f"\nendpoints that never answer delayed the run's exit by {delay:.2f} s")


# -- desktop -----------------------------------------------------------------------------


@pytest.fixture
def session_bus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A private D-Bus session bus with the harness's Notifications service:
    (its address, the file the service records Notify calls in)."""
    python = "/usr/bin/python3"
    probe = subprocess.run([python, "-c", "import dbus, gi"], capture_output=True) if os.path.exists(python) else None
    missing = [name for name in ("dbus-daemon", "gdbus") if shutil.which(name) is None]
    if missing or probe is None or probe.returncode != 0:
        reason = f"needs dbus-daemon, gdbus and python3-dbus/python3-gi (missing: {missing or 'python3-dbus'})"
        if os.environ.get("LORE_E2E_REQUIRED") == "1":
            pytest.fail(reason + "; ./run-tests installs them as root on Debian")
        pytest.skip(reason)
    socket_path = tmp_path / "bus"
    daemon = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", f"--address=unix:path={socket_path}", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    address = daemon.stdout.readline().strip() if daemon.stdout else ""
    record = tmp_path / "notifications.jsonl"
    service = subprocess.Popen(
        [python, str(HARNESS / "notifications.py"), str(record)],
        env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": address},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert service.stdout is not None and service.stdout.readline().strip() == "ready"
        yield address, record
    finally:
        for proc in (service, daemon):
            proc.terminate()
            proc.wait(10)


def test_a_failed_scheduled_run_shows_a_desktop_notification_on_the_session_bus(
    tool, environ, project, home, session_bus
):
    address, record = session_bus
    env = {**environ, "DBUS_SESSION_BUS_ADDRESS": address}
    installed = tool("--json", "install", "--backend", "none", env=env)
    assert installed.code == 0
    sid = installed.data["service_id"]
    write_plan(project, {"issues": {"exit": 75}})
    assert tool("--json", "run", env=env).code == 1
    path = home / "state" / sid / "status.json"
    st = status_file(home, sid)
    assert st["next_retry_at_ms"] is not None
    # full jitter may have drawn a retry due at once: move it an hour away
    st["next_retry_at_ms"] = int(time.time() * 1000) + 3_600_000
    path.write_text(json.dumps(st))
    skipped = tool("--json", "run", env=env)
    assert skipped.code == 0 and skipped.data["skipped"] is True  # backing off: nothing new to say
    write_plan(project, {})
    assert tool("--json", "trigger", env=env).code == 0
    wait_until(lambda: record.exists() and record.read_text().count("\n") >= 2, 10)  # two whole lines
    shown = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(n["app_name"], n["summary"]) for n in shown] == [
        ("lore-service", f"lore-service: {sid} failed"),
        ("lore-service", f"lore-service: {sid} recovered"),
    ]
    assert shown[0]["body"] == "sync failed: issues failed: exit status 75"
    assert shown[1]["body"].startswith("synced again: last run success in ")
    doctor = json.loads(tool("--json", "doctor", env=environ).out)["data"]["checks"]
    desktop = next(c for c in doctor if c["name"] == "notify desktop")
    assert desktop["status"] == "ok" and "reachable from the last scheduled run" in desktop["message"]


def test_gdbus_delivers_any_text_exactly_as_given(environ, session_bus):
    address, record = session_bus
    text = TRICKY + " 'quoted' $HOME %s {} [] ünïcödé ✔"
    assert ls.send_desktop(ls.System({**environ, "DBUS_SESSION_BUS_ADDRESS": address}), 't"itle', text) is None
    shown = json.loads(record.read_text().splitlines()[-1])
    assert (shown["summary"], shown["body"]) == ('t"itle', text)


def test_without_a_desktop_session_the_default_sends_nothing_and_doctor_says_so(cli, installed, project, home, system):
    write_plan(project, {"issues": {"exit": 75}})
    assert cli("--json", "run").code == 1
    assert not any(c[0] in ("gdbus", "notify-send") for c in system.commands)
    assert status_file(home, installed["service_id"])["desktop_session"] is False
    check = next(c for c in cli("--json", "doctor").data["checks"] if c["name"] == "notify desktop")
    assert check["status"] == "ok" and check["message"].startswith("off: no desktop session is reachable")
    set_notify(home, installed["service_id"], desktop=True)
    check = next(c for c in cli("--json", "doctor").data["checks"] if c["name"] == "notify desktop")
    assert check["status"] == "warn" and "desktop = true" in check["message"]


class EnvRecordingSystem(FakeSystem):
    """Records the environment each command was given, too."""

    def __init__(self, environ: dict[str, str], platform: str = "linux") -> None:
        super().__init__(environ, platform)
        self.envs: list[dict[str, str] | None] = []

    def run(self, argv, *, input=None, env=None, timeout=60.0, keep_newlines=False, console=False):  # type: ignore[override]
        self.envs.append(env)
        return super().run(argv, input=input, env=env, timeout=timeout, keep_newlines=keep_newlines, console=console)


TRICKY = 'sync failed: "issues" \\ end\nnext line'


def test_macos_shows_the_texts_as_osascript_arguments_never_as_script(environ):
    mac = MacSystem(environ)
    assert ls.send_desktop(mac, "lore-service: x failed", TRICKY) is None
    argv = mac.commands[-1]
    assert argv[:2] == ["osascript", "-e"] and argv[-2:] == ["lore-service: x failed", TRICKY]
    script = [argv[i + 1] for i, word in enumerate(argv[:-2]) if word == "-e"]
    assert script == ["on run argv", "display notification (item 2 of argv) with title (item 1 of argv)", "end run"]
    mac.console_uid = 0  # another user is at the screen: no session of ours
    assert ls.send_desktop(mac, "t", "b") == "no desktop session is reachable from this run"


def test_windows_shows_a_toast_from_powershell_with_the_texts_in_its_environment(environ):
    win = EnvRecordingSystem(environ, platform="win32")
    assert ls.send_desktop(win, "lore-service: x stale", TRICKY) is None
    argv, env = win.commands[-1], win.envs[-1]
    assert argv[:2] == ["powershell", "-NoProfile"] and argv[-2] == "-Command"
    assert "ToastNotificationManager" in argv[-1] and TRICKY not in " ".join(argv)
    assert env is not None and (env["LORE_NOTIFY_TITLE"], env["LORE_NOTIFY_BODY"]) == ("lore-service: x stale", TRICKY)
    assert isinstance(WinSystem(environ).desktop_session(), str)


def test_linux_uses_gdbus_with_gvariant_literals_else_notify_send(environ, tmp_path):
    bus = tmp_path / "runtime" / "bus"
    bus.parent.mkdir()
    bus.touch()
    linux = EnvRecordingSystem({**environ, "XDG_RUNTIME_DIR": str(bus.parent)})
    linux.which_map.update(gdbus="/usr/bin/gdbus")
    assert ls.send_desktop(linux, "t", TRICKY) is None
    argv, env = linux.commands[-1], linux.envs[-1]
    assert argv[:3] == ["gdbus", "call", "--session"] and env is not None
    assert env["DBUS_SESSION_BUS_ADDRESS"] == f"unix:path={bus}"
    assert argv[-4] == '"sync failed: \\"issues\\" \\\\ end\\u000anext line"'
    linux.which_map.update(gdbus=None)
    linux.which_map["notify-send"] = "/usr/bin/notify-send"
    assert ls.send_desktop(linux, "t", TRICKY) is None
    assert linux.commands[-1] == ["notify-send", "--app-name=lore-service", "t", TRICKY]
    linux.respond(["notify-send"], ls.CommandResult([], 1, "", "could not connect to the bus\n"))
    assert ls.send_desktop(linux, "t", "b") == "notify-send: could not connect to the bus"
    assert ls.send_desktop(FakeSystem({**environ, "XDG_RUNTIME_DIR": str(tmp_path)}), "t", "b") is not None


# -- the real notifiers (native workflow) ------------------------------------------------------


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="needs macOS and osascript")
def test_real_osascript_takes_the_notification_command_line(environ):
    """osascript compiles the script and shows the texts it is handed as arguments."""
    command = ls.desktop_command(ls.System(), "gui", "lore-service: test", TRICKY)
    assert not isinstance(command, str)
    argv, env = command
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.windows
@pytest.mark.skipif(sys.platform != "win32", reason="needs Windows and PowerShell")
def test_real_powershell_shows_the_toast(environ):
    """PowerShell parses the toast script and WinRT takes the notification."""
    command = ls.desktop_command(ls.System(), "desktop", "lore-service: test", TRICKY)
    assert not isinstance(command, str)
    argv, env = command
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
