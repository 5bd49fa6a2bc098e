"""The systemd backend through the injected System: unit text, command
sequences, prerequisites and state parsing. (The real manager is in
test_systemd_e2e.py.)"""

from __future__ import annotations

import json
import os

import pytest
from conftest import TOKEN, FakeSystem, commands_during, doctor_checks, edit_config, install, res, systemd_user_manager

import lore_service as ls

EVERY_45M = ("--interval", "45m")


@pytest.fixture
def linux(system: FakeSystem, monkeypatch: pytest.MonkeyPatch) -> FakeSystem:
    return systemd_user_manager(system, monkeypatch)


def units(system: FakeSystem, sid: str) -> tuple[str, str]:
    base = f"{system.environ['HOME']}/.config/systemd/user/lore-sync-{sid}"
    return open(base + ".service").read(), open(base + ".timer").read()


def test_install_writes_hardened_units_and_enables_the_timer(cli, linux, project, home):
    r = install(cli, "systemd", *EVERY_45M)
    assert r.code == 0, r.out
    sid = r.data["service_id"]
    service, timer = units(linux, sid)
    for directive in (
        "Type=oneshot",
        "TimeoutStartSec=900",
        "NoNewPrivileges=true",
        "PrivateTmp=true",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateUsers=true",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "RestrictNamespaces=true",
        "LockPersonality=true",
        "MemoryDenyWriteExecute=true",
        "UMask=0077",
        "IOSchedulingClass=idle",
        "Nice=10",
    ):
        assert f"\n{directive}\n" in service, directive
    assert f'"{home}/state/{sid}"' in service and f'"{home}/logs/{sid}"' in service
    assert f'"{project}"' in service
    for directive in ("OnStartupSec=5min", "OnUnitActiveSec=45min", "WantedBy=timers.target"):
        assert f"\n{directive}\n" in timer
    assert "RandomizedDelaySec=" in timer
    assert TOKEN not in service + timer
    assert [c for c in linux.commands if c[:2] == ["systemctl", "--user"] and c[2] in ("daemon-reload", "enable")] == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", f"lore-sync-{sid}.timer"],
    ]
    manifest = json.loads((home / "config" / sid / "manifest.json").read_text())
    assert manifest["schedule_step_seconds"] == 2700


def test_exec_start_quotes_every_argument_by_systemd_rules():
    assert ls.systemd_quote('/p/it\'s "x" $HOME 100% ;é') == '"/p/it\'s \\"x\\" $$HOME 100%% ;é"'
    assert ls.systemd_quote("a\\b") == '"a\\\\b"'
    assert ls.systemd_quote("$X", variables=False) == '"$X"'


def test_extra_write_paths_from_config_are_allowed_after_reinstall(cli, linux, home):
    sid = install(cli, "systemd", *EVERY_45M).data["service_id"]
    edit_config(home, sid, lambda doc: doc.update(extra_write_paths=["/srv/lore db"]))
    assert install(cli, "systemd", *EVERY_45M).code == 0
    service, _ = units(linux, sid)
    assert '-"/srv/lore db"' in service


def test_the_unit_lets_runs_write_the_shared_run_slots_which_install_creates(cli, linux, home):
    sid = install(cli, "systemd", *EVERY_45M).data["service_id"]
    service, _ = units(linux, sid)
    rw = next(line for line in service.splitlines() if line.startswith("ReadWritePaths="))
    assert f'-"{home}/state/.slots"' in rw.split()  # "-": a folder deleted since cannot keep the unit from starting
    assert (home / "state" / ".slots").is_dir() and (home / "state" / ".slots").stat().st_mode & 0o777 == 0o700


def test_embedded_token_is_in_the_unit_only_when_asked_and_redacted_in_dry_run(cli, linux):
    dry = install(cli, "systemd", *EVERY_45M, "--token-source", "embedded", "--dry-run")
    assert TOKEN not in dry.out
    assert any(ls.SECRET_PLACEHOLDER in f["content"] for f in dry.data["files"] if f["path"].endswith(".service"))
    real = install(cli, "systemd", *EVERY_45M, "--token-source", "embedded")
    assert real.code == 0 and TOKEN not in real.out
    assert any("plain text" in w for w in real.data["warnings"])
    service, _ = units(linux, real.data["service_id"])
    assert f'Environment="GITLAB_TOKEN={TOKEN}"' in service
    # the token in the unit is not drift
    status = cli("--json", "status").data
    assert status["scheduler"]["drift"] == [] or all("not active" in d for d in status["scheduler"]["drift"])


def test_no_user_manager_names_the_missing_variables_and_exits_6(cli, system):
    system.which_map["systemctl"] = "/usr/bin/systemctl"
    system.respond(
        ["systemctl", "--user", "is-system-running"],
        res(1, "", "Failed to connect to bus: No medium found\n"),
    )
    r = install(cli, "systemd", *EVERY_45M)
    assert r.code == 6
    assert "XDG_RUNTIME_DIR" in r.doc["error"]["message"] and "cron" in r.doc["error"]["hint"]
    assert not any(c[2:3] == ["enable"] for c in system.commands if c[:2] == ["systemctl", "--user"])


def test_system_not_booted_with_systemd_is_explained(cli, system):
    system.which_map["systemctl"] = "/usr/bin/systemctl"
    system.environ["XDG_RUNTIME_DIR"] = "/run/user/0"
    system.respond(["systemctl", "--user", "is-system-running"], res(1, "offline\n"))
    r = install(cli, "systemd", *EVERY_45M)
    assert r.code == 6 and "not booted with systemd" in r.doc["error"]["message"]


def test_too_old_systemd_is_a_prerequisite_failure(cli, linux):
    linux.respond(["systemctl", "--user", "--no-pager", "--version"], res(0, "systemd 239\n"))
    r = install(cli, "systemd", *EVERY_45M)
    assert r.code == 6 and "older than 247" in r.doc["error"]["message"]


@pytest.mark.parametrize(
    ("answer", "status", "words"),
    [
        (res(0, "no\n"), "warn", "only fires while"),
        (res(0, "yes\n"), "ok", "lingering is on"),
        (res(1, "", "Failed to connect to bus: No such file or directory\n"), "warn", "unknown"),
    ],
)
def test_lingering_is_reported_with_its_fix(cli, linux, answer, status, words):
    linux.respond(["loginctl"], answer)
    install(cli, "systemd", *EVERY_45M)
    checks = doctor_checks(cli)
    assert checks["lingering"]["status"] == status and words in checks["lingering"]["message"]
    if status == "warn":
        assert "loginctl enable-linger" in checks["lingering"]["hint"]


def test_status_reads_systemd_properties_not_human_text(cli, linux):
    sid = install(cli, "systemd", *EVERY_45M).data["service_id"]
    timer, service = f"lore-sync-{sid}.timer", f"lore-sync-{sid}.service"
    # one `show` for both units, a blank line between their blocks (as systemctl prints them)
    linux.respond(
        ["systemctl", "--user", "--no-pager", "show", timer, service],
        res(
            0,
            "LoadState=loaded\nActiveState=active\nSubState=waiting\nUnitFileState=enabled\n\n"
            "Result=success\nExecMainStatus=0\nExecMainExitTimestamp=@1795825944\nActiveState=inactive\n",
        ),
    )
    linux.respond(
        ["systemctl", "--user", "--no-pager", "list-timers"],
        res(
            0,
            json.dumps(
                [
                    {
                        "next": 1795827886249867,
                        "left": 1,
                        "last": 1795825943722908,
                        "passed": 1,
                        "unit": timer,
                        "activates": service,
                    }
                ]
            ),
        ),
    )
    with commands_during(linux) as ran:
        sched = cli("--json", "status").data["scheduler"]
    asked = [c[3] for c in ran if c[0] == "systemctl"]
    assert asked == ["show", "list-timers"]  # both units in one show
    assert sched["registered"] and sched["active"] and sched["drift"] == []
    assert sched["next_run_iso"] == ls.iso_from_ms(1795827886249)
    assert sched["last_trigger_iso"] == ls.iso_from_ms(1795825943722)
    assert sched["last_result"] == "success" and sched["last_exit_status"] == 0
    assert sched["last_finished_iso"] == ls.iso_from_ms(1795825944000)
    assert sched["linger"] is None  # no logind records here
    os.makedirs(linux.linger_dir)
    assert cli("--json", "status").data["scheduler"]["linger"] is False
    open(os.path.join(linux.linger_dir, linux.username()), "w").close()  # what `loginctl enable-linger` leaves
    assert cli("--json", "status").data["scheduler"]["linger"] is True
    from test_schemas import validate

    validate(cli("--json", "status").data, "status-output.schema.json")


def test_missing_or_edited_units_are_drift_and_doctor_fails(cli, linux):
    sid = install(cli, "systemd", *EVERY_45M).data["service_id"]
    linux.respond(
        ["systemctl", "--user", "--no-pager", "show"],
        res(0, "LoadState=loaded\nActiveState=active\nUnitFileState=enabled\n"),
    )
    base = f"{linux.environ['HOME']}/.config/systemd/user/lore-sync-{sid}"
    with open(base + ".timer", "a") as fh:
        fh.write("# edited\n")
    import os

    os.unlink(base + ".service")
    drift = cli("--json", "status").data["scheduler"]["drift"]
    assert any("missing" in d for d in drift) and any("differs" in d for d in drift)
    assert cli("--json", "doctor").code == 1
    assert install(cli, "systemd", *EVERY_45M).code == 0
    assert cli("--json", "status").data["scheduler"]["drift"] == []


def test_uninstall_disables_removes_and_reloads(cli, linux):
    sid = install(cli, "systemd", *EVERY_45M).data["service_id"]
    linux.commands.clear()
    assert cli("--json", "uninstall").code == 0
    sequence = [c for c in linux.commands if c[:2] == ["systemctl", "--user"]]
    assert sequence == [
        ["systemctl", "--user", "--no-pager", "disable", "--now", f"lore-sync-{sid}.timer"],
        ["systemctl", "--user", "--no-pager", "daemon-reload"],
    ]
    import os

    assert not os.path.exists(f"{linux.environ['HOME']}/.config/systemd/user/lore-sync-{sid}.service")


def test_paths_under_tmp_are_refused_because_private_tmp_hides_them(cli, system):
    system.which_map["systemctl"] = "/usr/bin/systemctl"
    system.respond(["systemctl", "--user", "is-system-running"], res(0, "running\n"))
    system.respond(["systemctl", "--user", "--no-pager", "--version"], res(0, "systemd 252\n"))
    r = install(cli, "systemd", *EVERY_45M)
    assert r.code == 6 and "temporary folder" in r.doc["error"]["message"]
    assert "--backend cron" in r.doc["error"]["hint"]


def test_uninstall_disables_the_timer_even_when_its_files_were_deleted_by_hand(cli, linux):
    import os

    sid = install(cli, "systemd", *EVERY_45M).data["service_id"]
    for suffix in (".service", ".timer"):
        os.unlink(f"{linux.environ['HOME']}/.config/systemd/user/lore-sync-{sid}{suffix}")
    linux.commands.clear()
    assert cli("--json", "uninstall").code == 0
    assert ["systemctl", "--user", "--no-pager", "disable", "--now", f"lore-sync-{sid}.timer"] in linux.commands


@pytest.mark.parametrize(("interval", "step"), [("5m", 300), ("45m", 2700), ("1h", 3600), ("2h", 3600), ("24h", 3600)])
def test_long_intervals_fire_hourly_so_a_nightly_shutdown_cannot_starve_them(cli, linux, home, interval, step):
    r = install(cli, "systemd", "--interval", interval)
    assert r.code == 0 and r.data["schedule_step_seconds"] == step
    _, timer = units(linux, r.data["service_id"])
    assert f"\nOnUnitActiveSec={ls.systemd_seconds(step)}\n" in timer and "\nOnStartupSec=5min\n" in timer


def test_non_default_xdg_folders_are_pinned_in_the_unit(cli, linux, home, tmp_path):
    del linux.environ["LORE_SERVICE_HOME"]
    linux.environ["XDG_STATE_HOME"] = str(tmp_path / "state-elsewhere")
    r = install(cli, "systemd")
    assert r.code == 0, r.out
    service, _ = units(linux, r.data["service_id"])
    assert f'Environment="XDG_STATE_HOME={tmp_path / "state-elsewhere"}"' in service
    assert "XDG_CONFIG_HOME" not in service  # defaults need no pin


def test_timeout_follows_a_larger_run_budget(cli, linux, home):
    sid = install(cli, "systemd", *EVERY_45M).data["service_id"]
    edit_config(home, sid, lambda doc: doc.update(run_budget_seconds=3600))
    assert install(cli, "systemd", *EVERY_45M).code == 0
    service, _ = units(linux, sid)
    assert "\nTimeoutStartSec=3660\n" in service


def test_environment_lines_keep_a_dollar_as_written(cli, linux, home, tmp_path):
    """Environment= expands specifiers but no $VARIABLES (systemd.exec), so a
    `$` is written once while `%` is still doubled."""
    del linux.environ["LORE_SERVICE_HOME"]
    odd = tmp_path / "st$ate 100%"
    linux.environ["XDG_STATE_HOME"] = str(odd)
    linux.environ["GITLAB_TOKEN"] = "glpat-$HOME-x"
    r = install(cli, "systemd", *EVERY_45M, "--token-source", "embedded")
    assert r.code == 0, r.out
    service, _ = units(linux, r.data["service_id"])
    assert f'Environment="XDG_STATE_HOME={tmp_path}/st$ate 100%%"' in service
    assert 'Environment="GITLAB_TOKEN=glpat-$HOME-x"' in service


def test_embedded_token_with_pinned_folders_is_not_drift(cli, linux, home, tmp_path):
    del linux.environ["LORE_SERVICE_HOME"]
    linux.environ["XDG_CONFIG_HOME"] = str(tmp_path / "cfg")
    sid = install(cli, "systemd", *EVERY_45M, "--token-source", "embedded").data["service_id"]
    linux.respond(
        ["systemctl", "--user", "--no-pager", "show", f"lore-sync-{sid}.timer"],
        res(0, "LoadState=loaded\nActiveState=active\nSubState=waiting\nUnitFileState=enabled\n"),
    )
    assert cli("--json", "status").data["scheduler"]["drift"] == []
    assert cli("--json", "doctor").code == 0


def test_a_running_but_disabled_timer_is_drift(cli, linux):
    sid = install(cli, "systemd", *EVERY_45M).data["service_id"]
    linux.respond(
        ["systemctl", "--user", "--no-pager", "show", f"lore-sync-{sid}.timer"],
        res(0, "LoadState=loaded\nActiveState=active\nSubState=waiting\nUnitFileState=disabled\n"),
    )
    sched = cli("--json", "status").data["scheduler"]
    assert sched["registered"] is False and sched["drift"] == [f"lore-sync-{sid}.timer is not enabled (disabled)"]


@pytest.mark.parametrize("hidden", ["config", "stage"])
def test_config_and_stage_programs_hidden_by_private_tmp_are_refused(cli, linux, tmp_path, monkeypatch, hidden):
    """The run also reads its config and token and starts the stages: none of
    them may sit where the unit's private /tmp hides them."""
    shadow = tmp_path / "shadowed"
    shadow.mkdir()
    monkeypatch.setattr(ls.SystemdBackend, "hidden_roots", (str(shadow),))
    extra: list[str] = []
    if hidden == "config":
        del linux.environ["LORE_SERVICE_HOME"]
        linux.environ["XDG_CONFIG_HOME"] = str(shadow / "cfg")
    else:
        lore = shadow / "lore"
        lore.write_text("#!/bin/sh\n")
        lore.chmod(0o755)
        extra = ["--lore", str(lore)]
    r = install(cli, "systemd", *EVERY_45M, *extra)
    assert r.code == 6 and str(shadow) in r.doc["error"]["message"], r.out
