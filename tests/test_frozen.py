"""The frozen (PyInstaller) build and the pinned copy the scheduler runs.

Two halves:

* From source, always: the pinning logic of section 4a (`running_bundle`,
  `pin_bundle`, `prune_pinned`, `frozen_child_environ`), install's use of it
  (with `running_bundle` swapped through monkeypatch), and doctor's judgement
  of disposable interpreters. The pinning functions take the executable, the
  frozen flag and the extraction folder as parameters, so nothing patches sys.

* Against the real one-folder binary: built once per session by `build.py`
  when LORE_BUILD_FROZEN=1 or LORE_E2E_REQUIRED=1 (CI), or taken from
  LORE_SERVICE_FROZEN=/path/to/lore-service (already built; `./run-tests`
  exports it after building). Otherwise these tests skip, saying how to run
  them; under LORE_E2E_REQUIRED=1 a missing binary is a failure, never a skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TOKEN, FakeSystem, MacSystem, Result, calls, res, write_plan

import lore_service as ls

VERSION = ls.__version__

# ---------------------------------------------------------------------------
# helpers


def fake_build(
    folder: Path, *, version: str = VERSION, frozen: bool = True, exit_code: int = 0, tag: str = "a"
) -> Path:
    """A stand-in one-folder build: `lore-service` (a shell script answering
    --version --json like the real one) and `_internal/` with one file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_internal").mkdir(exist_ok=True)
    (folder / "_internal" / "base_library.zip").write_text(f"library {tag}\n")
    doc = json.dumps({"ok": True, "command": "version", "data": {"version": version, "frozen": frozen}})
    exe = folder / "lore-service"
    exe.write_text(f"#!/bin/sh\n# build {tag}\necho '{doc}'\nexit {exit_code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    (folder / "README.txt").write_text("not part of the build\n")
    return exe


def onedir(exe: Path) -> ls.Bundle:
    return ls.running_bundle(frozen=True, executable=str(exe), meipass=str(exe.parent / "_internal"))


def real_run(argv, *, input=None, env=None, timeout=60.0):
    return ls.System().run(argv, input=input, env=env, timeout=timeout)


# ---------------------------------------------------------------------------
# classification


def test_running_bundle_tells_onedir_onefile_zipapp_and_source_apart(tmp_path: Path) -> None:
    exe = tmp_path / "Downloads" / "lore-service" / "lore-service"
    b = ls.running_bundle(frozen=True, executable=str(exe), meipass=str(exe.parent / "_internal"))
    assert (b.kind, b.executable) == ("onedir", str(exe))
    b = ls.running_bundle(frozen=True, executable=str(exe), meipass="/tmp/_MEIabc123")
    assert b.kind == "onefile" and ls.bundle_command(b) == [str(exe)]
    # a one-file build run from /tmp itself extracts next to itself: still one-file
    b = ls.running_bundle(frozen=True, executable="/tmp/lore-service", meipass="/tmp/_MEIabc123")
    assert b.kind == "onefile"
    b = ls.running_bundle(frozen=True, executable=str(exe), meipass=str(exe.parent))  # PyInstaller 5 one-folder
    assert b.kind == "onedir"
    pyz = tmp_path / "lore-service.pyz"
    pyz.write_bytes(b"PK")
    b = ls.running_bundle(frozen=False, executable="/usr/bin/python3", module=str(pyz / "lore_service.py"))
    assert (b.kind, ls.bundle_command(b)) == ("zipapp", ["/usr/bin/python3", str(pyz)])
    b = ls.running_bundle(frozen=False)
    assert b.kind == "source" and ls.bundle_command(b) == [os.path.abspath(sys.executable), ls.__file__]
    assert ls.self_command() == ls.bundle_command(b)


def test_pinned_command_is_under_data_root_bin_version(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    exe = tmp_path / "dl" / "lore-service"
    assert ls.pinned_command(data, onedir(exe)) == [os.path.join(data, "bin", VERSION, "lore-service")]
    pyz = ls.Bundle("zipapp", str(tmp_path / "x.pyz"), "/usr/bin/python3")
    assert ls.pinned_command(data, pyz, "9.9") == [
        "/usr/bin/python3",
        os.path.join(data, "bin", "9.9", "lore-service.pyz"),
    ]
    src = ls.running_bundle(frozen=False)
    assert ls.pinned_command(data, src) == ls.bundle_command(src)  # source is never copied


# ---------------------------------------------------------------------------
# pin_bundle


def test_pin_copies_the_build_verifies_it_and_is_idempotent(tmp_path: Path) -> None:
    exe = fake_build(tmp_path / "Downloads" / "lore-service-0.1.0")
    data = tmp_path / "data"
    command = ls.pin_bundle(str(data), onedir(exe), real_run)
    pinned = data / "bin" / VERSION
    assert command == [str(pinned / "lore-service")]
    assert (pinned / "_internal" / "base_library.zip").read_text() == "library a\n"
    assert os.access(pinned / "lore-service", os.X_OK)
    assert not (pinned / "README.txt").exists()  # only the build, not whatever sat next to it
    assert sorted(p.name for p in (data / "bin").iterdir()) == [VERSION]  # no temporary leftovers
    inode = (pinned / "lore-service").stat().st_ino
    assert ls.pin_bundle(str(data), onedir(exe), real_run) == command
    assert (pinned / "lore-service").stat().st_ino == inode  # same build: not copied again
    # running from the pinned copy itself pins nothing
    assert ls.pin_bundle(str(data), onedir(pinned / "lore-service"), real_run) == command
    shutil.rmtree(tmp_path / "Downloads")
    assert subprocess.run(command + ["--version"], capture_output=True).returncode == 0


def test_a_rebuilt_same_version_is_swapped_in_and_a_new_version_gets_its_own_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = fake_build(tmp_path / "dl1", tag="a")
    ls.pin_bundle(str(data), onedir(first), real_run)
    second = fake_build(tmp_path / "dl2", tag="b")
    ls.pin_bundle(str(data), onedir(second), real_run)
    assert (data / "bin" / VERSION / "_internal" / "base_library.zip").read_text() == "library b\n"
    # the replaced build is set aside, not deleted: a run may still be executing from it
    (aside,) = (data / "bin").glob(f".{VERSION}.*.old")
    assert (aside / "_internal" / "base_library.zip").read_text() == "library a\n"
    assert time.time() - aside.stat().st_mtime < 60  # so prune_pinned's one-hour guard keeps it a while
    newer = fake_build(tmp_path / "dl3", version="9.0.0", tag="c")
    command = ls.pin_bundle(str(data), onedir(newer), real_run, version="9.0.0")
    assert command == [str(data / "bin" / "9.0.0" / "lore-service")]
    assert sorted(p.name for p in (data / "bin").iterdir()) == sorted([VERSION, "9.0.0", aside.name])


def test_a_rebuilt_same_version_is_not_swapped_in_under_a_running_program(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ls.pin_bundle(str(data), onedir(fake_build(tmp_path / "dl1", tag="a")), real_run)
    with pytest.raises(ls.SchedulerError) as err:
        ls.pin_bundle(str(data), onedir(fake_build(tmp_path / "dl2", tag="b")), real_run, runs_in_progress=lambda: True)
    assert err.value.code == "pin_failed" and "run is executing" in err.value.hint
    assert (data / "bin" / VERSION / "_internal" / "base_library.zip").read_text() == "library a\n"
    assert sorted(p.name for p in (data / "bin").iterdir()) == [VERSION]  # no staging or aside left behind


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"version": "0.0.1"}, "reports version '0.0.1'"),
        ({"exit_code": 3}, "exit status 3"),
        ({"frozen": False}, "frozen"),
    ],
)
def test_a_copy_that_does_not_answer_version_is_never_put_in_place(tmp_path: Path, kwargs, needle) -> None:
    exe = fake_build(tmp_path / "dl", **kwargs)
    data = tmp_path / "data"
    with pytest.raises(ls.SchedulerError) as err:
        ls.pin_bundle(str(data), onedir(exe), real_run)
    assert err.value.code == "pin_failed" and needle in err.value.message
    assert list((data / "bin").iterdir()) == []  # neither the version folder nor the staging copy


def test_a_broken_new_copy_leaves_the_pinned_one_untouched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ls.pin_bundle(str(data), onedir(fake_build(tmp_path / "good", tag="good")), real_run)
    with pytest.raises(ls.SchedulerError):
        ls.pin_bundle(str(data), onedir(fake_build(tmp_path / "bad", tag="bad", exit_code=1)), real_run)
    assert (data / "bin" / VERSION / "_internal" / "base_library.zip").read_text() == "library good\n"


def test_an_executable_inside_the_extraction_folder_is_refused(tmp_path: Path) -> None:
    mei = tmp_path / "_MEI12345"
    exe = fake_build(mei / "nested")
    bundle = ls.running_bundle(frozen=True, executable=str(exe), meipass=str(mei))
    assert bundle.kind == "onefile"
    with pytest.raises(ls.SchedulerError) as err:
        ls.pin_bundle(str(tmp_path / "data"), bundle, real_run)
    assert err.value.code == "pin_failed" and "extraction folder" in err.value.message


def test_zipapp_is_pinned_and_run_by_the_interpreter(tmp_path: Path) -> None:
    import zipapp

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "lore_service.py", src)
    (src / "__main__.py").write_text("import sys\nimport lore_service\nsys.exit(lore_service.main())\n")
    pyz = tmp_path / "Downloads" / "lore-service.pyz"
    pyz.parent.mkdir()
    zipapp.create_archive(src, pyz)
    bundle = ls.running_bundle(frozen=False, executable=sys.executable, module=str(pyz / "lore_service.py"))
    command = ls.pin_bundle(str(tmp_path / "data"), bundle, real_run)
    assert command == [os.path.abspath(sys.executable), str(tmp_path / "data" / "bin" / VERSION / "lore-service.pyz")]
    out = subprocess.run([*command, "--version", "--json"], capture_output=True, text=True)
    assert json.loads(out.stdout)["data"]["layout"] == "zipapp"


def test_prune_removes_versions_no_manifest_runs(cli, installed, home: Path) -> None:
    paths = ls.Paths(ls.System({"LORE_SERVICE_HOME": str(home)}))
    bin_root = Path(paths.data_root) / "bin"
    hours_ago = time.time() - 7200
    for v in ("0.0.7", "0.0.8", VERSION):
        (bin_root / v).mkdir(parents=True)
        os.utime(bin_root / v, (hours_ago, hours_ago))
    fresh = bin_root / ".0.0.9.123.tmp"  # another install's copy in progress
    fresh.mkdir()
    (bin_root / "0.0.6").mkdir()  # just pinned by an install whose manifest is not written yet
    manifest = ls.load_manifest(paths, installed["service_id"])
    manifest.program = [str(bin_root / "0.0.8" / "lore-service"), "run", "--service-id", manifest.service_id]
    ls.save_manifest(paths, manifest)
    system = ls.System({"LORE_SERVICE_HOME": str(home)})
    # a run in progress (of any service, installed or not) may execute from any copy: nothing goes
    ls.ensure_dir(paths.state_dir("gone-service"))
    with ls.FileLock(paths.run_lock("gone-service")) as running:
        running.record_owner()
        assert ls.prune_pinned(paths, system, str(bin_root / VERSION)) == []
    removed = ls.prune_pinned(paths, system, str(bin_root / VERSION))
    assert removed == [str(bin_root / "0.0.7")]
    assert sorted(p.name for p in bin_root.iterdir()) == sorted([".0.0.9.123.tmp", "0.0.6", "0.0.8", VERSION])
    (Path(paths.manifest(manifest.service_id))).write_text("{corrupt")
    assert ls.prune_pinned(paths, system, str(bin_root / VERSION)) == []  # never on a guess


def test_frozen_child_environ_restores_the_library_path_and_drops_bootloader_variables() -> None:
    env = {
        "PATH": "/usr/bin",
        "LD_LIBRARY_PATH": "/dl/lore-service/_internal",
        "_PYI_ARCHIVE_FILE": "/dl/lore-service/lore-service",
        "_PYI_PARENT_PROCESS_LEVEL": "1",
    }
    out = ls.frozen_child_environ(env, frozen=True)
    assert out == {"PATH": "/usr/bin", "PYINSTALLER_RESET_ENVIRONMENT": "1"}
    out = ls.frozen_child_environ({**env, "LD_LIBRARY_PATH_ORIG": "/opt/lib"}, frozen=True)
    assert out["LD_LIBRARY_PATH"] == "/opt/lib" and "LD_LIBRARY_PATH_ORIG" not in out
    assert ls.frozen_child_environ(env, frozen=False) == env  # from source: untouched


# ---------------------------------------------------------------------------
# install from a (stand-in) frozen build, in-process


@pytest.fixture
def as_frozen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, system):
    """install sees itself as a one-folder build in ~/Downloads; its --version
    probe of the copy is answered like the real binary would."""
    exe = fake_build(tmp_path / "Downloads" / "lore-service-0.1.0")
    bundle = onedir(exe)
    monkeypatch.setattr(ls, "running_bundle", lambda **_: bundle)

    def answer(argv, _input):
        return real_run(argv)

    system.respond([], lambda argv, inp: answer(argv, inp) if argv[1:] == ["--version", "--json"] else 0)
    return exe


def test_install_from_a_frozen_build_points_the_entry_at_the_pinned_copy(cli, as_frozen, home: Path) -> None:
    preview = cli("--json", "install", "--backend", "fake", "--dry-run")
    pinned = str(home / "data" / "bin" / VERSION / "lore-service")
    assert preview.code == 0 and preview.data["program"][0] == pinned
    assert not (home / "data" / "bin").exists()  # --dry-run copies nothing
    r = cli("--json", "install", "--backend", "fake")
    assert r.code == 0, r.out + r.err
    sid = r.data["service_id"]
    assert r.data["program"] == [pinned, "--home", str(home), "run", "--service-id", sid]
    manifest = json.loads((home / "config" / sid / "manifest.json").read_text())
    assert manifest["program"] == r.data["program"]
    assert os.access(pinned, os.X_OK)
    again = cli("--json", "install", "--backend", "fake")
    assert again.code == 0 and again.data["changed"] is False


def test_install_fails_cleanly_when_the_copy_does_not_run(cli, monkeypatch, tmp_path: Path, home: Path) -> None:
    exe = fake_build(tmp_path / "Downloads" / "broken", exit_code=1)
    bundle = onedir(exe)
    monkeypatch.setattr(ls, "running_bundle", lambda **_: bundle)
    r = cli("--json", "install", "--backend", "fake")  # FakeSystem answers the probe with empty output
    assert r.code == 6 and r.doc["error"]["code"] == "pin_failed"
    assert not (home / "config").exists() or not any((home / "config").iterdir())


# ---------------------------------------------------------------------------
# doctor: disposable interpreters (source installs)


def fake_venv(root: Path, home: str = "/usr/bin") -> str:
    (root / "bin").mkdir(parents=True)
    (root / "pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = false\n")
    python = root / "bin" / "python"
    python.write_text("")
    return str(python)


def test_program_in_tmp_or_downloads_or_mei_warns(tmp_path: Path) -> None:
    script = tmp_path / "lore_service.py"
    script.write_text("")
    # an interpreter that is neither temporary nor a venv, wherever this checkout lives (CI clones under /tmp)
    interpreter = os.path.realpath(shutil.which("sh") or "/bin/sh")
    checks = ls.program_checks([interpreter, str(script), "run"])
    assert [c.status for c in checks] == ["warn"] and "temporary" in checks[0].message
    for path in ("/home/me/Downloads/lore-service/lore-service", "C:\\Users\\me\\AppData\\Local\\Temp\\_MEI42\\x.exe"):
        assert ls._disposable(path), path
    assert ls._disposable("/home/me/.local/share/lore/bin/0.1.0/lore-service") is None


def test_a_venv_inside_a_project_checkout_is_judged_disposable(tmp_path: Path) -> None:
    checkout = tmp_path / "src" / "lore-service"
    checkout.mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    problem = ls._venv_problem(fake_venv(checkout / ".venv"))
    assert problem is not None and problem.status == "warn"
    assert str(checkout) in problem.message and "pyproject.toml" in problem.message and "pipx" in problem.hint
    # a venv made to host the tool (pipx's, ~/.local/...) is kept
    assert ls._venv_problem(fake_venv(tmp_path / "pipx" / "venvs" / "lore-service")) is None
    # not a venv at all
    assert ls._venv_problem("/usr/bin/python3") is None


def test_a_venv_whose_base_python_is_gone_fails(tmp_path: Path) -> None:
    problem = ls._venv_problem(fake_venv(tmp_path / "v", home=str(tmp_path / "gone")))
    assert problem is not None and problem.status == "fail" and "gone" in problem.message


# ---------------------------------------------------------------------------
# the real frozen binary

REQUIRED = os.environ.get("LORE_E2E_REQUIRED") == "1"
BUILD = REQUIRED or os.environ.get("LORE_BUILD_FROZEN") == "1"


@pytest.fixture(scope="session")
def frozen_exe() -> Path:
    given = os.environ.get("LORE_SERVICE_FROZEN")
    if given:
        exe = Path(given).resolve()
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            pytest.fail(f"LORE_SERVICE_FROZEN={given} is not an executable file")
        return exe
    if not BUILD:
        pytest.skip(
            "frozen binary not built: run `python build.py` and set LORE_SERVICE_FROZEN=dist/lore-service/"
            "lore-service, or set LORE_BUILD_FROZEN=1 to build it here (~20 s); LORE_E2E_REQUIRED=1 builds it"
        )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build.py"), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        pytest.fail(f"python build.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(json.loads(proc.stdout)["executable"])


@pytest.fixture
def download(frozen_exe: Path, tmp_path: Path) -> Path:
    """The release unpacked into a Downloads folder; returns its executable."""
    target = tmp_path / "Downloads" / f"lore-service-{VERSION}"
    shutil.copytree(frozen_exe.parent, target, symlinks=True)
    return target / frozen_exe.name


@pytest.fixture
def frozen(environ: dict[str, str], project: Path):
    def call(exe: Path | str, *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
        proc = subprocess.run(
            [str(exe), *argv], cwd=str(cwd or project), env=env or environ, capture_output=True, text=True, timeout=120
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return call


def test_frozen_version_says_frozen_onedir(frozen, frozen_exe: Path) -> None:
    r = frozen(frozen_exe, "--version", "--json")
    assert r.code == 0 and r.doc["command"] == "version", r.err
    assert r.data["version"] == VERSION and r.data["frozen"] is True and r.data["layout"] == "onedir"
    assert r.data["python"].startswith("3.") and r.data["platform"].startswith(sys.platform)
    text = frozen(frozen_exe, "--version")
    assert text.out.startswith(f"lore-service {VERSION} (frozen, Python ")


def test_frozen_core_cli_contract(frozen, download: Path, project: Path, home: Path) -> None:
    bad = frozen(download, "install", "--backend", "none", "--interval", "3m")
    assert bad.code == 2 and "Traceback" not in bad.out + bad.err
    assert bad.err.startswith("error: ") and "\nhint: " in bad.err
    assert frozen(download, "--json", "status").code == 3
    install = frozen(download, "--json", "install", "--backend", "none", "--interval", "1h")
    assert install.code == 0, install.out + install.err
    assert TOKEN not in install.out
    sid = install.data["service_id"]
    write_plan(project, {"issues": {"print_token": True}})
    run = frozen(download, "--json", "trigger")
    assert run.code == 0, run.out + run.err
    status = frozen(download, "--json", "status")
    assert status.code == 0 and status.data["state"] == "healthy" and status.data["last_run"]["trigger"] == "manual"
    assert all(c["token_set"] for c in calls(project))  # the env-file token reached lore
    log = (home / "logs" / sid / "service.log").read_text()
    assert TOKEN not in log and ls.SECRET_PLACEHOLDER in log  # redacted inside the binary too
    (home / "state" / sid / "status.json").write_text("{not json")
    corrupt = frozen(download, "--json", "status")
    assert corrupt.code == 4 and corrupt.doc["error"]["code"] == "state_corrupt"
    assert "Traceback" not in corrupt.out + corrupt.err


KEYRING_BACKEND = '''
import json
import os

from keyring.backend import KeyringBackend


class FileKeyring(KeyringBackend):
    """A test backend: one JSON file next to this module."""

    priority = 1
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "secrets.json")

    def _load(self):
        try:
            with open(self.path) as fh:
                return json.load(fh)
        except FileNotFoundError:
            return {}

    def get_password(self, service, username):
        return self._load().get(f"{service}/{username}")

    def set_password(self, service, username, password):
        data = self._load()
        data[f"{service}/{username}"] = password
        with open(self.path, "w") as fh:
            json.dump(data, fh)

    def delete_password(self, service, username):
        data = self._load()
        data.pop(f"{service}/{username}", None)
        with open(self.path, "w") as fh:
            json.dump(data, fh)
'''


def test_frozen_keyring_loads_a_configured_backend_and_round_trips_the_token(
    frozen, download: Path, environ: dict[str, str], project: Path, tmp_path: Path
) -> None:
    """keyring inside the binary: its config file (keyringrc.cfg) selects a
    backend from keyring-path, the token is stored there and read by `run`."""
    plugin = tmp_path / "keyring-plugin"
    plugin.mkdir()
    (plugin / "testkeyring.py").write_text(KEYRING_BACKEND)
    rc = Path(environ["HOME"]) / ".config" / "python_keyring" / "keyringrc.cfg"
    rc.parent.mkdir(parents=True)
    rc.write_text(f"[backend]\ndefault-keyring=testkeyring.FileKeyring\nkeyring-path={plugin}\n")
    env = {**environ, "XDG_CONFIG_HOME": str(Path(environ["HOME"]) / ".config")}
    r = frozen(download, "--json", "install", "--backend", "none", "--token-source", "keychain", env=env)
    assert r.code == 0, r.out + r.err
    stored = json.loads((plugin / "secrets.json").read_text())
    assert stored == {f"lore-service/{r.data['service_id']}": TOKEN}
    no_env_token = {k: v for k, v in env.items() if k != "GITLAB_TOKEN"}
    run = frozen(download, "--json", "trigger", env=no_env_token)
    assert run.code == 0, run.out + run.err
    assert calls(project) and all(c["token_set"] for c in calls(project))


def test_frozen_keychain_on_linux_without_a_secret_service_is_exit_6_not_a_crash(
    frozen, download: Path, environ: dict[str, str]
) -> None:
    """The Linux decision: env-file is the default; --token-source keychain uses
    the Secret Service over D-Bus (bundled: SecretStorage, jeepney). With no
    session bus it is exit 6 with a hint, and the backend modules did import."""
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux behaviour")
    env = {k: v for k, v in environ.items() if k not in ("DBUS_SESSION_BUS_ADDRESS",)}
    for backend in ("", "keyring.backends.SecretService.Keyring"):
        run_env = {**env, "PYTHON_KEYRING_BACKEND": backend} if backend else env
        r = frozen(download, "--json", "install", "--backend", "none", "--token-source", "keychain", env=run_env)
        assert "Traceback" not in r.out + r.err
        if r.code == 0:  # a Secret Service is reachable after all: it worked
            continue
        assert r.code == 6 and r.doc["error"]["code"] == "secret_store", r.out
        message = r.doc["error"]["message"]
        assert "not installed" not in message and "No module named" not in message, message
        assert "env-file" in r.doc["error"]["hint"]


def test_frozen_install_pins_itself_and_runs_after_the_download_is_deleted(
    frozen, download: Path, project: Path, home: Path, environ: dict[str, str], tmp_path: Path
) -> None:
    r = frozen(download, "--json", "install", "--backend", "none")
    assert r.code == 0, r.out + r.err
    sid = r.data["service_id"]
    manifest = json.loads((home / "config" / sid / "manifest.json").read_text())
    program = manifest["program"]
    pinned_dir = home / "data" / "bin" / VERSION
    assert program[0] == str(pinned_dir / "lore-service") and r.data["program"] == program
    assert program[1:] == ["--home", str(home), "run", "--service-id", sid]
    assert not any("_MEI" in part for part in program)
    shutil.rmtree(download.parent)  # the user deletes the download
    # what the scheduler does: exactly manifest.program, from another folder, a minimal environment
    sched_env = {k: environ[k] for k in ("HOME", "PATH", "LANG")}
    proc = subprocess.run(program, cwd=str(tmp_path), env=sched_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = frozen(program[0], "--json", "status", "--name", sid)
    last = status.data["last_run"]
    assert last["trigger"] == "scheduled" and last["outcome"] == "success", last
    assert [c["stage"] for c in calls(project)] == ["issues", "mrs", "docs"]
    assert all(c["token_set"] for c in calls(project))
    # the pinned copy re-installs onto itself with no change
    again = frozen(program[0], "--json", "install", "--backend", "none")
    assert again.code == 0 and again.data["changed"] is False and again.data["program"] == program
    doctor = frozen(program[0], "--json", "doctor", "--name", sid)
    checks = {c["name"]: c for c in doctor.data["checks"]}
    assert checks["program"]["status"] in ("ok", "warn")  # warn only because the test home is under /tmp
    assert "no longer exists" not in checks["program"]["message"]


# ---------------------------------------------------------------------------
# macOS: the pinned copy launchd runs carries no quarantine (through System)

QUARANTINE = "com.apple.quarantine"
NO_XATTR = res(1, "", f"xattr: No such xattr: {QUARANTINE}")


@pytest.fixture
def mac_frozen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, environ: dict[str, str]) -> tuple[MacSystem, Path]:
    """A Mac running a downloaded one-folder build; `xattr -p` finds no quarantine
    and the copy's --version probe is answered by the stand-in build itself."""
    exe = fake_build(tmp_path / "Downloads" / "lore-service-0.1.0")
    bundle = onedir(exe)
    monkeypatch.setattr(ls, "running_bundle", lambda **_: bundle)
    mac = MacSystem(dict(environ))
    mac.which_map["codesign"] = "/usr/bin/codesign"
    mac.respond([], lambda argv, _inp: real_run(argv) if argv[1:] == ["--version", "--json"] else 0)
    mac.respond(["xattr", "-p"], NO_XATTR)
    return mac, exe


def pin_commands(system: FakeSystem) -> list[list[str]]:
    tools = ("xattr", "codesign")
    return [c for c in system.commands if os.path.basename(c[0]) in tools or c[1:] == ["--version", "--json"]]


def test_on_macos_install_clears_quarantine_and_signs_only_the_pinned_copy(cli, mac_frozen, home: Path) -> None:
    mac, exe = mac_frozen
    r = cli("--json", "install", "--backend", "fake", sys_=mac)
    assert r.code == 0, r.out + r.err
    staging = str(home / "data" / "bin" / f".{VERSION}.{os.getpid()}.tmp")
    copy = os.path.join(staging, "lore-service")
    # cleared and signed before the copy is first run, and the probe runs the copy
    assert pin_commands(mac) == [
        ["xattr", "-d", "-r", QUARANTINE, staging],
        ["xattr", "-p", QUARANTINE, copy],
        ["/usr/bin/codesign", "--force", "--sign", "-", copy],
        [copy, "--version", "--json"],
    ]
    assert not any(str(exe.parent) in arg for c in mac.commands for arg in c)  # the download is left alone
    assert r.data["program"][0] == str(home / "data" / "bin" / VERSION / "lore-service")


def test_on_macos_without_codesign_the_copy_is_only_cleared(cli, mac_frozen, home: Path) -> None:
    mac, _ = mac_frozen
    mac.which_map["codesign"] = None
    assert cli("--json", "install", "--backend", "fake", sys_=mac).code == 0
    assert [c[:2] for c in pin_commands(mac)][:2] == [["xattr", "-d"], ["xattr", "-p"]]
    assert not any(os.path.basename(c[0]) == "codesign" for c in mac.commands)


def test_on_macos_a_quarantine_that_stays_stops_the_install_before_any_entry(cli, mac_frozen, home: Path) -> None:
    mac, _ = mac_frozen
    mac.respond(["xattr", "-p"], res(0, "0081;5f000000;Safari;\n"))  # still there after the delete
    r = cli("--json", "install", "--backend", "fake", sys_=mac)
    assert r.code != 0 and r.doc["error"]["code"] == "pin_failed", r.out
    assert QUARANTINE in r.doc["error"]["message"]
    assert list((home / "data" / "bin").iterdir()) == []  # no copy, no staging left
    assert not any(c[1:] == ["--version", "--json"] for c in mac.commands)  # never ran


def test_off_macos_pinning_runs_no_xattr_or_codesign(cli, as_frozen, system) -> None:
    assert cli("--json", "install", "--backend", "fake").code == 0
    assert [c for c in pin_commands(system) if c[1:] != ["--version", "--json"]] == []


def test_doctor_on_macos_warns_when_the_scheduled_program_is_quarantined_or_unsigned(cli, mac_frozen) -> None:
    mac, _ = mac_frozen
    assert cli("--json", "install", "--backend", "fake", sys_=mac).code == 0
    clean = cli("--json", "doctor", sys_=mac)
    names = {c["name"] for c in clean.data["checks"]}
    assert "program quarantine" not in names and "program signature" not in names
    mac.respond(["xattr", "-p"], res(0, "0081;5f000000;Safari;\n"))
    mac.respond(["/usr/bin/codesign", "--verify"], res(1, "", "code object is not signed at all"))
    r = cli("--json", "doctor", sys_=mac)
    checks = {c["name"]: c for c in r.data["checks"]}
    assert checks["program quarantine"]["status"] == "warn"
    assert checks["program quarantine"]["hint"].startswith(f"xattr -d -r {QUARANTINE} ")
    assert checks["program signature"]["status"] == "warn" and "not signed" in checks["program signature"]["message"]


# ---------------------------------------------------------------------------
# the release archive (what the release workflow smoke-tests on each OS)


def test_frozen_version_reports_the_commit_and_build_date_build_py_baked_in(frozen, frozen_exe: Path) -> None:
    import jsonschema

    r = frozen(frozen_exe, "--json", "--version")
    schema = json.loads((ROOT / "specs" / "schemas" / "version-output.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(r.data)
    assert r.data["commit"] and r.data["build_date"], r.data
    text = frozen(frozen_exe, "--version").out.rstrip()
    assert text.endswith(f"; commit {r.data['commit']}, built {r.data['build_date']})")


def test_the_release_smoke_test_passes_on_the_extracted_archive(frozen_exe: Path) -> None:
    """scripts/smoke-release.py, as the release workflow runs it, on this build's
    archive (beside dist/lore-service/); `--native none` exercises its install,
    trigger, status and uninstall steps without touching a real scheduler."""
    archives = sorted(frozen_exe.parent.parent.glob(f"lore-service-{VERSION}-*.tar.gz"))
    if not archives:
        pytest.skip(f"no lore-service-{VERSION}-*.tar.gz beside {frozen_exe.parent} (build with build.py)")
    script = str(ROOT / "scripts" / "smoke-release.py")
    proc = subprocess.run(
        [sys.executable, script, str(archives[-1]), "--expect-version", f"v{VERSION}", "--native", "none"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke test passed" in proc.stdout
    wrong = subprocess.run(
        [sys.executable, script, str(archives[-1]), "--expect-version", "v9.9.9"], capture_output=True, text=True
    )
    assert wrong.returncode != 0 and "expected version 9.9.9" in wrong.stderr


def test_the_homebrew_formula_carries_the_real_archives_sha256(frozen_exe: Path, tmp_path: Path) -> None:
    archives = sorted(frozen_exe.parent.parent.glob(f"lore-service-{VERSION}-*.tar.gz"))
    if not archives:
        pytest.skip(f"no lore-service-{VERSION}-*.tar.gz beside {frozen_exe.parent} (build with build.py)")
    real = Path(shutil.copy2(archives[-1], tmp_path))
    url_base = f"https://github.com/example/lore-service/releases/download/v{VERSION}"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build.py"), "--manifests", url_base, str(real)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    formula = (tmp_path / "lore-service.rb").read_text()
    digest = hashlib.sha256(real.read_bytes()).hexdigest()
    assert f'url "{url_base}/{real.name}"\n      sha256 "{digest}"' in formula
    assert (tmp_path / "SHA256SUMS").read_text() == f"{digest}  {real.name}\n"
