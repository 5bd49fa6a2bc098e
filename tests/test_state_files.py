"""Versioned, atomic state: corrupt and future files, crash consistency,
the lock, concurrent runs, and where files live."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import SCRIPT, calls, pid_alive, wait_for_exit, wait_until, write_plan

import lore_service as ls


def sid_of(installed) -> str:
    return installed["service_id"]


@pytest.mark.parametrize("name", ["manifest", "status"])
@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{not json", "state_corrupt"),
        (b"", "state_corrupt"),
        (b"\xff\xfe\x00", "state_corrupt"),
        (b"[1, 2]", "state_corrupt"),
        (b'{"schema_version": "1"}', "state_corrupt"),
        (b'{"schema_version": 99, "whatever": true}', "state_newer_schema"),
    ],
)
def test_corrupt_or_newer_state_is_exit_4_naming_the_file_and_left_untouched(cli, installed, home, name, content, code):
    sid = sid_of(installed)
    cli("--json", "trigger")
    path = home / ("config" if name == "manifest" else "state") / sid / f"{name}.json"
    path.write_bytes(content)
    for argv in (["status"], ["run"], ["trigger"], ["pause"], ["resume"]):
        r = cli("--json", *argv)
        assert r.code == 4, (argv, r.out)
        assert r.doc["error"]["code"] == code and str(path) in r.doc["error"]["message"]
        assert path.read_bytes() == content  # never overwritten
    # a broken manifest is never mistaken for "not installed": install refuses to clobber it too
    if name == "manifest":
        assert cli("--json", "install", "--backend", "fake").code == 4
        assert path.read_bytes() == content


def test_status_field_with_wrong_type_is_exit_4(cli, installed, home):
    cli("--json", "trigger")
    path = home / "state" / sid_of(installed) / "status.json"
    doc = json.loads(path.read_text())
    doc["consecutive_failures"] = "three"
    path.write_text(json.dumps(doc))
    r = cli("--json", "status")
    assert r.code == 4 and "consecutive_failures" in r.doc["error"]["message"]


def test_invalid_config_is_exit_4_with_the_path(cli, installed, home):
    path = home / "config" / sid_of(installed) / "service.toml"
    for text in ("interval = [", "backoff = 5\n", 'interval = "4m"\n', "[stages.issues]\ncritical = 'no'\n"):
        path.write_text(text)
        r = cli("--json", "run")
        assert r.code == 4 and r.doc["error"]["code"] == "config_invalid", text
        assert str(path) in r.doc["error"]["message"]
    path.write_text(
        'profile = "fast"\n[stages.issues]\ncommand = ["lore", "ing\\u0000est"]\n[stages.mrs]\ncommand = ["x"]\n'
    )
    r = cli("--json", "run")
    assert r.code == 4 and "NUL" in r.doc["error"]["message"]


def test_state_files_carry_schema_version_and_updated_at(cli, installed, home):
    cli("--json", "trigger")
    sid = sid_of(installed)
    for path in (home / "config" / sid / "manifest.json", home / "state" / sid / "status.json"):
        doc = json.loads(path.read_text())
        assert doc["schema_version"] == 1 and doc["updated_at_iso"].endswith("Z")


WRITER = """
import sys, lore_service as ls
path = sys.argv[1]
i = 0
while True:
    i += 1
    ls.atomic_write(path, ls.dump_json({"schema_version": 1, "n": i, "pad": "x" * (i % 5000)}))
"""


def test_sigkilled_writer_never_leaves_a_torn_file(tmp_path):
    target = tmp_path / "status.json"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(SCRIPT)}
    for round_ in range(25):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=env)
        time.sleep(0.05 + (round_ % 5) * 0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            doc = json.loads(target.read_text())  # parseable every time
            assert doc["schema_version"] == 1
    leftovers = [p for p in tmp_path.iterdir() if p.name != "status.json"]
    assert all(p.name.endswith(".tmp") for p in leftovers)
    # a killed writer's temp file is swept by a later write once it is stale
    leftovers.append(tmp_path / ".status.json.4242.tmp")
    leftovers[-1].write_text("{")
    for p in leftovers:
        os.utime(p, (time.time() - ls.STALE_TEMP_SECONDS - 1,) * 2)
    fresh = tmp_path / ".status.json.999999.tmp"  # as if a writer were busy right now
    fresh.write_text("{")
    other = tmp_path / ".manifest.json.1.tmp"
    other.write_text("{")
    os.utime(other, (time.time() - ls.STALE_TEMP_SECONDS - 1,) * 2)
    ls.atomic_write(str(target), ls.dump_json({"schema_version": 1}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".manifest.json.1.tmp",
        ".status.json.999999.tmp",
        "status.json",
    ]


def test_concurrent_scheduled_runs_execute_exactly_once(tool, project, lore_bin, environ, tmp_path):
    assert tool("--json", "install", "--backend", "none").code == 0
    release = tmp_path / "release"
    write_plan(project, {"issues": {"wait_for": str(release)}})  # the run that syncs holds on until the rest ended
    procs = [
        subprocess.Popen(
            [sys.executable, SCRIPT, "--json", "run"], cwd=project, env=environ, stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    wait_until(lambda: sum(p.poll() is not None for p in procs) >= 5, 60)
    release.touch()
    docs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    executed = [d for d in docs if not d["data"]["skipped"]]
    skipped = [d for d in docs if d["data"]["skipped"]]
    assert len(executed) == 1 and len(skipped) == 5
    assert all("lock" in d["data"]["skip_reason"] for d in skipped)
    assert [c["stage"] for c in calls(project)].count("issues") == 1


def test_trigger_while_running_is_busy_exit_5_and_status_says_running(tool, project, lore_bin, environ, tmp_path):
    assert tool("--json", "install", "--backend", "none").code == 0
    release = tmp_path / "release"
    write_plan(project, {"issues": {"wait_for": str(release)}})  # running until the checks are done
    runner = subprocess.Popen(
        [sys.executable, SCRIPT, "--json", "run"], cwd=project, env=environ, stdout=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: bool(calls(project)), 30)
        busy = tool("--json", "trigger")
        assert busy.code == 5 and json.loads(busy.out)["error"]["code"] == "busy"
        assert json.loads(tool("--json", "status").out)["data"]["state"] == "running"
    finally:
        release.touch()
    runner.communicate(timeout=30)
    assert runner.returncode == 0
    assert json.loads(tool("--json", "status").out)["data"]["state"] == "healthy"


def test_a_killed_run_leaves_no_stale_lock_and_the_next_run_ends_its_orphaned_stage(
    tool, project, lore_bin, environ, home
):
    installed = tool("--json", "install", "--backend", "none")
    assert installed.code == 0
    write_plan(project, {"issues": {"hang": True}})
    runner = subprocess.Popen([sys.executable, SCRIPT, "run"], cwd=project, env=environ, start_new_session=True)
    wait_until(lambda: bool(calls(project)), 30)
    stage_pid = calls(project)[0]["pid"]
    # the kill must come after the run noted its stage's group in the lock ("<pid>\n<run id> <pgid>\n")
    lock = home / "state" / installed.data["service_id"] / "run.lock"

    def noted_group() -> str:
        return (lock.read_text().split("\n")[1:2] or [""])[0].rpartition(" ")[2]

    wait_until(lambda: noted_group() == str(stage_pid), 30)
    os.killpg(runner.pid, signal.SIGKILL)  # the run dies; its stage, in its own session, does not
    runner.wait()
    assert pid_alive(stage_pid)
    write_plan(project, {})
    r = tool("--json", "trigger")
    assert r.code == 0, r.out + r.err
    assert json.loads(r.out)["data"]["run"]["outcome"] == "success"
    wait_for_exit(stage_pid)
    assert not pid_alive(stage_pid)
    lines = json.loads(tool("--json", "logs", "--tail", "50").out)["data"]["lines"]
    assert any("left running by crashed run" in line for line in lines)


def test_linux_folders_match_platformdirs(system):
    import platformdirs

    for env in ({}, {"XDG_CONFIG_HOME": "/x/cfg", "XDG_STATE_HOME": "/x/state", "XDG_DATA_HOME": "/x/data"}):
        saved = {k: os.environ.get(k) for k in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME", "HOME")}
        try:
            for k in saved:
                os.environ.pop(k, None)
            os.environ["HOME"] = "/home/someone"
            os.environ.update(env)
            dirs = platformdirs.PlatformDirs("lore", appauthor=False)
            ours = ls._user_dirs(ls.System({"HOME": "/home/someone", **env}))
            assert ours == (dirs.user_config_dir, dirs.user_state_dir, dirs.user_log_dir, dirs.user_data_dir)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_every_folder_created_is_private(cli, installed, home):
    cli("--json", "trigger")
    for folder in [home, *[p for p in home.rglob("*") if p.is_dir()]]:
        if "fake-scheduler" in folder.parts:
            continue
        assert folder.stat().st_mode & 0o077 == 0, folder


@pytest.mark.parametrize(
    ("field", "value"),
    [("next_retry_at_ms", 10**20), ("next_due_at_ms", -5), ("consecutive_failures", -1), ("history", [[[[]]]])],
)
def test_out_of_range_or_misshapen_status_values_are_exit_4(cli, installed, home, field, value):
    cli("--json", "trigger")
    path = home / "state" / installed["service_id"] / "status.json"
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    for argv in (["status"], ["run"]):
        r = cli("--json", *argv)
        assert r.code == 4, r.out
        assert str(path) in r.doc["error"]["message"]


def test_deeply_nested_json_is_corrupt_not_a_crash(cli, installed, home):
    path = home / "state" / installed["service_id"] / "status.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert cli("--json", "status").code == 4


def test_manifest_with_an_empty_program_is_exit_4(cli, installed, home):
    path = home / "config" / installed["service_id"] / "manifest.json"
    doc = json.loads(path.read_text())
    doc["program"] = []
    path.write_text(json.dumps(doc))
    r = cli("--json", "doctor")
    assert r.code in (1, 4) and "program" in r.out


# -- service.toml without tomllib (read_simple_toml) ---------------------------------------


def tomllib_or_error(text: str) -> object:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return "error"


def written_configs() -> list[str]:
    """service.toml as install writes it: defaults, and with odd paths, a stale_after, extra paths, [notify]."""
    cfg = ls.ServiceConfig.defaults('/opt/it\'s "lore" 100% é\\bin/lore')
    configs = [cfg.to_toml("p-1234abcd")]
    cfg.extra_write_paths = ["/data/lore db", "/x/\\y"]
    cfg.stale_after_seconds = 7200
    cfg.permanent_exit_codes = []
    configs.append(cfg.to_toml("p-1234abcd"))
    cfg.notify = ls.NotifyConfig(False, 'https://hooks.example/a?b="c"', "https://hc-ping.com/1234-abcd")
    configs.append(cfg.to_toml("p-1234abcd"))
    return configs


def test_the_config_install_writes_is_read_without_tomllib_as_tomllib_reads_it():
    for text in written_configs():
        fast = ls.read_simple_toml(text)
        assert fast is not None and fast == tomllib_or_error(text)


@pytest.mark.parametrize(
    "text",
    [
        "a = 1 # a comment after a value\n",
        "a = [1, 2]\n",
        "a = 1.5\n",
        "a = 007\n",
        "a = +1\n",
        "a = 1_000\n",
        "a = 'literal'\n",
        'a = """multi"""\n',
        'a = "\\u00e9"\n',
        'a = "\\/"\n',
        "a = 1\na = 2\n",
        "[t]\n[t]\n",
        "a = 1\n[a]\n",
        "[t]\nb = 1\n[t.b]\n",
        '"quoted" = 1\n',
        "a.b = 1\n",
        "a = [\n  1\n]\n",
        "a = [\n  1,\n",
        "a = 1\r\n",
        'a = "x\x7fy"\n',
        "a = {x = 1}\n",
        "[[t]]\n",
    ],
)
def test_what_the_simple_reader_does_not_know_is_left_to_tomllib(text):
    assert ls.read_simple_toml(text) is None


def test_the_simple_reader_never_reads_a_variant_otherwise_than_tomllib():
    """Thousands of mutations of real configs (a character inserted, deleted or
    replaced, from the characters TOML's grammar turns on, or a line repeated
    elsewhere): whatever the simple
    reader accepts, tomllib reads to the same document; what tomllib refuses,
    it refuses too."""
    import random

    rng = random.Random(1206)
    alphabet = list("\"\\[]=#,.-_+ \t\n\rtfu0123456789aé\x7f\x00/'{}") + ["\\u", "\\n", "true", "[]", "\n["]
    accepted = 0
    for base in written_configs():
        for _ in range(2500):
            text = base
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(text))
                action = rng.randrange(4)
                piece = rng.choice(alphabet)
                if action == 3:  # a whole line repeated elsewhere: duplicate keys, tables, arrays
                    lines = text.split("\n")
                    lines.insert(rng.randrange(len(lines)), rng.choice(lines))
                    text = "\n".join(lines)
                else:
                    text = text[:at] + (piece if action < 2 else "") + text[at + (action > 0) :]
            fast = ls.read_simple_toml(text)
            if fast is not None:
                accepted += 1
                assert fast == tomllib_or_error(text), text
    assert accepted > 1000  # the comparison is not vacuous
