"""Conditions of the machine (issue 13): a run that a condition keeps from
starting is skipped, never a failure; the next firing tries again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    FakeSystem,
    MacSystem,
    WinSystem,
    calls,
    doctor_checks,
    edit_config,
    fixture_text,
    hold_slot,
    install,
    log_text,
    pid_alive,
    required_or_skip,
    res,
    run_while_held,
    start_hanging_run,
    status_file,
    wait_for_exit,
    wait_until,
    write_plan,
    write_settings,
)

import lore_service as ls

DAY_MS = 24 * 3600 * 1000


def test_a_missing_project_folder_skips_the_run_and_never_pauses_the_service(
    cli, installed, project, home, tmp_path, monkeypatch
):
    sid = installed["service_id"]
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "unmounted")
    threshold = ls.ServiceConfig().circuit_breaker_threshold
    for _ in range(threshold + 2):  # more than the breaker would allow failures
        result = cli("--json", "run", "--name", sid)
        assert result.code == 0, result.err
        assert result.data["skipped"] is True
        assert result.data["skip_reason"] == f"project folder missing ({project})"
        assert result.data["run"]["outcome"] == "skipped" and result.data["run"]["condition"] == "project_missing"
    st = status_file(home, sid)
    assert st["consecutive_failures"] == 0 and st["next_retry_at_ms"] is None and st["paused"] is None
    assert st["last_run"] is None
    assert [(r["outcome"], r["repeats"]) for r in st["history"]] == [("skipped", threshold + 2)]
    assert st["last_skip"]["repeats"] == threshold + 2


def test_the_run_after_the_folder_is_back_syncs_and_the_skips_stay_in_the_history(
    cli, installed, project, home, tmp_path, monkeypatch
):
    sid = installed["service_id"]
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "away")
    for _ in range(3):
        assert cli("--json", "run", "--name", sid).code == 0
    (tmp_path / "away").rename(project)
    result = cli("--json", "run", "--name", sid)
    assert result.code == 0 and result.data["run"]["outcome"] == "success"
    assert [c["stage"] for c in calls(project)] == ["issues", "mrs", "docs"]
    st = status_file(home, sid)
    assert [(r["outcome"], r["repeats"]) for r in st["history"]] == [("success", 1), ("skipped", 3)]
    assert cli("--json", "status", "--name", sid).data["state"] == "healthy"


def test_a_skip_never_moves_an_earlier_backoff(cli, installed, project, home, system, tmp_path, monkeypatch):
    from conftest import write_plan

    sid = installed["service_id"]
    write_plan(project, {"issues": {"exit": 75}})
    assert cli("--json", "trigger").code == 1
    before = status_file(home, sid)
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "away")
    system.clock_ms = before["next_retry_at_ms"] + 1  # due for its retry
    assert cli("--json", "run", "--name", sid).data["run"]["condition"] == "project_missing"
    after = status_file(home, sid)
    assert after["consecutive_failures"] == before["consecutive_failures"] == 1
    assert after["next_retry_at_ms"] == before["next_retry_at_ms"]
    assert after["next_due_at_ms"] == before["next_due_at_ms"]
    assert after["last_run"] == before["last_run"]


def test_a_trigger_skipped_by_a_condition_exits_1_with_code_skipped_and_the_record(
    cli, installed, project, tmp_path, monkeypatch
):
    sid = installed["service_id"]
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "away")
    result = cli("--json", "trigger", "--name", sid)
    assert result.code == 1
    assert result.doc["error"]["code"] == "skipped"
    assert result.doc["error"]["message"] == f"not synced: project folder missing ({project})"
    assert result.doc["data"]["run"]["condition"] == "project_missing"
    plain = cli("trigger", "--name", sid)
    assert plain.code == 1 and "not synced: project folder missing" in plain.err and "hint" in plain.err.lower()


def test_status_shows_the_last_skip_and_a_stale_service_names_the_condition_as_its_cause(
    cli, installed, project, system, tmp_path, monkeypatch
):
    sid = installed["service_id"]
    system.clock_ms = system.now_ms()
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "away")
    for _ in range(4):
        system.clock_ms += 3600 * 1000
        assert cli("run", "--name", sid).code == 0
    system.clock_ms += DAY_MS
    text = cli("status", "--name", sid).out
    assert "last skip" in text and f"project folder missing ({project}) (4 in a row)" in text
    assert "STALE" in text
    assert f"cause: the runs are skipped: project folder missing ({project}) (4 in a row)" in text
    doc = cli("--json", "status", "--name", sid).data
    assert doc["state"] == "stale" and doc["stale"] is True


def test_doctor_fails_a_missing_project_folder_with_the_fix(cli, installed, project, tmp_path, monkeypatch):
    sid = installed["service_id"]
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "away")
    result = cli("--json", "doctor", "--name", sid)
    check = next(c for c in result.data["checks"] if c["name"] == "project")
    assert check["status"] == "fail" and "runs are skipped" in check["message"]
    assert "mount the drive" in check["hint"]


def test_identical_skips_coalesce_but_a_different_condition_starts_a_new_entry():
    cfg = ls.ServiceConfig()
    status = ls.Status(service_id="svc")

    def skip(at: int, condition: str, reason: str) -> ls.RunRecord:
        iso = ls.iso_from_ms(at)
        return ls.RunRecord(f"{at:x}-1", "scheduled", iso, iso, 0, "skipped", None, [], at, condition, reason)

    ls.apply_skip(status, skip(1_000, "offline", "offline (a:443 unreachable)"), cfg)
    ls.apply_skip(status, skip(2_000, "offline", "offline (a:443 unreachable)"), cfg)
    ls.apply_skip(status, skip(3_000, "project_missing", "project folder missing (/p)"), cfg)
    ls.apply_skip(status, skip(4_000, "offline", "offline (a:443 unreachable)"), cfg)
    assert [(r.condition, r.repeats) for r in status.history] == [
        ("offline", 1),
        ("project_missing", 1),
        ("offline", 2),
    ]
    first = status.history[2]
    assert first.started_at_ms == 1_000 and first.finished_at_iso == ls.iso_from_ms(2_000)
    assert status.last_skip is status.history[0]
    assert status.consecutive_failures == 0 and status.next_retry_at_ms is None


def test_a_status_file_from_an_older_build_without_skip_fields_still_reads(home, tmp_path):
    iso = ls.iso_from_ms(5_000)
    old_run = {
        "run_id": "1388-1",
        "trigger": "scheduled",
        "started_at_iso": iso,
        "started_at_ms": 5_000,
        "finished_at_iso": iso,
        "duration_ms": 0,
        "outcome": "success",
        "error_class": None,
        "stage_results": [],
    }
    doc = {
        "schema_version": 1,
        "updated_at_iso": iso,
        "service_id": "svc",
        "last_run": old_run,
        "consecutive_failures": 0,
        "next_retry_at_ms": None,
        "next_due_at_ms": None,
        "paused": None,
        "history": [old_run],
    }
    status = ls.Status.from_dict(doc, "status.json")
    assert status.last_skip is None and status.history[0].repeats == 1 and status.history[0].condition is None


# -- helpers for the machine's conditions ------------------------------------------------------


def netns_prefix() -> list[str]:
    """The argv prefix that runs a command in a network namespace of its own, with
    nothing but a loopback device (not even up): no packet can leave it."""
    if shutil.which("unshare") is None:
        required_or_skip("unshare (util-linux) is not installed")
    for prefix in (["unshare", "--net", "--"], ["unshare", "--user", "--map-root-user", "--net", "--"]):
        probe = subprocess.run([*prefix, "cat", "/proc/net/route"], capture_output=True, text=True)
        if probe.returncode == 0 and len(probe.stdout.splitlines()) <= 1:  # a header, no route
            return prefix
    required_or_skip("cannot make a network namespace (unshare --net needs root or user namespaces)")
    raise AssertionError("unreachable")


@pytest.fixture
def listener() -> Iterator[int]:
    """A real TCP listener on 127.0.0.1 (the GitLab host that answers); its port."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        yield srv.getsockname()[1]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def power_tree(root: Path, supplies: dict[str, dict[str, str]]) -> Path:
    """A sysfs tree with class/power_supply/<name>/<file> as the kernel exposes them."""
    for name, files in supplies.items():
        folder = root / "class" / "power_supply" / name
        folder.mkdir(parents=True)
        for key, value in files.items():
            (folder / key).write_text(value + "\n")
    return root


ON_AC = {"AC": {"type": "Mains", "online": "1"}, "BAT0": {"type": "Battery", "status": "Charging", "scope": "System"}}
ON_BATTERY = {"AC": {"type": "Mains", "online": "0"}, "BAT0": {"type": "Battery", "status": "Discharging"}}


def on_battery(system: FakeSystem, tmp_path: Path) -> None:
    """The machine runs on its battery, as its sysfs says."""
    system.sysfs_root = str(power_tree(tmp_path / "sys", ON_BATTERY))


def nmcli_says(system: FakeSystem, name: str) -> None:
    """NetworkManager is there and answers with tests/fixtures/nmcli/<name>."""
    system.which_map["nmcli"] = "/usr/bin/nmcli"
    system.respond(["nmcli"], res(0, fixture_text("nmcli", name)))


def run_json(cli, sid: str, command: str = "run"):
    result = cli("--json", command, "--name", sid)
    return result, result.doc.get("data", {})


# -- gitlab_url: from the git remote, validated ------------------------------------------------


@pytest.mark.parametrize(
    ("remote", "url"),
    [
        ("https://gitlab.example.com/group/project.git", "https://gitlab.example.com"),
        ("https://gitlab.example.com:8443/group/sub/project.git", "https://gitlab.example.com:8443"),
        ("http://10.0.0.5:8080/group/project.git", "http://10.0.0.5:8080"),
        ("https://oauth2:glpat-SECRET-token-value-42@gitlab.example.com/g/p.git", "https://gitlab.example.com"),
        ("https://[2001:db8::1]:8443/g/p.git", "https://[2001:db8::1]:8443"),
        ("ssh://git@gitlab.example.com:2222/group/project.git", "https://gitlab.example.com"),
        ("ssh://gitlab.example.com/group/project.git", "https://gitlab.example.com"),
        ("git+ssh://git@gitlab.example.com/group/project.git", "https://gitlab.example.com"),
        ("git@gitlab.example.com:group/sub/project.git", "https://gitlab.example.com"),
        ("gitlab.example.com:group/project.git", "https://gitlab.example.com"),
        ("git@GitLab.Example.COM:group/project.git", "https://gitlab.example.com"),
        ("/srv/git/project.git", None),
        ("../project.git", None),
        ("file:///srv/git/project.git", None),
        ("git://gitlab.example.com/project.git", None),
        ("C:/repos/project.git", None),
        ("C:\\repos\\project.git", None),
        ("", None),
    ],
)
def test_gitlab_url_is_derived_from_every_form_of_git_remote(remote: str, url: str | None):
    assert ls.gitlab_url_from_remote(remote) == url
    if url is not None:
        assert ls.validate_gitlab_url(url) == url and "glpat" not in url


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("https://gitlab.example.com", ("gitlab.example.com", 443)),
        ("http://gitlab.example.com", ("gitlab.example.com", 80)),
        ("https://gitlab.example.com:8443/gitlab", ("gitlab.example.com", 8443)),
        ("HTTP://127.0.0.1:9", ("127.0.0.1", 9)),
        ("none", None),
        (None, None),
    ],
)
def test_the_offline_check_connects_to_the_urls_port_or_the_schemes_default(url, endpoint):
    assert ls.gitlab_endpoint(url) == endpoint


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("gitlab_url", "gitlab.example.com", "http or https URL"),
        ("gitlab_url", "ftp://gitlab.example.com", "http or https URL"),
        ("gitlab_url", "https://", "http or https URL"),
        ("gitlab_url", "https://user:secret@gitlab.example.com", "user name or password"),
        ("gitlab_url", "https://oauth2:secret@gitlab.example.com:99999", "user name or password"),
        ("gitlab_url", "https://[oauth2:secret@gitlab.example.com/", "not a valid URL"),
        ("gitlab_url", "https://gitlab.example.com:99999", "not a valid URL"),
        ("gitlab_url", "https://gitlab.example.com:0", "port 0"),
        ("gitlab_url", " https://gitlab.example.com", "http or https URL"),
        ("gitlab_url", 443, "http or https URL"),
        ("on_battery", "sometimes", "on_battery must be one of"),
        ("on_metered", True, "on_metered must be one of"),
        ("inhibit_sleep", "yes", "inhibit_sleep must be true or false"),
    ],
)
def test_service_toml_refuses_a_bad_condition_setting_naming_it(cli, installed, home, key, value, says):
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc.update({key: value}))
    result = cli("--json", "run", "--name", sid)
    assert result.code == ls.EXIT_STATE and result.doc["error"]["code"] == "config_invalid"
    assert says in result.doc["error"]["message"]
    assert "secret" not in result.doc["error"]["message"]


def test_a_service_toml_without_the_condition_keys_reads_with_their_defaults(cli, installed, home):
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: [doc.pop(k, None) for k in ("on_battery", "on_metered", "inhibit_sleep")])
    cfg = ls.load_config(ls.Paths(ls.System(dict(os.environ, LORE_SERVICE_HOME=str(home)))), sid)
    assert (cfg.gitlab_url, cfg.on_battery, cfg.on_metered, cfg.inhibit_sleep) == (None, "critical-only", "run", True)
    assert cli("--json", "run", "--name", sid).code == 0


def git(*argv: str, cwd: Path) -> None:
    subprocess.run(["git", *argv], cwd=cwd, check=True, capture_output=True)


def test_install_takes_gitlab_url_from_the_projects_git_remote_origin(cli, project, home, lore_bin, tmp_path):
    if shutil.which("git") is None:
        required_or_skip("git is not installed")
    git("init", "-q", cwd=project)
    git("remote", "add", "upstream", "https://github.example.org/other/p.git", cwd=project)
    git("remote", "add", "origin", "git@gitlab.example.com:acme/api.git", cwd=project)
    result = install(cli, "fake")
    assert result.code == 0, result.err
    toml = (home / "config" / result.data["service_id"] / "service.toml").read_text()
    assert 'gitlab_url = "https://gitlab.example.com"' in toml
    # a worktree has a .git file; its config is in the common git folder
    git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "--allow-empty", "-m", "x", cwd=project)
    tree = tmp_path / "tree"
    git("worktree", "add", "-q", str(tree), cwd=project)
    git("remote", "set-url", "origin", "https://gitlab.internal:8443/acme/api.git", cwd=project)
    other = install(cli, "fake", "--project", str(tree))
    assert other.code == 0, other.err
    toml = (home / "config" / other.data["service_id"] / "service.toml").read_text()
    assert 'gitlab_url = "https://gitlab.internal:8443"' in toml


def test_install_gitlab_url_flag_wins_and_none_switches_the_check_off(cli, project, home, lore_bin):
    assert install(cli, "fake", "--gitlab-url", "http://127.0.0.1:9").code == 0
    sid = ls.derive_service_id(str(project))
    config = home / "config" / sid / "service.toml"
    assert 'gitlab_url = "http://127.0.0.1:9"' in config.read_text()
    again = install(cli, "fake")  # a re-install keeps what service.toml says
    assert again.code == 0 and again.data["changed"] is False
    assert install(cli, "fake", "--gitlab-url", "none").code == 0
    assert 'gitlab_url = "none"' in config.read_text()
    assert ls.gitlab_endpoint(ls.load_config(ls.Paths(FakeSystem(cli_env(home))), sid).gitlab_url) is None


def cli_env(home: Path) -> dict[str, str]:
    return dict(os.environ, LORE_SERVICE_HOME=str(home))


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("", "empty_value"),
        ("gitlab.example.com", "bad_url"),
        ("https://oauth2:glpat-SECRET-token-value-42@gitlab.example.com", "bad_url"),
    ],
)
def test_install_refuses_a_bad_gitlab_url_before_writing_anything(cli, home, lore_bin, value, code):
    result = install(cli, "fake", "--gitlab-url", value)
    assert result.code == ls.EXIT_USAGE and result.doc["error"]["code"] == code
    assert "glpat" not in result.out + result.err
    assert not (home / "config").exists()


# -- offline ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["gitlab.example.com", "gitlab.invalid"])
def test_a_run_in_a_network_namespace_without_a_route_is_skipped_as_offline_and_never_pauses(
    tool, environ, project, home, host
):
    """The real CLI, in a namespace with only a loopback device: the name lookup
    and the connect fail there (nothing can leave it), and the run is skipped."""
    prefix = netns_prefix()
    assert tool("--json", "install", "--backend", "none", "--gitlab-url", f"https://{host}").code == 0
    runs = ls.ServiceConfig().circuit_breaker_threshold + 2  # more than the breaker would allow failures
    for _ in range(runs):
        proc = subprocess.run(
            [*prefix, *tool.program, "--json", "run"], cwd=project, env=environ, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)["data"]
        assert data["skipped"] is True and data["skip_reason"] == f"offline ({host}:443 unreachable)"
        assert data["run"]["condition"] == "offline"
    sid = ls.derive_service_id(str(project))
    st = status_file(home, sid)
    assert st["consecutive_failures"] == 0 and st["paused"] is None and st["next_retry_at_ms"] is None
    assert st["last_run"] is None and [(r["condition"], r["repeats"]) for r in st["history"]] == [("offline", runs)]
    assert f"cannot resolve {host}" in log_text(home, sid)
    assert calls(project) == []  # lore never ran
    status = tool("--json", "status")
    assert status.data["state"] == "idle" and status.data["last_skip"]["reason"] == f"offline ({host}:443 unreachable)"


def test_a_reachable_host_lets_the_run_sync_and_a_stage_failing_after_the_check_is_an_ordinary_failure(
    cli, installed, project, home, listener
):
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc.update(gitlab_url=f"http://127.0.0.1:{listener}"))
    result, data = run_json(cli, sid)
    assert result.code == 0 and data["run"]["outcome"] == "success"
    assert [c["stage"] for c in calls(project)] == ["issues", "mrs", "docs"]
    write_plan(project, {"issues": {"exit": 75}})
    result, data = run_json(cli, sid, "trigger")
    assert result.code == 1 and data["run"]["outcome"] == "failed" and data["run"]["condition"] is None
    assert status_file(home, sid)["consecutive_failures"] == 1


def test_a_closed_port_on_the_gitlab_host_is_offline_and_the_log_says_why(cli, installed, project, home):
    sid = installed["service_id"]
    port = closed_port()
    edit_config(home, sid, lambda doc: doc.update(gitlab_url=f"http://127.0.0.1:{port}"))
    result, data = run_json(cli, sid)
    assert result.code == 0 and data["skip_reason"] == f"offline (127.0.0.1:{port} unreachable)"
    assert f"offline (127.0.0.1:{port} unreachable): cannot connect to 127.0.0.1:{port}: Connection refused" in (
        log_text(home, sid)
    )
    assert calls(project) == []
    trigger = cli("--json", "trigger", "--name", sid)  # a person asked: told it did not sync
    assert trigger.code == 1 and trigger.doc["error"]["code"] == "skipped"


def test_a_host_that_never_answers_is_given_up_on_within_the_timeout():
    """A listener whose queue is full drops new connections unanswered (a host
    behind a dead link): the probe ends at its timeout, not at TCP's minutes."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        queued = socket.create_connection(("127.0.0.1", port), timeout=2)  # fills the queue
        try:
            problem = ls.System().reachable("127.0.0.1", port, 0.5)
        finally:
            queued.close()
    assert problem == f"cannot connect to 127.0.0.1:{port}: timed out"


def test_a_run_waits_at_most_three_seconds_to_learn_it_is_offline(system, installed, home, cli):
    asked: list[tuple[str, int, float]] = []

    def reachable(host: str, port: int, timeout: float) -> str:
        asked.append((host, port, timeout))
        return "cannot resolve gitlab.example.com: no answer within 3 s"

    system.reachable = reachable  # type: ignore[method-assign]
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc.update(gitlab_url="https://gitlab.example.com/gitlab"))
    assert run_json(cli, sid)[1]["run"]["condition"] == "offline"
    assert asked == [("gitlab.example.com", 443, ls.REACH_TIMEOUT_SECONDS)] and ls.REACH_TIMEOUT_SECONDS <= 3


PROXY = {"HTTPS_PROXY": "http://proxy.corp:3128"}
DIRECT = ("gitlab.example.com", 443, "")


@pytest.mark.parametrize(
    ("env", "target"),
    [
        ({}, DIRECT),
        (PROXY, ("proxy.corp", 3128, "proxy ")),
        ({"https_proxy": "proxy.corp:8080"}, ("proxy.corp", 8080, "proxy ")),
        ({"ALL_PROXY": "socks5://127.0.0.1"}, ("127.0.0.1", 1080, "proxy ")),
        ({"HTTP_PROXY": "http://proxy.corp:3128"}, DIRECT),  # not for https
        ({**PROXY, "NO_PROXY": "localhost,.example.com"}, DIRECT),
        ({**PROXY, "no_proxy": "*"}, DIRECT),
        ({**PROXY, "no_proxy": "gitlab.example.com:443"}, DIRECT),
        ({**PROXY, "no_proxy": "ample.com"}, ("proxy.corp", 3128, "proxy ")),
    ],
)
def test_behind_a_proxy_the_offline_check_connects_to_the_proxy(env, target):
    cfg = ls.ServiceConfig(gitlab_url="https://gitlab.example.com")
    assert ls.offline_target(cfg, env) == target


def test_a_run_behind_a_reachable_proxy_syncs(cli, system, installed, project, home, listener):
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc.update(gitlab_url="https://gitlab.invalid"))
    system.environ["HTTPS_PROXY"] = f"http://127.0.0.1:{listener}"
    assert run_json(cli, sid)[1]["run"]["outcome"] == "success"
    system.environ["HTTPS_PROXY"] = f"http://127.0.0.1:{closed_port()}"
    assert run_json(cli, sid)[1]["skip_reason"].startswith("offline (proxy 127.0.0.1:")


# -- battery ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("supplies", "power"),
    [
        (ON_AC, "ac"),
        (ON_BATTERY, "battery"),
        ({"BAT0": {"type": "Battery", "status": "Discharging"}}, "battery"),  # no AC supply listed at all
        ({"ucsi-source-psy-USBC000:001": {"type": "USB", "online": "1"}, **ON_BATTERY}, "ac"),  # USB-C charger
        ({"AC": {"type": "Mains", "online": "0"}, "BAT0": {"type": "Battery", "status": "Full"}}, "unknown"),
        # a desktop whose wireless mouse runs on its battery: the machine is not on battery
        ({"hid-00:1f:20:aa:bb:cc-battery": {"type": "Battery", "status": "Discharging", "scope": "Device"}}, "unknown"),
        ({}, "unknown"),
    ],
)
def test_power_source_is_read_from_the_kernels_power_supplies(tmp_path, supplies, power):
    system = FakeSystem({})
    system.sysfs_root = str(power_tree(tmp_path / "sys", supplies))
    (tmp_path / "sys" / "class" / "power_supply").mkdir(parents=True, exist_ok=True)
    assert system.power_source()[0] == power


def test_without_power_supplies_to_read_the_power_source_is_unknown_and_counts_as_ac(tmp_path):
    system = FakeSystem({})
    system.sysfs_root = str(tmp_path / "absent")
    assert system.power_source()[0] == "unknown"


def test_on_battery_the_optional_stages_are_skipped_and_the_run_still_succeeds(
    cli, system, installed, project, home, tmp_path
):
    sid = installed["service_id"]
    on_battery(system, tmp_path)
    result, data = run_json(cli, sid)
    assert result.code == 0 and data["run"]["outcome"] == "success" and data["run"]["condition"] is None
    stages = {s["stage"]: (s["outcome"], s["message"]) for s in data["run"]["stage_results"]}
    assert stages == {"issues": ("success", "ok"), "mrs": ("success", "ok"), "docs": ("skipped", "skipped: on battery")}
    assert [c["stage"] for c in calls(project)] == ["issues", "mrs"]
    st = status_file(home, sid)
    assert st["consecutive_failures"] == 0 and st["last_skip"] is None
    assert "on battery: optional stages skipped (" in log_text(home, sid)
    assert "power_supply/BAT0 is discharging)" in log_text(home, sid)
    assert cli("--json", "status", "--name", sid).data["state"] == "healthy"
    assert "issues success, mrs success, docs skipped (on battery)" in cli("status", "--name", sid).out


@pytest.mark.parametrize(("policy", "ran"), [("skip", []), ("run", ["issues", "mrs", "docs"])])
def test_on_battery_skip_skips_the_whole_run_and_run_does_not_look(
    cli, system, installed, project, home, tmp_path, policy, ran
):
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc.update(on_battery=policy))
    on_battery(system, tmp_path)
    result, data = run_json(cli, sid)
    assert result.code == 0
    assert [c["stage"] for c in calls(project)] == ran
    if policy == "skip":
        assert data["skipped"] is True and data["skip_reason"] == "on battery"
        assert data["run"]["condition"] == "on_battery"
        assert status_file(home, sid)["consecutive_failures"] == 0


def test_a_profile_without_optional_stages_never_asks_for_the_power_source(cli, system, installed, home):
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc.update(profile="fast"))
    asked: list[int] = []
    system.power_source = lambda: asked.append(1) or ("battery", "test")  # type: ignore[method-assign]
    assert run_json(cli, sid)[1]["run"]["outcome"] == "success"
    assert asked == []


def test_critical_only_on_a_profile_with_no_critical_stage_skips_the_whole_run(cli, system, installed, home, tmp_path):
    sid = installed["service_id"]

    def all_optional(doc: dict) -> None:
        for stage in doc["stages"].values():
            stage["critical"] = False

    edit_config(home, sid, all_optional)
    on_battery(system, tmp_path)
    data = run_json(cli, sid)[1]
    assert data["skipped"] is True and data["run"]["condition"] == "on_battery"


@pytest.mark.parametrize(
    ("name", "power"),
    [("battery.txt", "battery"), ("ac_charging.txt", "ac"), ("desktop.txt", "ac"), ("ups.txt", "battery")],
)
def test_power_source_on_macos_comes_from_pmset(environ, name, power):
    mac = MacSystem(environ)
    mac.respond(["pmset", "-g", "ps"], res(0, fixture_text("pmset", name)))
    assert mac.power_source()[0] == power
    assert ["pmset", "-g", "ps"] in mac.commands
    mac.respond(["pmset", "-g", "ps"], res(1, "", "pmset: command failed"))
    assert mac.power_source() == ("unknown", "pmset: pmset: command failed")


def power_status(line: int, flag: int, percent: int) -> bytes:
    """SYSTEM_POWER_STATUS as GetSystemPowerStatus fills it (12 bytes, little-endian)."""
    return struct.pack("<BBBBII", line, flag, percent, 0, 0xFFFFFFFF, 0xFFFFFFFF)


@pytest.mark.parametrize(
    ("raw", "power"),
    [
        (power_status(1, 8, 91), "ac"),  # on mains, charging
        (power_status(0, 0, 57), "battery"),
        (power_status(0, 2, 12), "battery"),  # low
        (power_status(1, 128, 255), "ac"),  # a desktop: no system battery
        (power_status(255, 255, 255), "unknown"),
        (power_status(0, 128, 255), "unknown"),  # offline line, but no battery: contradictory
        (b"\x00\x00", "unknown"),
    ],
)
def test_power_source_on_windows_comes_from_system_power_status(environ, raw, power):
    class PoweredWin(WinSystem):
        def windows_power_status(self) -> bytes | None:
            return raw

    assert PoweredWin(environ).power_source()[0] == power


def test_on_windows_the_battery_percent_is_shown():
    assert ls.power_from_power_status(power_status(0, 0, 57)) == ("battery", "GetSystemPowerStatus: on battery (57%)")


# -- metered ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "metered"),
    [
        ("wifi_metered_guessed.txt", True),
        ("ethernet_and_tether.txt", False),  # the traffic has an unmetered way out
        ("wifi_explicit_no.txt", False),
        ("offline.txt", None),
    ],
)
def test_metered_is_what_networkmanager_says_of_the_connected_devices(system, name, metered):
    nmcli_says(system, name)
    assert system.metered()[0] is metered
    assert system.commands[-1] == ls.NMCLI_METERED


def test_without_networkmanager_metered_is_unknown(system):
    system.which_map["nmcli"] = None
    assert system.metered() == (None, "no NetworkManager: nmcli not found")
    system.which_map["nmcli"] = "/usr/bin/nmcli"
    system.respond(["nmcli"], res(8, "", "Error: NetworkManager is not running."))
    assert system.metered() == (None, "nmcli: Error: NetworkManager is not running.")


@pytest.mark.parametrize(
    ("answer", "metered"),
    [("Fixed\r\n", True), ("Variable\n", True), ("Unrestricted\n", False), ("Unknown\n", None), ("", None)],
)
def test_metered_on_windows_is_the_internet_connection_profiles_cost(environ, answer, metered):
    win = WinSystem(environ)
    win.respond(["powershell.exe"], res(0, answer))
    assert win.metered()[0] is metered
    assert win.commands[-1][0] == "powershell.exe" and "GetConnectionCost" in win.commands[-1][-1]


def test_metered_is_unknown_on_macos(environ):
    assert MacSystem(environ).metered()[0] is None


def test_on_metered_critical_only_and_skip(cli, system, installed, project, home):
    sid = installed["service_id"]
    nmcli_says(system, "wifi_metered_guessed.txt")
    assert run_json(cli, sid)[1]["run"]["outcome"] == "success"  # default "run": not even asked
    assert ls.NMCLI_METERED not in system.commands
    edit_config(home, sid, lambda doc: doc.update(on_metered="critical-only"))
    data = run_json(cli, sid)[1]
    docs = data["run"]["stage_results"][2]
    assert (docs["outcome"], docs["message"]) == ("skipped", "skipped: metered connection")
    edit_config(home, sid, lambda doc: doc.update(on_metered="skip"))
    data = run_json(cli, sid)[1]
    assert data["run"]["condition"] == "metered" and data["skip_reason"] == "metered connection"


def test_a_whole_run_skip_wins_over_optional_stages_held_back(cli, system, installed, project, home, tmp_path):
    """On battery (critical-only) and metered (skip): the run is skipped as metered."""
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc.update(on_metered="skip"))
    on_battery(system, tmp_path)
    nmcli_says(system, "wifi_metered_guessed.txt")
    data = run_json(cli, sid)[1]
    assert data["run"]["condition"] == "metered" and calls(project) == []


# -- sleep inhibitor ------------------------------------------------------------------------------


def test_the_sleep_inhibitor_command_lines():
    linux = ls.sleep_inhibitor_argv("linux", 4242, "lore sync of svc in progress")
    assert linux[:5] == [
        "systemd-inhibit",
        "--what=sleep",
        "--who=lore-service",
        "--why=lore sync of svc in progress",
        "--mode=block",
    ]
    assert linux[5:7] == ["sh", "-c"] and "exec cat" in linux[7]
    assert ls.sleep_inhibitor_argv("darwin", 4242, "why") == ["caffeinate", "-i", "-w", "4242"]
    assert ls.sleep_inhibitor_argv("win32", 4242, "why") is None


FAKE_INHIBIT = """#!/bin/sh
# systemd-inhibit as far as a run can tell: it records its options and pid, then
# runs the command (the real one does so once logind granted the lock)
printf '%s\\n' "$$" > "$FAKE_INHIBIT_DIR/pid"
for arg in "$@"; do printf '%s\\n' "$arg"; done > "$FAKE_INHIBIT_DIR/argv"
while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
exec "$@"
"""

REFUSING_INHIBIT = """#!/bin/sh
echo "Failed to inhibit: Access denied" >&2
exit 1
"""


def fake_program(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def inhibit_on_path(environ: dict[str, str], tmp_path: Path, name: str, script: str) -> Path:
    """`script` as the systemd-inhibit first on PATH (tmp_path/<name>-bin); the
    folder FAKE_INHIBIT_DIR names for its records (tmp_path/<name>)."""
    fake_program(tmp_path / f"{name}-bin", "systemd-inhibit", script)
    records = tmp_path / name
    records.mkdir()
    environ["PATH"] = f"{tmp_path / f'{name}-bin'}{os.pathsep}{environ['PATH']}"
    environ["FAKE_INHIBIT_DIR"] = str(records)
    return records


@pytest.fixture
def fake_inhibit(environ, tmp_path) -> Path:
    """A systemd-inhibit first on PATH; its records go to the folder returned."""
    return inhibit_on_path(environ, tmp_path, "inhibit", FAKE_INHIBIT)


def inhibitor_pid(records: Path) -> int | None:
    path = records / "pid"
    return int(path.read_text()) if path.exists() and path.read_text().strip() else None


def test_the_inhibitor_is_held_while_the_stages_run_and_gone_after_a_failed_run(
    cli, installed, project, home, fake_inhibit
):
    sid = installed["service_id"]
    write_plan(project, {"issues": {"exit": 75}})
    result = cli("--json", "trigger", "--name", sid)
    assert result.code == 1 and result.data["run"]["outcome"] == "failed"
    pid = inhibitor_pid(fake_inhibit)
    assert pid is not None and not pid_alive(pid)
    argv = (fake_inhibit / "argv").read_text().splitlines()
    assert argv[:3] == ["--what=sleep", "--who=lore-service", f"--why=lore sync of {sid} in progress"]
    assert "sleep inhibitor unavailable" not in log_text(home, sid)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_inhibitor_does_not_outlive_a_run_that_is_killed(tool, environ, project, fake_inhibit, how):
    runner, stage_pid, grandchild = start_hanging_run(tool, environ, project, "run")
    try:
        wait_until(lambda: inhibitor_pid(fake_inhibit) is not None, 10)
        pid = inhibitor_pid(fake_inhibit)
        assert pid is not None and pid_alive(pid)  # held while the stage runs
        runner.send_signal(how)
        runner.wait(timeout=30)
        wait_for_exit(pid)
        assert not pid_alive(pid)
    finally:
        for leftover in (stage_pid, grandchild):  # a SIGKILLed run leaves its stage to the next run
            try:
                os.kill(leftover, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if how == signal.SIGTERM:
        assert runner.returncode == 1


def test_an_inhibitor_that_is_refused_never_fails_the_run(cli, installed, project, home, environ, tmp_path):
    inhibit_on_path(environ, tmp_path, "refusing", REFUSING_INHIBIT)
    sid = installed["service_id"]
    assert run_json(cli, sid)[1]["run"]["outcome"] == "success"
    assert (
        "sleep inhibitor unavailable (systemd-inhibit: Failed to inhibit: Access denied); the run goes on without it"
        in log_text(home, sid)
    )
    check = doctor_checks(cli, "--name", sid)["sleep inhibitor"]
    assert check["status"] == "warn" and "Access denied" in check["message"]
    assert "inhibit_sleep = false" in check["hint"]


def test_inhibit_sleep_false_starts_no_inhibitor(cli, installed, project, home, fake_inhibit):
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc.update(inhibit_sleep=False))
    assert run_json(cli, sid)[1]["run"]["outcome"] == "success"
    assert inhibitor_pid(fake_inhibit) is None
    check = doctor_checks(cli, "--name", sid)["sleep inhibitor"]
    assert check["status"] == "ok" and "inhibit_sleep = false" in check["message"]


def logind_answers() -> bool:
    tool = shutil.which("systemd-inhibit")
    return tool is not None and subprocess.run([tool, "--list"], capture_output=True).returncode == 0


def test_where_logind_does_not_answer_doctor_says_so_and_the_run_still_succeeds(cli, installed, home):
    """The real systemd-inhibit, on a machine without logind (a container, as here)."""
    if shutil.which("systemd-inhibit") is None or logind_answers():
        pytest.skip("needs systemd-inhibit without a logind that answers")
    sid = installed["service_id"]
    assert run_json(cli, sid)[1]["run"]["outcome"] == "success"
    assert "sleep inhibitor unavailable (systemd-inhibit: " in log_text(home, sid)
    check = doctor_checks(cli, "--name", sid)["sleep inhibitor"]
    assert check["status"] == "warn" and check["message"].startswith("unavailable (systemd-inhibit: ")


def test_the_real_systemd_inhibit_holds_a_sleep_lock_while_the_stages_run(tool, environ, project):
    if not logind_answers():
        pytest.skip("logind does not answer here (no system bus or no systemd-logind)")
    runner, stage_pid, grandchild = start_hanging_run(tool, environ, project, "run")
    try:

        def listed() -> str:
            return subprocess.run(["systemd-inhibit", "--list"], capture_output=True, text=True).stdout

        wait_until(lambda: "lore-service" in listed(), 10)
        assert "lore-service" in listed() and "sleep" in listed()
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
        wait_until(lambda: "lore-service" not in listed(), 10)
        assert "lore-service" not in listed()
    finally:
        for leftover in (stage_pid, grandchild):
            try:
                os.kill(leftover, signal.SIGKILL)
            except ProcessLookupError:
                pass


FAKE_CAFFEINATE = """#!/bin/sh
# caffeinate -i -w PID as far as a run can tell: records its argv (written aside
# and renamed, so the test never reads it half written) and waits
printf '%s\\n' "$$" "$@" > "$FAKE_INHIBIT_DIR/caffeinate.tmp"
mv "$FAKE_INHIBIT_DIR/caffeinate.tmp" "$FAKE_INHIBIT_DIR/caffeinate"
exec sleep 3600
"""


def test_on_macos_caffeinate_waits_on_the_runs_pid_and_ends_at_release(environ, tmp_path):
    folder = fake_program(tmp_path / "mac-bin", "caffeinate", FAKE_CAFFEINATE).parent
    records = tmp_path / "records"
    records.mkdir()
    environ["FAKE_INHIBIT_DIR"] = str(records)
    mac = MacSystem(environ)
    mac.which_map["caffeinate"] = str(folder / "caffeinate")
    hold = mac.inhibit_sleep("why")
    try:
        assert hold.held and hold.how == "caffeinate"
        wait_until((records / "caffeinate").exists, 10)
        pid, *argv = (records / "caffeinate").read_text().splitlines()
        assert argv == ["-i", "-w", str(os.getpid())] and pid_alive(int(pid))
    finally:
        hold.release()
    wait_for_exit(int(pid))
    assert not pid_alive(int(pid))
    hold.release()  # twice is harmless


def test_on_windows_the_run_asks_set_thread_execution_state_and_gives_it_back(environ):
    class AwakeWin(WinSystem):
        calls: list[int] = []

        def set_thread_execution_state(self, flags: int) -> int:
            self.calls.append(flags)
            return 0x80000000

    win = AwakeWin(environ)
    hold = win.inhibit_sleep("why")
    assert hold.held and win.calls == [ls.ES_CONTINUOUS | ls.ES_SYSTEM_REQUIRED]
    hold.release()
    assert win.calls == [0x80000001, 0x80000000]
    refused = WinSystem(environ)  # not on Windows: the call is unavailable
    assert not refused.inhibit_sleep("why").held


# -- doctor -------------------------------------------------------------------------------------


def test_doctor_shows_what_the_conditions_see(cli, system, installed, home, tmp_path, listener):
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc.update(gitlab_url=f"http://127.0.0.1:{listener}"))
    on_battery(system, tmp_path)
    nmcli_says(system, "ethernet_and_tether.txt")
    checks = doctor_checks(cli, "--name", sid)
    assert checks["gitlab reachable"]["status"] == "ok"
    assert checks["gitlab reachable"]["message"].startswith(f"127.0.0.1:{listener} answers")
    assert checks["power"]["message"].startswith(f"on battery ({tmp_path}/sys/class/power_supply/BAT0 is discharging)")
    assert "docs and embeddings wait" in checks["power"]["message"]
    assert checks["metered"]["message"].startswith("not metered (NetworkManager: enp0s31f6, usb0")
    assert checks["sleep inhibitor"]["status"] in ("ok", "warn")
    edit_config(home, sid, lambda doc: doc.update(gitlab_url=f"http://127.0.0.1:{closed_port()}"))
    check = doctor_checks(cli, "--name", sid)["gitlab reachable"]
    assert check["status"] == "warn" and "runs are skipped as offline" in check["message"]


def test_doctor_says_when_no_gitlab_host_is_known_and_how_to_give_one(cli, installed, home):
    sid = installed["service_id"]
    check = doctor_checks(cli, "--name", sid)["gitlab reachable"]
    assert check["status"] == "warn" and "no GitLab host known" in check["message"]
    assert "--gitlab-url" in check["hint"]
    edit_config(home, sid, lambda doc: doc.update(gitlab_url="none"))
    check = doctor_checks(cli, "--name", sid)["gitlab reachable"]
    assert check["status"] == "ok" and "not checked" in check["message"]


def test_doctor_before_install_shows_what_the_conditions_would_see(cli, project, listener):
    if shutil.which("git") is None:
        required_or_skip("git is not installed")
    git("init", "-q", cwd=project)
    git("remote", "add", "origin", f"http://127.0.0.1:{listener}/acme/api.git", cwd=project)
    result = cli("--json", "doctor")
    assert result.data["service_id"] is None
    checks = {c["name"]: c for c in result.data["checks"]}
    assert checks["gitlab reachable"]["status"] == "ok"
    assert (
        checks["gitlab reachable"]["message"]
        == f"127.0.0.1:{listener} answers (gitlab_url http://127.0.0.1:{listener})"
    )
    assert {"power", "metered", "sleep inhibitor"} <= set(checks)


SLOW_INHIBIT = """#!/bin/sh
# systemd-inhibit while logind takes its time: the lock comes once the test says so
printf '%s\\n' "$$" > "$FAKE_INHIBIT_DIR/pid"
while [ ! -e "$FAKE_INHIBIT_DIR/go" ]; do sleep 0.05; done
while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
exec "$@"
"""


def test_a_run_stopped_while_it_takes_the_inhibitor_is_still_recorded(tool, environ, project, home, tmp_path):
    records = inhibit_on_path(environ, tmp_path, "slow", SLOW_INHIBIT)
    assert tool("--json", "install", "--backend", "none").code == 0
    runner = subprocess.Popen([*tool.program, "--json", "run"], cwd=project, env=environ, stdout=subprocess.PIPE)
    wait_until(lambda: inhibitor_pid(records) is not None, 10)
    pid = inhibitor_pid(records)
    assert pid is not None
    runner.send_signal(signal.SIGTERM)
    (records / "go").touch()
    out, _ = runner.communicate(timeout=30)
    assert runner.returncode == 1
    first = json.loads(out)["data"]["run"]["stage_results"][0]
    assert first["outcome"] == "failed" and "stopped by signal 15 before it started" in first["message"]
    assert calls(project) == []
    wait_for_exit(pid)
    assert not pid_alive(pid)


def test_a_home_folder_kept_in_git_says_nothing_about_a_project_under_it(cli, environ, home, lore_bin, tmp_path):
    if shutil.which("git") is None:
        required_or_skip("git is not installed")
    user_home = Path(environ["HOME"])
    git("init", "-q", cwd=user_home)
    git("remote", "add", "origin", "git@github.example.org:me/dotfiles.git", cwd=user_home)
    project = user_home / "src" / "api"
    project.mkdir(parents=True)
    result = install(cli, "fake", "--project", str(project))
    assert result.code == 0, result.err
    assert "gitlab_url = " not in (home / "config" / result.data["service_id"] / "service.toml").read_text()
    git("init", "-q", cwd=project / "..")  # a repository between the project and home is the project's
    git("remote", "add", "origin", "https://gitlab.example.com/acme/src.git", cwd=project / "..")
    assert ls.git_origin_url(str(project), str(user_home)) == "https://gitlab.example.com/acme/src.git"


def test_a_run_whose_optional_stages_wait_on_battery_still_needs_a_run_slot(
    cli, system, installed, project, home, tmp_path
):
    write_settings(home, "max_concurrent_runs = 1\nbusy_wait_seconds = 0\n")
    on_battery(system, tmp_path)
    held = [hold_slot(system, 0, "svc-a")]  # another service's run holds the only slot
    data = run_while_held(cli, system, held, "run", "--name", installed["service_id"]).data
    assert data["run"]["condition"] == "host_busy" and calls(project) == []
    data = run_json(cli, installed["service_id"])[1]
    assert data["run"]["outcome"] == "success" and [c["stage"] for c in calls(project)] == ["issues", "mrs"]
