"""Hostile environments: odd state files, empty options, odd numbers and
stores, as an adversary or an accident would leave them. Real files, real
special files, real processes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    SCRIPT,
    TOKEN,
    FakeSystem,
    calls,
    edit_config,
    install,
    pid_alive,
    start_hanging_run,
    wait_for_exit,
    wait_until,
    write_plan,
)

import lore_service as ls


def status_path(home: Path, installed: dict) -> Path:
    return home / "state" / installed["service_id"] / "status.json"


# -- odd state files: exit 4 with the path, never a hang, never read whole ------------------


def test_a_fifo_in_place_of_status_json_is_exit_4_not_a_hang(tool, installed, home):
    path = status_path(home, installed)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)  # no writer: an open() without O_NONBLOCK would block forever
    for argv in (["status"], ["list"], ["status", "--all"], ["trigger"]):
        r = tool("--json", *argv, timeout=20)
        assert r.code == 4, (argv, r.out, r.err)
        assert "not a regular file (a FIFO)" in r.out and str(path) in r.out


def test_a_folder_in_place_of_status_json_is_exit_4_naming_it(cli, installed, home):
    path = status_path(home, installed)
    path.mkdir(parents=True)
    r = cli("--json", "status")
    assert r.code == 4 and r.doc["error"]["code"] == "state_corrupt"
    assert f"{path} is not a regular file (a folder)" in r.doc["error"]["message"]


def test_a_symlink_in_place_of_status_json_is_refused_not_followed(cli, installed, home, tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"schema_version": 1, "service_id": installed["service_id"]}))
    path = status_path(home, installed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    r = cli("--json", "trigger")
    assert r.code == 4 and "symbolic link" in r.doc["error"]["message"]
    assert json.loads(target.read_text()) == {"schema_version": 1, "service_id": installed["service_id"]}


def test_a_symlink_loop_in_place_of_the_manifest_is_exit_4_in_list(cli, installed, home):
    manifest = home / "config" / installed["service_id"] / "manifest.json"
    manifest.unlink()
    manifest.symlink_to(manifest)
    r = cli("--json", "list")
    assert r.code == 4
    assert r.data["services"][0]["state"] == "error"  # shown as unreadable, never as absent


def test_a_huge_status_json_is_exit_4_without_being_read_whole(tool, installed, home, environ, project):
    path = status_path(home, installed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # sparse: 1 GiB on paper, nothing on disk
        fh.truncate(1 << 30)
    probe = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *tool.program, "--json", "status"],
        capture_output=True,
        text=True,
        env=environ,
        cwd=project,
        timeout=60,
    )
    doc = json.loads(out.stdout.splitlines()[0])
    assert doc["ok"] is False and doc["error"]["code"] == "state_corrupt" and "more than" in doc["error"]["message"]
    assert int(out.stdout.splitlines()[-1]) < 200 * 1024  # KiB: far below the file's size


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"schema_version": 0, "service_id": "x"}', "schema_version"),
        (b'{"schema_version": -1, "service_id": "x"}', "schema_version"),
        (b'{"schema_version": 1, "service_id": "x", "consecutive_failures": NaN}', "ValueError"),
        (b'{"schema_version": 1, "service_id": "x", "next_retry_at_ms": Infinity}', "ValueError"),
    ],
)
def test_non_positive_schema_versions_and_nan_are_corrupt(cli, installed, home, content, why):
    path = status_path(home, installed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    r = cli("--json", "status")
    assert r.code == 4 and why in r.doc["error"]["message"]


def test_a_utf8_bom_in_service_toml_is_accepted(cli, installed, home):
    config = home / "config" / installed["service_id"] / "service.toml"
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    r = cli("--json", "trigger")
    assert r.code == 0, r.out
    assert cli("--json", "doctor").data["checks"][2]["status"] in ("ok", "warn")


# -- empty values and odd numbers --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["uninstall", "--purge", "--name", ""],
        ["uninstall", "--purge", "--service-id", ""],
        ["uninstall", "--purge", "--project", ""],
        ["--home", "", "status"],
        ["status", "--home", ""],
        ["install", "--backend", "fake", "--lore", ""],
        ["pause", "--reason", ""],
    ],
)
def test_an_empty_value_is_refused_never_read_as_not_given(cli, installed, home, argv):
    r = cli("--json", *argv)
    assert r.code == 2 and r.doc["error"]["code"] == "empty_value", r.out
    assert (home / "config" / installed["service_id"] / "manifest.json").exists()  # nothing was purged
    assert cli("--json", "status").data["paused"] is None


@pytest.mark.parametrize("count", ["٣", "３", "²", "-1", "1e3", ""])
def test_tail_takes_ascii_digits_only(cli, installed, count):
    r = cli("--json", "logs", "--tail", count)
    assert r.code == 2 and "ASCII digits" in r.doc["error"]["message"], r.out


def test_credential_manager_is_refused_on_linux(cli):
    r = cli("--json", "install", "--backend", "none", "--token-source", "credential-manager", "--dry-run")
    assert r.code == 2 and r.doc["error"]["code"] == "bad_token_source"
    assert "Windows only" in r.doc["error"]["message"] and "env-file" in r.doc["error"]["hint"]


# -- no control character reaches a scheduler entry ----------------------------------------------


@pytest.mark.parametrize("backend", ["systemd", "cron", "launchd", "schtasks"])
def test_a_control_character_in_the_programs_own_path_is_refused_on_every_backend(cli, monkeypatch, backend, tmp_path):
    # a \r in the program's own path: launchd and Task Scheduler would quietly turn it into \n
    bad = str(tmp_path / "lore\rservice.py")
    monkeypatch.setattr(ls, "self_command", lambda: [sys.executable, bad])
    r = install(cli, backend, "--dry-run")
    assert r.code == 2 and r.doc["error"]["code"] == "bad_path", r.out
    assert "program argument" in r.doc["error"]["message"] and repr(bad) in r.doc["error"]["message"]


@pytest.mark.parametrize("backend", ["systemd", "cron"])
def test_an_xdg_folder_with_a_line_break_never_reaches_a_unit_or_a_crontab(cli, environ, tmp_path, backend):
    env = {k: v for k, v in environ.items() if k != "LORE_SERVICE_HOME"}
    env["XDG_STATE_HOME"] = str(tmp_path / "state\rExecStartPre=/bin/touch /tmp/pwned")
    r = install(cli, backend, "--dry-run", system=FakeSystem(env))
    assert r.code == 2 and r.doc["error"]["code"] == "bad_path", r.out
    assert "XDG_STATE_HOME folder" in r.doc["error"]["message"] or "state folder" in r.doc["error"]["message"]


@pytest.mark.parametrize("bad", ["/srv/lore\rExecStartPre=/bin/touch /tmp/pwned", "/srv/lore\0x", "/srv/\x1b[2Jx"])
def test_extra_write_paths_with_a_control_character_are_refused_when_read(cli, installed, home, bad):
    edit_config(home, installed["service_id"], lambda doc: doc.update(extra_write_paths=[bad]))
    for argv in (["trigger"], ["install", "--backend", "fake"]):
        r = cli("--json", *argv)
        assert r.code == 4 and r.doc["error"]["code"] == "config_invalid", r.out
        assert "extra_write_paths" in r.doc["error"]["message"]


def test_systemd_accepts_an_injected_directive_that_lore_service_refuses_to_render(system, tmp_path):
    """Why the check exists: rendered without it, a CR in a path is a new
    directive line that `systemd-analyze verify` accepts without a word."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    paths = ls.Paths(system)
    backend = ls.SystemdBackend(system, paths)
    project = tmp_path / "project"
    project.mkdir()
    manifest = ls.Manifest(
        service_id="hostile-1", project_root=str(project), backend="systemd", backend_reason="test",
        interval_seconds=1800, schedule_step_seconds=1800, profile="balanced", token_source="env-file",
        token_env="GITLAB_TOKEN", program=["/bin/true"], lore_path=None, home=paths.home,
        created_at_iso="", updated_at_iso="",
    )  # fmt: skip
    # the trailing "#" turns the rest of the quoted list into a comment: no unbalanced quote
    cfg = ls.ServiceConfig(extra_write_paths=["/srv/lore\rExecStartPre=/bin/touch /tmp/pwned\r#"])
    service, _ = backend.render(manifest, cfg, None)  # what would be written without the check
    unit = tmp_path / "lore-sync-hostile-1.service"
    unit.write_text(service)
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0  # systemd takes the injected line as a directive
    assert any(line.startswith("ExecStartPre=/bin/touch") for line in service.replace("\r", "\n").splitlines())
    with pytest.raises(ls.UsageError, match="extra_write_paths entry"):
        backend.plan(manifest, cfg, None)
    # and what lore-service does render for the same service verifies cleanly, with one ExecStart
    clean = ls.ServiceConfig(extra_write_paths=["/srv/lore $HOME 100% é"])
    unit.write_text(backend.plan(manifest, clean, None).files[0].content)
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert "ExecStartPre" not in unit.read_text() and unit.read_text().count("ExecStart=") == 1


# -- Ctrl-C and SIGHUP do what SIGTERM does ------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_and_sighup_stop_the_stage_group_and_record_the_run(tool, environ, project, signum):
    runner, stage_pid, grandchild = start_hanging_run(tool, environ, project, "trigger")
    runner.send_signal(signum)
    out, _ = runner.communicate(timeout=30)
    assert runner.returncode == 1
    stages = {s["stage"]: s for s in json.loads(out)["data"]["run"]["stage_results"]}
    assert f"stopped by signal {int(signum)}" in stages["issues"]["message"]
    assert stages["mrs"]["outcome"] == "skipped"
    for pid in (stage_pid, grandchild):  # the token holder's whole group is gone, not left running
        wait_for_exit(pid)
        assert not pid_alive(pid)
    status = json.loads(tool("--json", "status").out)["data"]
    assert (
        status["last_run"]["outcome"] == "failed"
        and "stopped by signal" in status["last_run"]["stage_results"][0]["message"]
    )


# -- the token does not linger ---------------------------------------------------------------------


def test_a_run_holding_the_token_is_not_dumpable_and_has_no_core_limit(tool, environ, project):
    assert tool("--json", "install", "--backend", "none").code == 0
    write_plan(project, {"issues": {"record_parent_limits": True}})
    assert tool("--json", "trigger").code == 0
    limits = (project / ".fake-lore-parent-limits-issues.txt").read_text().split()
    assert limits[4:6] == ["0", "0"]  # "Max core file size 0 0 bytes": soft and hard
    probe = (
        "import ctypes, sys; sys.path.insert(0, sys.argv[1]); import lore_service as ls; "
        "ls.System().make_undumpable(); print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE
    )
    out = subprocess.run([sys.executable, "-c", probe, str(Path(SCRIPT).parent)], capture_output=True, text=True)
    assert out.stdout.strip() == "0", out.stderr


@pytest.mark.parametrize("text", [f"GITLAB_TOKEN={TOKEN}\n", f"\n  MY_TOKEN_2={TOKEN}  \n"])
def test_token_stdin_takes_the_token_alone_not_a_name_value_line(cli, system, text):
    system.stdin_text = text
    r = cli("--json", "install", "--backend", "none", "--token-stdin", "--dry-run")
    assert r.code == 2 and r.doc["error"]["code"] == "bad_token"
    assert "takes the token alone" in r.doc["error"]["message"] and TOKEN not in r.out + r.err


def test_a_base64_token_with_padding_is_still_a_token(cli, system):
    system.stdin_text = "QUJDREVGR0hJSktMTU5PUA==\n"
    r = cli("--json", "install", "--backend", "none", "--token-stdin", "--dry-run")
    assert r.code == 0, r.out
    assert not any("no token" in m for m in r.data["missing"])


@pytest.mark.parametrize(
    "argv",
    [
        ["install", "--backend", "none", "--dry-run", "--token-env", TOKEN],
        ["install", "--backend", "none", "--dry-run", "--interval", TOKEN],
        ["install", "--backend", TOKEN],
        ["status", "--name", TOKEN],
        ["logs", "--tail", TOKEN],
    ],
)
def test_no_error_message_repeats_a_value_that_looks_like_a_token(cli, installed, argv):
    for robot in ([], ["--json"]):
        r = cli(*robot, *argv)
        assert r.code in (2, 3), r.out + r.err
        assert TOKEN not in r.out + r.err and "looks like a token" in r.out + r.err


def test_a_temp_file_left_by_a_killed_reinstall_is_removed_by_the_next_write_and_by_uninstall(cli, installed, home):
    config = home / "config" / installed["service_id"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = config / f".token.env.{int(dead.stdout)}.tmp"  # its writer is gone
    orphan.write_text(f"GITLAB_TOKEN={TOKEN}\n")
    assert cli("--json", "install", "--backend", "fake", "--profile", "fast").code == 0
    assert not orphan.exists()
    orphan.write_text(f"GITLAB_TOKEN={TOKEN}\n")
    assert cli("--json", "uninstall").code == 0
    assert not orphan.exists() and not config.exists()


# -- terminal safety ---------------------------------------------------------------------------------


def test_the_token_is_redacted_in_every_form_and_in_the_start_line(cli, installed, home, project):
    edit_config(
        home,
        installed["service_id"],
        lambda doc: doc["stages"]["issues"]["command"].append(f"--token={TOKEN}"),
    )
    write_plan(project, {"issues": {"print_token_forms": True}})
    assert cli("--json", "trigger").code == 0
    log = (home / "logs" / installed["service_id"] / "service.log").read_bytes()
    raw = TOKEN.encode()
    for form in (raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"="), TOKEN.encode("utf-16-le")):
        assert form not in log
    assert b"start: " in log and b"--token=<redacted>" in log
    assert log.count(b"<redacted>") >= 5


def test_escape_sequences_from_stages_and_pause_reasons_never_reach_the_terminal(cli, installed, home, project):
    osc52 = "\x1b]52;c;cHduZWQ=\x07"  # a clipboard write
    write_plan(project, {"issues": {"print_raw": f"{osc52}clear\x1b[2J\x9b31m\n"}})
    assert cli("--json", "trigger").code == 0
    assert cli("pause", "--reason", f"bye\x1b[2J{osc52}").code == 0
    log = (home / "logs" / installed["service_id"] / "service.log").read_text()
    assert osc52 in log  # the log file keeps what the stage wrote (redacted, not rewritten)
    for argv in (["logs"], ["status"], ["logs", "--tail", "30"]):
        out = cli(*argv)
        text = out.out + out.err
        assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text, argv
        assert "\\x1b" in text, argv
    robot = cli("--json", "status")
    assert "\x1b" not in robot.out and json.loads(robot.out)["data"]["paused"]["reason"].startswith("bye\x1b")


# -- ownership: another local user ----------------------------------------------------------------
# Real users (created here, removed after), a shared sticky folder as /tmp is,
# and the tool run as each of them with Debian's own Python.


@dataclass
class LocalUser:
    name: str
    uid: int
    gid: int
    home: Path

    def run(self, *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None):
        command = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--", *argv]
        base = {"HOME": str(self.home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "USER": self.name}
        return subprocess.run(
            command, cwd=cwd or self.home, env={**base, **(env or {})}, capture_output=True, text=True, timeout=60
        )


@pytest.fixture(scope="module")
def two_users():
    """Two unprivileged users (a victim and an intruder) and a copy of the tool both can run."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not os.path.exists("/usr/bin/python3"):
        reason = "needs root, useradd and /usr/bin/python3 to create real users"
        if os.environ.get("LORE_E2E_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    import tempfile

    # not under pytest's own temporary folder: that one is private to root
    base = Path(tempfile.mkdtemp(prefix="lore-hostile-"))
    base.chmod(0o755)
    app = base / "app"
    app.mkdir()
    shutil.copy(SCRIPT, app / "lore_service.py")
    import tomli_w

    shutil.copytree(Path(tomli_w.__file__).parent, app / "tomli_w")
    for path in [app, *app.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    users = []
    for role in ("v", "i"):
        name = f"lhs{os.getpid() % 100000}{role}"
        home = base / name
        subprocess.run(["userdel", "-r", name], capture_output=True)  # a killed run's leftover
        subprocess.run(["useradd", "-M", "-d", str(home), "-s", "/bin/sh", name], check=True, capture_output=True)
        import pwd

        entry = pwd.getpwnam(name)
        home.mkdir(mode=0o700)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        users.append(LocalUser(name, entry.pw_uid, entry.pw_gid, home))
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp is
    yield users[0], users[1], shared, app
    for user in users:
        subprocess.run(["userdel", user.name], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def tool_as(user: LocalUser, app: Path, *argv: str, cwd: Path | None = None):
    return user.run("/usr/bin/python3", str(app / "lore_service.py"), *argv, cwd=cwd, env={"PYTHONPATH": str(app)})


def test_a_home_another_user_made_first_in_a_shared_folder_is_refused(two_users, tmp_path):
    victim, intruder, shared, app = two_users
    home = shared / f"lore-home-{tmp_path.name}"
    project = victim.home / f"project-{tmp_path.name}"
    assert victim.run("mkdir", "-p", str(project)).returncode == 0
    # the intruder gets there first and lays out a service whose stage runs its own command
    proof = shared / f"pwned-{tmp_path.name}"
    sid = "acme-1"
    manifest = {
        "schema_version": 1, "service_id": sid, "project_root": str(project), "backend": "none",
        "backend_reason": "x", "interval_seconds": 1800, "profile": "fast", "token_source": "env-file",
        "token_env": "GITLAB_TOKEN", "program": ["x"], "lore_path": None, "home": str(home),
        "updated_at_iso": "2026-01-01T00:00:00.000Z",
    }  # fmt: skip
    config = f'profile = "fast"\n[stages.issues]\ncommand = ["/bin/touch", "{proof}"]\n'
    config += '[stages.mrs]\ncommand = ["/bin/true"]\n'
    script = (
        f"mkdir -p {home}/config/{sid} && chmod 755 {home} {home}/config {home}/config/{sid} && "
        f"cat > {home}/config/{sid}/manifest.json && printf '%s' '{config}' > {home}/config/{sid}/service.toml"
    )
    made = intruder.run("/bin/sh", "-c", script)
    assert made.returncode == 0, made.stderr
    (home / "config" / sid / "manifest.json").write_text(json.dumps(manifest))  # as root: content only
    os.chown(home / "config" / sid / "manifest.json", intruder.uid, intruder.gid)
    for argv in (["run", "--service-id", sid], ["trigger", "--name", sid], ["status", "--all"], ["list"]):
        r = tool_as(victim, app, "--json", "--home", str(home), *argv, cwd=project)
        assert r.returncode == 4, (argv, r.stdout, r.stderr)
        error = json.loads(r.stdout)["error"]
        assert error["code"] == "untrusted_path" and f"{home} belongs to uid {intruder.uid}" in error["message"]
    assert not proof.exists()  # the intruder's command never ran as the victim
    doctor = tool_as(victim, app, "--json", "--home", str(home), "doctor", "--name", sid, cwd=project)
    checks = json.loads(doctor.stdout)["data"]["checks"]  # doctor lists it as a failing check (exit 1)
    assert doctor.returncode == 1 and any(c["status"] == "fail" and str(home) in c["message"] for c in checks)


def test_a_home_open_to_other_users_is_refused_and_a_planted_link_is_never_written_through(two_users, tmp_path):
    victim, intruder, shared, app = two_users
    assert victim.run("chmod", "755", str(victim.home)).returncode == 0  # as Debian makes homes: others may look in
    home = victim.home / f"lore-{tmp_path.name}"
    project = victim.home / f"p-{tmp_path.name}"
    assert victim.run("mkdir", "-p", str(project)).returncode == 0
    install_argv = ["--json", "--home", str(home), "install", "--backend", "none", "--lore", "/bin/true"]
    r = victim.run(
        "/usr/bin/python3", str(app / "lore_service.py"), *install_argv,
        cwd=project, env={"PYTHONPATH": str(app), "GITLAB_TOKEN": TOKEN},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    sid = json.loads(r.stdout)["data"]["service_id"]
    logs = home / "logs" / sid
    assert victim.run("chmod", "-R", "777", str(home)).returncode == 0  # a mistake: all open to everyone
    r = tool_as(victim, app, "--json", "--home", str(home), "status", cwd=project)
    assert r.returncode == 4 and f"{home} can be written by group and others (mode 777)" in r.stdout
    doctor = tool_as(victim, app, "--json", "--home", str(home), "doctor", cwd=project)
    checks = json.loads(doctor.stdout)["data"]["checks"]
    assert doctor.returncode == 1 and any(c["status"] == "fail" and str(home) in c["message"] for c in checks)
    # the intruder plants the log as a link to a file of the victim's: the run never writes through it
    precious = victim.home / f"precious-{tmp_path.name}"
    assert victim.run("/bin/sh", "-c", f"echo mine > {precious}").returncode == 0
    assert intruder.run("ln", "-s", str(precious), str(logs / "service.log")).returncode == 0
    r = tool_as(victim, app, "--json", "--home", str(home), "trigger", cwd=project)
    assert r.returncode == 4 and "untrusted_path" in r.stdout
    assert precious.read_text() == "mine\n"
    assert victim.run("chmod", "-R", "go-rwx", str(home)).returncode == 0  # closed again: the link is still refused
    r = tool_as(victim, app, "--json", "--home", str(home), "trigger", cwd=project)
    assert r.returncode == 4 and "symbolic link" in r.stdout and precious.read_text() == "mine\n"
    assert victim.run("rm", str(logs / "service.log")).returncode == 0
    assert tool_as(victim, app, "--json", "--home", str(home), "trigger", cwd=project).returncode == 0


# -- uninstall completes or changes nothing; admin commands take turns ------------------------------


def test_uninstall_of_a_half_odd_service_changes_nothing(cli, installed, home):
    sid = installed["service_id"]
    config = home / "config" / sid / "service.toml"
    config.unlink()
    config.mkdir()  # not what install made there
    r = cli("--json", "uninstall", "--purge")
    assert r.code == 4 and f"{config} is a folder" in r.doc["error"]["message"]
    assert (home / "config" / sid / "manifest.json").exists()
    assert (home / "fake-scheduler" / f"{sid}.json").exists()  # the scheduler entry is still there too


def test_uninstall_purge_waits_for_a_run_then_stops_it_and_nothing_comes_back(
    cli, tool, environ, project, home, monkeypatch
):
    if tool.program[0] != sys.executable:
        pytest.skip("the run in progress is started from source once")
    assert cli("--json", "install", "--backend", "fake").code == 0
    sid = cli("--json", "status").data["service_id"]
    write_plan(project, {"issues": {"hang": True}})
    runner = subprocess.Popen(
        [*tool.program, "--json", "trigger"], cwd=project, env=environ, stdout=subprocess.PIPE, text=True
    )
    wait_until(lambda: bool(calls(project)), 10)
    monkeypatch.setattr(ls, "RUN_END_WAIT_SECONDS", 0.5)
    r = cli("--json", "uninstall", "--purge")
    assert r.code == 0, r.out
    out, _ = runner.communicate(timeout=30)
    assert runner.returncode == 1 and "stopped by signal 15" in out  # the run ended as a scheduler's stop ends it
    wait_for_exit(calls(project)[0]["pid"])
    assert not (home / "state" / sid).exists() and not (home / "logs" / sid).exists()
    assert not (home / "config" / sid).exists()


def test_installs_and_uninstalls_racing_never_leave_half_a_service(tool, environ, project, home):
    procs = []
    for i in range(8):
        argv = ["--json", "install", "--backend", "none"] if i % 2 == 0 else ["--json", "uninstall", "--purge"]
        procs.append(subprocess.Popen([*tool.program, *argv], cwd=project, env=environ, stdout=subprocess.PIPE))
    codes = [p.wait(timeout=120) for p in procs]
    for p in procs:
        p.stdout.close()
    assert set(codes) <= {0, 3, 5}, codes  # done, nothing left to uninstall, or the other one's turn ran long
    for folder in (home / "config").iterdir() if (home / "config").exists() else []:
        have = {p.name for p in folder.iterdir()}
        assert ("manifest.json" in have) == ("service.toml" in have), have


def test_doctor_lists_every_check_even_with_odd_state(cli, installed, home):
    sid = installed["service_id"]
    status = home / "state" / sid / "status.json"
    status.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(status)
    r = cli("--json", "doctor")
    assert r.code == 1  # a failing check, not a crash or a hang
    checks = {c["name"]: c for c in r.data["checks"]}
    assert checks["status"]["status"] == "fail" and "FIFO" in checks["status"]["message"]
    assert checks["config"]["status"] == "ok" and checks["project"]["status"] == "ok"


# -- a token that cannot be had is a recorded run, never a silent stop -----------------------------


def test_a_secret_store_that_never_answers_is_a_recorded_failed_run(cli, system, monkeypatch, memory_keyring):
    assert cli("--json", "install", "--backend", "fake", "--token-source", "keychain").code == 0
    release = threading.Event()

    def hang(service: str, username: str) -> str | None:  # a prompt nobody will ever answer
        release.wait(30)
        return None

    monkeypatch.setattr(memory_keyring, "get_password", hang)
    monkeypatch.setattr(ls, "SECRET_READ_TIMEOUT", 0.5)
    try:
        r = cli("--json", "run")
    finally:
        release.set()
    assert r.code == 1 and r.doc["error"]["code"] == "run_failed"
    assert "did not answer" in r.doc["error"]["message"]
    run = r.data["run"]
    assert run["outcome"] == "failed" and run["error_class"] == "secret_store"
    assert all(s["outcome"] == "skipped" and "(fix: " in s["message"] for s in run["stage_results"])
    status = cli("--json", "status").data
    assert status["last_run"]["error_class"] == "secret_store" and status["consecutive_failures"] == 1
    assert status["next_retry_at_ms"] is not None and status["paused"] is None  # backs off, as transient


def test_a_secret_store_error_is_recorded_with_its_fix(cli, system, monkeypatch, memory_keyring):
    assert cli("--json", "install", "--backend", "fake", "--token-source", "keychain").code == 0

    def locked(service: str, username: str) -> str | None:
        raise RuntimeError("the keychain is locked")

    monkeypatch.setattr(memory_keyring, "get_password", locked)
    r = cli("--json", "trigger")
    assert r.code == 1 and "the keychain is locked" in r.doc["error"]["message"]
    assert r.data["run"]["error_class"] == "secret_store"
    log = cli("logs").out
    assert "no token:" in log and "fix:" in log


def test_a_keychain_item_that_went_missing_is_a_recorded_failure_with_the_way_to_store_one(cli, system, memory_keyring):
    assert cli("--json", "install", "--backend", "fake", "--token-source", "keychain").code == 0
    memory_keyring.store.clear()  # deleted in Keychain Access, say
    system.environ.pop("GITLAB_TOKEN")
    r = cli("--json", "run")
    assert r.code == 1 and r.data["run"]["error_class"] == "secret_store"
    assert "item is missing" in r.doc["error"]["message"]
    assert "token --store" in r.data["run"]["stage_results"][0]["message"]


def test_doctor_still_judges_the_scheduler_entry_when_status_cannot_be_read(cli, installed, home):
    sid = installed["service_id"]
    status = home / "state" / sid / "status.json"
    status.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(status)
    (home / "fake-scheduler" / f"{sid}.json").unlink()
    checks = cli("--json", "doctor").data["checks"]
    assert any(c["name"] == "scheduler entry" and "is missing" in c["message"] for c in checks)
    assert any(c["name"] == "freshness" and c["status"] == "fail" and "FIFO" in c["message"] for c in checks)
