"""Shared fixtures: a private home, a project, the fake `lore`, a fake System
(and its macOS and Windows kinds), and two ways to drive the tool: main(argv)
in-process and a real subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_backend  # noqa: E402,F401  (registers the "fake" backend)
from harness.systemd_user import e2e_required  # noqa: E402

import lore_service as ls  # noqa: E402

TOKEN = "glpat-SECRET-token-value-42"
SCRIPT = str(ROOT / "lore_service.py")
FAKE_LORE = str(Path(__file__).resolve().parent / "fake_lore.py")
FIXTURES = Path(__file__).resolve().parent / "fixtures"


class FakeSystem(ls.System):
    """System with a settable clock, a scripted RNG and scripted commands.

    Stage processes (spawn/kill_group) stay real: the runner is tested
    against real processes. Scheduler commands (run) are recorded and
    answered from `responses` (argv prefix -> CommandResult or callable).
    """

    def __init__(self, environ: dict[str, str], platform: str = "linux") -> None:
        super().__init__(environ)
        self._platform = platform
        self.clock_ms: int | None = None
        self.jitter = 0.5  # uniform(a, b) returns a + jitter * (b - a)
        self.uniform_calls: list[tuple[float, float]] = []
        self.commands: list[list[str]] = []
        self.responses: list[tuple[list[str], Any]] = []
        self.which_map: dict[str, str | None] = {}
        self.stdin_text = ""
        self.tty = False
        self.undumpable = False
        self.linger_dir = os.path.join(environ.get("HOME", "/nonexistent"), "no-logind")  # the machine's is not ours

    @property
    def platform(self) -> str:
        return self._platform

    def now_ms(self) -> int:
        return super().now_ms() if self.clock_ms is None else self.clock_ms

    def uniform(self, low: float, high: float) -> float:
        self.uniform_calls.append((low, high))
        return low + self.jitter * (high - low)

    def respond(self, prefix: list[str], result: Any) -> None:
        self.responses.insert(0, (prefix, result))

    def run(self, argv, *, input=None, env=None, timeout=60.0, keep_newlines=False, console=False):  # type: ignore[override]
        argv = list(argv)
        self.commands.append(argv)
        for prefix, result in self.responses:
            if argv[: len(prefix)] == prefix:
                if callable(result):
                    result = result(argv, input)
                if isinstance(result, int):
                    result = ls.CommandResult(argv, result, "", "")
                return ls.CommandResult(argv, result.returncode, result.stdout, result.stderr)
        return ls.CommandResult(argv, 0, "", "")

    def which(self, name: str) -> str | None:
        if name in self.which_map:
            return self.which_map[name]
        return super().which(name)

    def stdin_isatty(self) -> bool:
        return self.tty

    def make_undumpable(self) -> None:  # the test process itself must stay debuggable
        self.undumpable = True

    def read_stdin(self) -> str:
        return self.stdin_text


def res(code: int, stdout: str = "", stderr: str = "") -> ls.CommandResult:
    """A scheduler command's answer, for FakeSystem.respond."""
    return ls.CommandResult([], code, stdout, stderr)


def fixture_bytes(folder: str, name: str) -> bytes:
    """A captured real output in tests/fixtures/<folder>/ (launchd, schtasks)."""
    return (FIXTURES / folder / name).read_bytes()


def fixture_text(folder: str, name: str) -> str:
    return fixture_bytes(folder, name).decode("utf-8")


UID = 501  # the Mac user's uid
NOT_LOADED = res(113, "", fixture_text("launchd", "print_not_loaded.stderr.txt"))


class MacSystem(FakeSystem):
    """A logged-in Mac user at the console, as far as lore-service can tell.

    launchctl is modelled as launchd behaves: `bootstrap` loads the job,
    `bootout` unloads it, but asynchronously: `print` still shows it loaded
    for `bootout_lag` more calls (launchd has not let go of the label yet).
    `print-disabled` lists the labels in `switched_off` (what turning an item
    off under Login Items does) in the macOS 14 format; `enable` clears one.
    `print gui/<uid>` lists the loaded jobs in its `services` block, idle and
    last exited 0, as `print` of each job (print_idle_ran.txt) says.
    The clock is fake, so waiting costs the tests nothing."""

    def __init__(self, environ: dict[str, str]) -> None:
        super().__init__(environ, platform="darwin")
        self.fake_uid = UID
        self.fake_euid = UID
        self.console_uid: int | None = UID
        self.which_map["launchctl"] = "/bin/launchctl"
        self.loaded: dict[str, int] = {}  # target -> print calls left before an unload shows (-1: loaded)
        self.bootout_lag = 0
        self.switched_off: set[str] = set()
        self.mono = 1000.0
        self.respond(["launchctl", "print"], self._print)
        self.respond(["launchctl", "print-disabled"], self._print_disabled)
        self.respond(["launchctl", "enable"], self._enable)
        self.respond(["launchctl", "bootstrap"], self._bootstrap)
        self.respond(["launchctl", "bootout"], self._bootout)

    def _print(self, argv: list[str], _input: Any) -> ls.CommandResult:
        if argv[2] == f"gui/{UID}":
            jobs = "".join(f"\t\t       0        0 \t{t.rsplit('/', 1)[-1]}\n" for t, n in self.loaded.items() if n)
            return res(0, f"gui/{UID} = {{\n\ttype = login\n\tservices = {{\n{jobs}\t}}\n}}\n")
        left = self.loaded.get(argv[2])
        if left is None:
            return NOT_LOADED
        if left == 0:
            del self.loaded[argv[2]]
            return NOT_LOADED
        if left > 0:
            self.loaded[argv[2]] = left - 1
        return res(0, fixture_text("launchd", "print_idle_ran.txt"))

    def _print_disabled(self, argv: list[str], _input: Any) -> ls.CommandResult:
        lines = "".join(f'\t"{label}" => disabled\n' for label in sorted(self.switched_off))
        return res(0, "disabled services = {\n" + lines + "}\n")

    def _enable(self, argv: list[str], _input: Any) -> ls.CommandResult:
        self.switched_off.discard(argv[2].rsplit("/", 1)[-1])
        return res(0)

    def _bootstrap(self, argv: list[str], _input: Any) -> ls.CommandResult:
        target = f"{argv[2]}/{Path(argv[3]).stem}"
        if self.loaded.get(target, 0) != 0:  # still (being) loaded: launchd refuses
            return res(5, "", fixture_text("launchd", "bootstrap_failed_5.stderr.txt"))
        self.loaded[target] = -1
        return res(0)

    def _bootout(self, argv: list[str], _input: Any) -> ls.CommandResult:
        if argv[2] not in self.loaded:
            return res(113, "", "Boot-out failed: 113: Could not find specified service\n")
        self.loaded[argv[2]] = self.bootout_lag
        return res(0)

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.mono += seconds

    def uid(self) -> int:
        return self.fake_uid

    def euid(self) -> int:
        return self.fake_euid

    def console_owner_uid(self) -> int | None:
        return self.console_uid


class WinSystem(FakeSystem):
    """A Windows user with schtasks.exe on PATH."""

    def __init__(self, environ: dict[str, str]) -> None:
        super().__init__(environ, platform="win32")
        self.which_map["schtasks"] = "C:\\Windows\\System32\\schtasks.exe"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def doc(self) -> dict[str, Any]:
        return json.loads(self.out)

    @property
    def data(self) -> dict[str, Any]:
        return self.doc["data"]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "lore-home"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    p = tmp_path / "work space" / "my-project"
    p.mkdir(parents=True)
    return p


@pytest.fixture
def lore_bin(tmp_path: Path) -> Path:
    """An executable `lore` that runs tests/fake_lore.py."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    lore = bindir / "lore"
    lore.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{FAKE_LORE}' \"$@\"\n")
    lore.chmod(lore.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return lore


@pytest.fixture
def environ(tmp_path: Path, home: Path, lore_bin: Path) -> dict[str, str]:
    user = tmp_path / "user-home"
    user.mkdir(exist_ok=True)
    return {
        "HOME": str(user),
        "PATH": f"{lore_bin.parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        "LORE_SERVICE_HOME": str(home),
        "GITLAB_TOKEN": TOKEN,
        "LANG": "C.UTF-8",
        # no power supplies: a laptop on battery running the tests would skip docs otherwise
        "LORE_SERVICE_SYSFS": str(tmp_path / "no-sysfs"),
    }


@pytest.fixture
def system(environ: dict[str, str]) -> FakeSystem:
    return FakeSystem(environ)


@pytest.fixture
def cli(system: FakeSystem, capsys: pytest.CaptureFixture[str], project: Path, monkeypatch: pytest.MonkeyPatch):
    """Call main(argv) in-process with the fake system, from the project folder."""
    monkeypatch.chdir(project)

    def call(*argv: str, sys_: FakeSystem | None = None) -> Result:
        capsys.readouterr()
        code = ls.main(list(argv), system=sys_ or system)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return call


def install(cli: Callable[..., Result], backend: str, *extra: str, system: FakeSystem | None = None) -> Result:
    """`install --backend <backend> <extra>` through `cli`, on `system` (default: the `system` fixture)."""
    return cli("--json", "install", "--backend", backend, *extra, sys_=system)


FROZEN = os.environ.get("LORE_SERVICE_FROZEN", "")


def frozen_or_skip() -> str:
    """The frozen binary: a skip without one, a failure under LORE_E2E_REQUIRED=1."""
    if not FROZEN:
        reason = "no frozen binary: set LORE_SERVICE_FROZEN, or run ./run-tests with LORE_BUILD_FROZEN=1"
        if e2e_required():
            pytest.fail(reason)
        pytest.skip(reason)
    return FROZEN


@pytest.fixture(params=["source", "frozen"])
def program(request: pytest.FixtureRequest) -> list[str]:
    """The tool as users start it: `python lore_service.py`, and the frozen
    binary that build.py makes (LORE_SERVICE_FROZEN, set by ./run-tests in CI)."""
    if request.param == "source":
        return [sys.executable, SCRIPT]
    return [frozen_or_skip()]


@pytest.fixture
def tool(environ: dict[str, str], project: Path, program: list[str]):
    """Run the tool (source or frozen binary) as a real subprocess."""

    def call(
        *argv: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        input: str | None = None,
        timeout: float = 60,
    ) -> Result:
        proc = subprocess.run(
            [*program, *argv],
            cwd=str(cwd or project),
            env=env or environ,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    call.program = program  # type: ignore[attr-defined]  (for tests that start it themselves)
    return call


def write_plan(project: Path, plan: dict[str, Any]) -> None:
    (project / ".fake-lore.json").write_text(json.dumps(plan))


def calls(project: Path) -> list[dict[str, Any]]:
    """The fake lore's calls so far; read while stages run, so only whole lines count."""
    path = project / ".fake-lore-calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


@pytest.fixture
def installed(cli, project: Path, lore_bin: Path):
    """A service installed for `project` on the fake backend."""
    result = install(cli, "fake", "--interval", "30m")
    assert result.code == 0, result.err + result.out
    return result.data


def edit_config(home: Path, sid: str, change) -> None:
    """Apply change(doc) to a service's service.toml, as a user editing it would."""
    import tomllib

    import tomli_w

    path = home / "config" / sid / "service.toml"
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    change(doc)
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")


class MemoryKeyring:
    """An in-memory keyring backend, for the keychain/Credential Manager paths."""

    priority = 1

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.store.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.store[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        import keyring.errors

        if self.store.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("not found")


@pytest.fixture
def memory_keyring():
    import keyring
    from keyring.backend import KeyringBackend

    backend_class = type("TestMemoryKeyring", (MemoryKeyring, KeyringBackend), {})
    old = keyring.get_keyring()
    store = backend_class()
    keyring.set_keyring(store)
    yield store
    keyring.set_keyring(old)


B = TypeVar("B", bound=ls.SchedulerBackend)


def backend_and_manifest(system: FakeSystem, kind: type[B], sid: str | None = None) -> tuple[B, ls.Manifest]:
    """An installed service's manifest (the only one, unless `sid` names it)
    and its backend as the class the test expects."""
    paths = ls.Paths(system)
    manifest = ls.load_manifest(paths, sid or paths.installed_ids()[0])
    assert manifest is not None
    backend = ls.get_backend(kind.name, system, paths)
    assert isinstance(backend, kind)
    return backend, manifest


def detect(kind: type[ls.SchedulerBackend], system: FakeSystem) -> tuple[bool, str]:
    """A backend's availability as (usable, why), the pair auto and doctor act on."""
    check = kind.availability(system)
    return check.status == "ok", check.message


def scheduler_state(backend: ls.SchedulerBackend, manifest: ls.Manifest) -> dict[str, Any]:
    """The scheduler's view as `status --json` shows it (its `scheduler` object)."""
    return backend.state(manifest).to_dict()


def shared_schema(name: str) -> Path:
    """A file of ../shared/schemas (next to the clone in CI, /work/shared here);
    a skip when it is absent, and a failure under LORE_E2E_REQUIRED=1."""
    for folder in (Path(__file__).resolve().parents[2] / "shared" / "schemas", ROOT.parent / "shared" / "schemas"):
        if (folder / name).exists():
            return folder / name
    required_or_skip(f"shared/schemas/{name} not found next to the repository (../shared/schemas)")


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie still answers kill(0))."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    """Poll `condition` every 50 ms until it holds or `timeout` seconds pass;
    the caller asserts what it needs afterwards."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_for_exit(pid: int, timeout: float = 5.0) -> None:
    """Give a process up to `timeout` seconds to die (the caller asserts it did)."""
    wait_until(lambda: not pid_alive(pid), timeout)


def start_hanging_run(
    tool: Any, environ: dict[str, str], project: Path, command: str
) -> tuple[subprocess.Popen[str], int, int]:
    """`run` or `trigger` (--json) as a real process whose issues stage hangs
    with a grandchild in its group; returns once both are up: (the run, the
    stage's pid, the grandchild's pid)."""
    assert tool("--json", "install", "--backend", "none").code == 0
    write_plan(project, {"issues": {"grandchild": True, "hang": True}})
    runner = subprocess.Popen(
        [*tool.program, "--json", command], cwd=project, env=environ, stdout=subprocess.PIPE, text=True
    )
    pidfile = project / ".fake-lore-grandchild-issues.pid"
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip().isdigit(), 30)
    return runner, calls(project)[0]["pid"], int(pidfile.read_text())


def status_all_beside_each(
    tool: Callable[..., Result], argv: list[str], env: dict[str, str], tmp_path: Path
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Install two services with `argv` (native tests): each one's scheduler
    view from `status --all` beside its own `status`, read before both are purged."""
    sids: list[str] = []
    pairs = []
    try:
        for name in ("first", "second"):
            project = tmp_path / name
            project.mkdir()
            r = tool("--json", "install", *argv, "--project", str(project), env=env)
            assert r.code == 0, r.err + r.out
            sids.append(r.data["service_id"])
        everything = tool("--json", "status", "--all", env=env)
        rows = {row["service_id"]: row["scheduler"] for row in everything.data["services"]}
        for sid in sids:
            pairs.append((rows[sid], tool("--json", "status", "--name", sid, env=env).data["scheduler"]))
    finally:
        for sid in sids:
            tool("--json", "uninstall", "--purge", "--name", sid, env=env)
    return pairs


# -- what the machine must have ------------------------------------------------------------


def required_or_skip(reason: str) -> NoReturn:
    """A test that needs something of this machine: skipped here, a failure in CI (LORE_E2E_REQUIRED=1)."""
    if e2e_required():
        pytest.fail(reason + "; LORE_E2E_REQUIRED=1 makes this an error")
    pytest.skip(reason)


def faketime_or_skip() -> str:
    """Debian's faketime, which the tests that shift the clock need."""
    faketime = shutil.which("faketime")
    if faketime is None:
        if e2e_required():
            pytest.fail("faketime is not installed (./run-tests installs it as root on Debian)")
        pytest.skip("faketime is not installed")
    return faketime


# -- a service's files ---------------------------------------------------------------------


def status_file(home: Path, sid: str) -> dict[str, Any]:
    """A service's status.json, parsed."""
    return json.loads((home / "state" / sid / "status.json").read_text())


def log_text(home: Path, sid: str) -> str:
    """A service's service.log."""
    return (home / "logs" / sid / "service.log").read_text()


def doctor_checks(cli: Callable[..., Result], *argv: str, sys_: FakeSystem | None = None) -> dict[str, dict[str, Any]]:
    """`doctor --json ARGV`'s checks by name."""
    return {c["name"]: c for c in cli("--json", "doctor", *argv, sys_=sys_).data["checks"]}


@contextlib.contextmanager
def commands_during(system: FakeSystem) -> Iterator[list[list[str]]]:
    """The commands run through `system` inside the block (the list fills when it ends)."""
    before = len(system.commands)
    ran: list[list[str]] = []
    yield ran
    ran.extend(system.commands[before:])


# -- the run limit ---------------------------------------------------------------------------


def write_settings(home: Path, text: str) -> Path:
    """The user's settings.toml (the run limit's), as written by hand."""
    path = home / "config" / "settings.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def hold_slot(system: ls.System, index: int, sid: str) -> ls.FileLock:
    """Hold a run slot as another service's run would (this process's own lock on it)."""
    lock = ls.FileLock(ls.Paths(system).slot(index))
    assert lock.try_acquire()
    lock.record_owner(sid)
    return lock


def run_while_held(
    cli: Callable[..., Result], system: ls.System, held: list[ls.FileLock], command: str = "run", *argv: str
) -> Result:
    """`command --json ARGV` while other runs hold these slots; they are released after."""
    try:
        return cli("--json", command, *argv, sys_=system)
    finally:
        for lock in held:
            lock.release()


# -- schedulers as the backends' tests and test_scale.py set them up -----------------------


def systemd_user_manager(system: FakeSystem, monkeypatch: pytest.MonkeyPatch) -> FakeSystem:
    """A Linux box whose systemd user manager runs and whose user may linger."""
    # pytest's folders live under /tmp, which the real unit's PrivateTmp hides
    monkeypatch.setattr(ls.SystemdBackend, "hidden_roots", ())
    system.which_map["systemctl"] = "/usr/bin/systemctl"
    system.respond(["systemctl", "--user", "is-system-running"], res(0, "running\n"))
    system.respond(
        ["systemctl", "--user", "--no-pager", "--version"],
        res(0, "systemd 252 (252.38-1~deb12u1)\n+PAM\n"),
    )
    system.respond(["loginctl"], res(0, "yes\n"))
    return system


def cron_box(system: FakeSystem, crontab: Any, user: str = "alice") -> FakeSystem:
    """A Linux box with cron installed and its daemon running; `crontab` answers
    `crontab FILE` and `crontab -l` (its install and list)."""
    system.environ["USER"] = user
    system.which_map["crontab"] = "/usr/bin/crontab"
    system.respond(["crontab"], crontab.install)
    system.respond(["crontab", "-l"], crontab.list)
    system.respond(["pgrep", "-x", "cron"], res(0, "4242\n"))
    return system


def python_folder(folder: Path) -> Path:
    """A Windows Python folder holding python.exe and its windowed twin."""
    folder.mkdir()
    for exe in ("python.exe", "pythonw.exe"):
        (folder / exe).write_text("")
    return folder


def windows_from(python: Path, environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> WinSystem:
    """A Windows system whose lore-service runs as `python.exe lore_service.py` from `python`."""
    # the argv prefix a Windows install would schedule; our own function, not the stdlib
    monkeypatch.setattr(ls, "self_command", lambda: [str(python / "python.exe"), SCRIPT])
    return WinSystem(dict(environ))
