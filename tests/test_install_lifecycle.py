"""install / re-install / uninstall as a user meets them: idempotent,
updates in place, never leaks the token, dry-run touches nothing."""

from __future__ import annotations

import json
import os
import sys

from conftest import TOKEN, edit_config, res

import lore_service as ls


def snapshot(root) -> dict[str, tuple[bytes, int]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            with open(path, "rb") as fh:
                out[path] = (fh.read(), st.st_mtime_ns)
    return out


def test_dry_run_writes_and_runs_nothing_and_redacts_the_token(cli, home, system, project):
    r = cli("--json", "install", "--backend", "fake", "--dry-run")
    assert r.code == 0 and r.data["dry_run"] is True
    assert not home.exists()
    assert system.commands == []
    assert TOKEN not in r.out
    paths = [f["path"] for f in r.data["files"]]
    assert any(p.endswith("manifest.json") for p in paths) and any(p.endswith("service.toml") for p in paths)
    env_file = next(f for f in r.data["files"] if f["path"].endswith("token.env"))
    assert env_file["content"] == f"GITLAB_TOKEN={ls.SECRET_PLACEHOLDER}\n" and env_file["mode"] == "0600"
    assert r.data["commands"] == [["fake-scheduler", "register", r.data["service_id"]]]


def test_dry_run_names_what_is_missing_where_nothing_is_available(cli, system, home):
    system.which_map.update({"lore": None, "systemctl": None, "crontab": None})
    for tool in ("systemctl", "crontab"):
        system.respond([tool], res(127, "", f"{tool}: command not found"))
    system.environ.pop("GITLAB_TOKEN")
    r = cli("--json", "install", "--dry-run")
    assert r.code == 0
    missing = " ".join(r.data["missing"])
    assert "lore" in missing and "token" in missing and "scheduler" in missing
    assert not home.exists()


def test_reinstall_with_same_options_changes_nothing(cli, installed, home, system):
    before = snapshot(home)
    system.commands.clear()
    again = cli("--json", "install", "--backend", "fake", "--interval", "30m")
    assert again.code == 0 and again.data["changed"] is False
    assert snapshot(home) == before


def test_reinstall_with_new_options_updates_in_place_and_keeps_status_and_edits(cli, installed, home, project):
    sid = installed["service_id"]
    cli("--json", "trigger")
    edit_config(home, sid, lambda doc: doc["stages"]["docs"].update(timeout_seconds=42))
    status_before = (home / "state" / sid / "status.json").read_bytes()
    r = cli("--json", "install", "--interval", "2h", "--profile", "full")
    assert r.code == 0 and r.data["changed"] is True and r.data["backend"] == "fake"
    manifest = json.loads((home / "config" / sid / "manifest.json").read_text())
    assert manifest["interval_seconds"] == 7200 and manifest["profile"] == "full"
    cfg = ls.load_config(ls.Paths(ls.System({"LORE_SERVICE_HOME": str(home)})), sid)
    assert cfg.interval_seconds == 7200 and cfg.profile == "full" and cfg.stages["docs"].timeout_seconds == 42
    assert (home / "state" / sid / "status.json").read_bytes() == status_before
    assert manifest["created_at_iso"] == installed_created(home, sid)


def installed_created(home, sid):
    return json.loads((home / "config" / sid / "manifest.json").read_text())["created_at_iso"]


def test_token_from_stdin_and_never_from_argv_or_output(cli, system, home):
    system.environ.pop("GITLAB_TOKEN")
    system.stdin_text = "glpat-from-stdin\n"
    r = cli("--json", "install", "--backend", "fake", "--token-stdin")
    assert r.code == 0 and "glpat-from-stdin" not in r.out
    env_file = home / "config" / r.data["service_id"] / "token.env"
    assert env_file.read_text() == "GITLAB_TOKEN=glpat-from-stdin\n"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    manifest = json.loads((home / "config" / r.data["service_id"] / "manifest.json").read_text())
    assert "glpat-from-stdin" not in json.dumps(manifest) and "glpat-from-stdin" not in " ".join(manifest["program"])


def test_install_without_any_token_is_refused_with_a_hint(cli, system):
    system.environ.pop("GITLAB_TOKEN")
    r = cli("--json", "install", "--backend", "fake")
    assert r.code == 2 and r.doc["error"]["code"] == "no_token" and "--token-stdin" in r.doc["error"]["hint"]


def test_custom_token_env_is_used_by_the_run(cli, system, project, home):
    system.environ["MY_GL"] = "glpat-custom"
    r = cli("--json", "install", "--backend", "fake", "--token-env", "MY_GL")
    assert r.code == 0
    (project / ".fake-lore.json").write_text(json.dumps({"issues": {"env_var": "MY_GL", "print_token": True}}))
    del system.environ["MY_GL"]
    assert cli("--json", "trigger").code == 0
    log = (home / "logs" / r.data["service_id"] / "service.log").read_text()
    assert "token is <redacted>" in log and "glpat-custom" not in log


def test_missing_lore_is_a_prerequisite_failure_with_the_fix(cli, system):
    system.which_map["lore"] = None
    r = cli("--json", "install", "--backend", "fake")
    assert r.code == 6 and "--lore" in r.doc["error"]["hint"]


def test_uninstall_removes_entry_manifest_config_secret_but_keeps_status_and_logs(cli, installed, home, system):
    sid = installed["service_id"]
    cli("--json", "trigger")
    r = cli("--json", "uninstall")
    assert r.code == 0
    assert not (home / "config" / sid).exists()
    assert (home / "state" / sid / "status.json").exists() and (home / "logs" / sid / "service.log").exists()
    assert ["fake-scheduler", "unregister", sid] in system.commands
    assert not (home / "fake-scheduler" / f"{sid}.json").exists()
    assert cli("--json", "status").code == 3
    # reinstalling picks the kept history back up
    cli("--json", "install", "--backend", "fake")
    assert cli("--json", "status").data["last_run"] is not None


def test_uninstall_purge_deletes_status_and_logs(cli, installed, home):
    sid = installed["service_id"]
    cli("--json", "trigger")
    assert cli("--json", "uninstall", "--purge").code == 0
    assert not (home / "state" / sid).exists() and not (home / "logs" / sid).exists()


def test_switching_backend_removes_the_old_entry_first(cli, installed, system, home):
    sid = installed["service_id"]
    system.commands.clear()
    r = cli("--json", "install", "--backend", "none")
    assert r.code == 0 and r.data["backend"] == "none"
    assert system.commands[0] == ["fake-scheduler", "unregister", sid]
    assert not (home / "fake-scheduler" / f"{sid}.json").exists()


def test_failing_scheduler_on_first_install_leaves_nothing_behind(cli, system, home):
    system.respond(["fake-scheduler", "register"], res(1, "", "permission denied"))
    r = cli("--json", "install", "--backend", "fake")
    assert r.code == 6 and "permission denied" in r.doc["error"]["message"]
    assert ls.Paths(system).installed_ids() == []
    assert not any(p.name in ("service.toml", "token.env") for p in home.rglob("*"))


def test_a_manifest_that_cannot_be_written_rolls_back_token_config_and_entry(cli, system, home, monkeypatch):
    """Without its manifest nothing could find (or uninstall) what install wrote."""

    def full_disk(paths, manifest):
        raise OSError(28, "No space left on device", str(home / "manifest.json"))

    monkeypatch.setattr(ls, "save_manifest", full_disk)
    r = cli("--json", "install", "--backend", "fake")
    assert r.code == 1 and r.doc["error"]["code"] == "os_error" and "No space left" in r.doc["error"]["message"]
    assert ["fake-scheduler", "unregister", ls.derive_service_id(os.getcwd())] in system.commands
    assert not any(p.name in ("service.toml", "token.env", "manifest.json") for p in home.rglob("*"))
    assert not (home / "fake-scheduler").exists() or not any((home / "fake-scheduler").iterdir())


def test_token_stdin_takes_the_token_alone(cli, system, home):
    system.environ.pop("GITLAB_TOKEN")
    system.stdin_text = "\n  glpat-alone  \n\n"
    assert cli("--json", "install", "--backend", "fake", "--token-stdin").code == 0
    system.stdin_text = "# my tokens\nGITLAB_TOKEN=glpat-x\n"
    r = cli("--json", "install", "--backend", "fake", "--token-stdin")
    assert r.code == 2 and r.doc["error"]["code"] == "bad_token" and "2 lines" in r.doc["error"]["message"]
    assert "glpat-x" not in r.out


def test_a_token_with_control_characters_or_undecodable_bytes_is_refused_unshown(cli, system):
    for bad in ("glpat-\x1b[2Jx", "glpat-\udcffx", "glpat-\x00x"):
        system.environ["GITLAB_TOKEN"] = bad
        r = cli("--json", "install", "--backend", "fake")
        assert r.code == 2 and r.doc["error"]["code"] == "bad_token", bad
        assert "glpat-" not in r.out


def test_the_token_is_prompted_for_hidden_on_a_terminal(cli, system, home):
    system.environ.pop("GITLAB_TOKEN")
    system.tty = True
    prompts: list[str] = []
    system.prompt_secret = lambda text: prompts.append(text) or "glpat-typed"  # type: ignore[method-assign]
    r = cli("install", "--backend", "fake")
    assert r.code == 0 and len(prompts) == 1 and "glpat-typed" not in r.out + r.err + prompts[0]
    assert (home / "config" / ls.derive_service_id(os.getcwd()) / "token.env").read_text() == (
        "GITLAB_TOKEN=glpat-typed\n"
    )
    # robot mode and --dry-run never stop to ask
    assert cli("--json", "install", "--backend", "fake", "--name", "other").code == 2 and len(prompts) == 1


def test_failing_reinstall_keeps_the_previous_config(cli, installed, system, home):
    sid = installed["service_id"]
    cfg = home / "config" / sid / "service.toml"
    before = cfg.read_text()
    system.respond(["fake-scheduler", "register"], res(1, "", "boom"))
    r = cli("--json", "install", "--backend", "fake", "--interval", "1h")
    assert r.code == 6
    assert cfg.read_text() == before
    assert json.loads((home / "config" / sid / "manifest.json").read_text())["interval_seconds"] == 1800


def test_pause_and_resume_through_main(cli, installed):
    assert cli("--json", "pause").data["paused"]["reason"] == "paused by user"
    status = cli("status")
    assert "PAUSED" in status.out and "resume" in status.out
    assert cli("--json", "resume").data["was_paused"]["kind"] == "manual"
    assert cli("--json", "status").data["paused"] is None


def test_doctor_reports_every_core_check_and_fails_on_a_missing_token(cli, installed, home):
    r = cli("--json", "doctor")
    assert r.code == 0, r.out
    names = {c["name"] for c in r.data["checks"]}
    assert {"manifest", "config", "status", "project", "token", "lore", "program"} <= names
    (home / "config" / installed["service_id"] / "token.env").unlink()
    cli_env_less = cli("--json", "doctor")
    token = next(c for c in cli_env_less.data["checks"] if c["name"] == "token")
    assert cli_env_less.code == 1 and token["status"] == "fail" and token["hint"]
    assert TOKEN not in cli_env_less.out


def test_doctor_human_output_gives_the_fix_for_each_problem(cli, installed, home):
    os.chmod(home / "config" / installed["service_id"] / "manifest.json", 0o644)
    r = cli("doctor")
    assert "warn  manifest file" in r.out and "fix: chmod 600" in r.out


def test_reinstall_without_flags_applies_the_users_edits_to_service_toml(cli, installed, home):
    sid = installed["service_id"]
    edit_config(home, sid, lambda doc: doc.update(interval="2h", profile="fast"))
    r = cli("--json", "install")
    assert r.code == 0 and r.data["interval_seconds"] == 7200 and r.data["profile"] == "fast"
    manifest = json.loads((home / "config" / sid / "manifest.json").read_text())
    assert manifest["interval_seconds"] == 7200 and manifest["profile"] == "fast"
    cfg = ls.load_config(ls.Paths(ls.System({"LORE_SERVICE_HOME": str(home)})), sid)
    assert cfg.interval_seconds == 7200 and cfg.profile == "fast"


def test_reinstall_with_a_new_token_variable_carries_the_stored_token_over(cli, installed, system, home, project):
    sid = installed["service_id"]
    del system.environ["GITLAB_TOKEN"]
    r = cli("--json", "install", "--token-env", "LORE_TOKEN")
    assert r.code == 0, r.out
    assert (home / "config" / sid / "token.env").read_text() == f"LORE_TOKEN={TOKEN}\n"
    (project / ".fake-lore.json").write_text(json.dumps({"issues": {"env_var": "LORE_TOKEN"}}))
    assert cli("--json", "trigger").code == 0
    seen = [json.loads(line) for line in (project / ".fake-lore-calls.jsonl").read_text().splitlines()]
    assert seen[0]["token_set"] is True


def test_auto_token_store_follows_the_os_even_without_a_scheduler(cli, system):
    system._platform = "darwin"
    assert cli("--json", "install", "--backend", "none", "--dry-run").data["token_source"] == "keychain"
    refused = cli("--json", "install", "--backend", "none", "--token-source", "env-file", "--dry-run")
    assert refused.code == 2 and "keychain" in refused.doc["error"]["hint"]
    system._platform = "win32"
    assert cli("--json", "install", "--backend", "none", "--dry-run").data["token_source"] == "credential-manager"
    system._platform = "linux"
    assert cli("--json", "install", "--backend", "none", "--dry-run").data["token_source"] == "env-file"


def test_a_failing_or_missing_secret_store_is_exit_6_with_the_fix_for_this_os(cli, system, memory_keyring, monkeypatch):
    import keyring.errors

    def locked(*_args):
        raise keyring.errors.KeyringLocked("the collection is locked")

    monkeypatch.setattr(memory_keyring, "set_password", locked)
    r = cli("--json", "install", "--backend", "fake", "--token-source", "keychain")
    assert r.code == 6 and r.doc["error"]["code"] == "secret_store" and "locked" in r.doc["error"]["message"]
    assert "--token-source env-file" in r.doc["error"]["hint"] and TOKEN not in r.out
    assert ls.Paths(system).installed_ids() == []  # rolled back
    monkeypatch.setitem(sys.modules, "keyring", None)  # as if it were not installed
    r = cli("--json", "install", "--backend", "fake", "--token-source", "keychain")
    assert r.code == 6 and r.doc["error"]["code"] == "secret_store" and "pip install keyring" in r.doc["error"]["hint"]


def test_doctor_flags_stage_programs_a_scheduled_run_could_not_start(cli, installed, home, tmp_path):
    sid = installed["service_id"]

    def stages(doc):
        doc["stages"]["issues"]["command"] = ["lore", "ingest", "--type", "issues"]  # bare: the shell's PATH
        doc["stages"]["mrs"]["command"] = [str(tmp_path), "ingest"]  # a folder is not a program

    edit_config(home, sid, stages)
    r = cli("--json", "doctor")
    checks = {c["name"]: c for c in r.data["checks"]}
    assert r.code == 1 and checks["stage mrs"]["status"] == "fail"
    issues = checks["stage issues"]
    assert issues["status"] == "warn" and "own PATH" in issues["message"] and os.sep in issues["hint"]


def test_a_reinstall_reads_the_stored_token_once(cli, system, memory_keyring, monkeypatch):
    """Each read of an OS store may cost a prompt: planning and applying share one."""
    assert cli("--json", "install", "--backend", "fake", "--token-source", "keychain").code == 0
    reads: list[str] = []
    real = memory_keyring.get_password
    monkeypatch.setattr(memory_keyring, "get_password", lambda s, u: reads.append(u) or real(s, u))
    system.environ.pop("GITLAB_TOKEN")
    r = cli("--json", "install", "--backend", "fake", "--token-source", "keychain", "--profile", "fast")
    assert r.code == 0, r.out
    assert len(reads) == 1
