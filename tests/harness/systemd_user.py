"""Start a real ``systemd --user`` manager for end-to-end tests.

Two modes:

* ``private`` (CI, containers, root without a logind session): as root, create
  an unprivileged test user of this run's own (``lore-e2e-<random hex>``),
  give it ``/run/user/<uid>`` and a delegated cgroup, and launch
  ``/lib/systemd/systemd --user`` for it, detached; ``stop()`` deletes the
  user again. Two runs on one machine each get their own user, manager and
  bus; the host folders they share are reference counted (``shared.py``).
* ``current`` (developer laptop): reuse the user manager the current user
  already has; never start or stop it.

Stdlib only, so it can be imported before any test dependency is installed.

Typical pytest fixture::

    @pytest.fixture(scope="session")
    def user_manager():
        um = UserManager.auto()
        reason = um.try_start()
        if reason is not None:
            if e2e_required():
                pytest.fail(reason)
            pytest.skip(reason)
        yield um
        um.stop()

Gotchas measured on Debian 12 / systemd 252 without systemd as PID 1:

* No journald: ``journalctl --user`` shows nothing; read results from files
  or ``systemctl --user show``.
* No logind: ``loginctl`` fails ("Failed to connect to bus: No such file or
  directory"), so lingering cannot be enabled or queried.
* ``systemctl --user is-system-running`` exits 1 for "degraded" (a failed unit,
  cleared by ``reset-failed``); parse stdout, not the exit code.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from . import shared

# Private mode names its test user <prefix>-<random hex>: one per run.
USER_PREFIX = "lore-e2e"
LEASE_KIND = "systemd"
DEFAULT_PACKAGES: tuple[str, ...] = ("platformdirs", "keyring", "tomli-w")
SYSTEMD_BIN = Path("/lib/systemd/systemd")
# Debian's interpreter, not pyenv's: pyenv lives under /root (0700), which the
# test user cannot execute.
SYSTEM_PYTHON = Path("/usr/bin/python3")
USER_PATH = "/usr/local/bin:/usr/bin:/bin"
# For the root-side helpers (runuser, useradd live in sbin).
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Root-owned bookkeeping: per run a folder named after its user (launcher pid
# and log), and the "a run created this host dir" markers.
STATE_DIR = shared.STATE_ROOT
# States in which the manager answers and can run units.
UP_STATES = ("running", "degraded")
BOOTING_STATES = ("initializing", "starting")
# Outer environment variables pip needs to reach its index (certs, proxies).
_PIP_PASSTHROUGH_PREFIXES = (
    "PIP_",
    "SSL_CERT_",
    "REQUESTS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)

Mode = Literal["private", "current"]

# Host dirs that a PID 1 systemd would have made; created only when missing and
# removed again by the stop() of the last run that uses them. Never remove them
# while any run's manager runs: without /run/systemd/system `is-system-running`
# answers "offline", and a daemon-reexec makes the manager exit.
_HOST_DIRS: tuple[tuple[Path, int], ...] = (
    # systemd --user refuses to start unless this "booted with systemd" flag exists.
    (Path("/run/systemd/system"), 0o755),
    # Mount point for every namespaced sandbox (PrivateTmp=, ProtectSystem=...).
    # The user manager cannot create it; without it such services fail with
    # status=226/NAMESPACE.
    (Path("/run/systemd/unit-root"), 0o700),
)


class HarnessError(RuntimeError):
    """The manager cannot be provided; ``str(exc)`` is the reason to report."""


def e2e_required() -> bool:
    """True when CI demands the e2e tests run (fail instead of skip)."""
    return os.environ.get("LORE_E2E_REQUIRED", "") == "1"


def cgroup2_mount() -> Path | None:
    """Where the cgroup2 hierarchy is mounted (hybrid: .../unified), if anywhere."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "id parent maj:min root mountpoint opts ... - fstype source superopts"
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split(" ")[4])
    return None


def run_killing_group(
    cmd: Sequence[str], *, timeout: float | None = None, **kw: Any
) -> subprocess.CompletedProcess[Any]:
    """subprocess.run, but a timeout kills the whole process group.

    Plain subprocess.run would SIGKILL only runuser and orphan its child (e.g. a
    systemctl stuck on a dead manager).
    """
    if timeout is None:
        return subprocess.run(cmd, **kw)
    check = kw.pop("check", False)
    stdin_data = kw.pop("input", None)
    if kw.pop("capture_output", False):
        kw["stdout"] = kw["stderr"] = subprocess.PIPE
    if stdin_data is not None:
        kw["stdin"] = subprocess.PIPE
    with subprocess.Popen(cmd, start_new_session=True, **kw) as proc:
        try:
            out, err = proc.communicate(stdin_data, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    res = subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
    if check:
        res.check_returncode()
    return res


class UserManager:
    """A ``systemd --user`` instance that tests can drive with ``systemctl --user``."""

    def __init__(self, user: str | None = None, *, mode: Mode = "private", timeout: float = 30.0) -> None:
        # No name: a fresh user of this run's own, deleted again by stop().
        self.user = user or shared.unique_user(USER_PREFIX)
        self.mode: Mode = mode
        self.timeout = timeout
        self.state: str | None = None  # "running" / "degraded" once started
        self._lease: shared.Lease | None = None
        self._created_user = False

    # -- construction -----------------------------------------------------

    @classmethod
    def current(cls, timeout: float = 30.0) -> UserManager:
        """Use the invoking user's existing manager (developer laptop)."""
        return cls(pwd.getpwuid(os.getuid()).pw_name, mode="current", timeout=timeout)

    @classmethod
    def auto(cls, user: str | None = None, timeout: float = 30.0) -> UserManager:
        """Private manager when root (CI), else the current user's (laptop).

        A non-root user can only ever use its own manager, so its failure
        reason is the useful one to report.
        """
        if os.geteuid() != 0:
            return cls.current(timeout)
        return cls(user, mode="private", timeout=timeout)

    # -- identity ---------------------------------------------------------

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.user).pw_uid

    @property
    def gid(self) -> int:
        return pwd.getpwnam(self.user).pw_gid

    @property
    def home(self) -> Path:
        return Path(pwd.getpwnam(self.user).pw_dir)

    @property
    def runtime_dir(self) -> Path:
        if self.mode == "current" and os.environ.get("XDG_RUNTIME_DIR"):
            return Path(os.environ["XDG_RUNTIME_DIR"])
        return Path(f"/run/user/{self.uid}")

    @property
    def unit_dir(self) -> Path:
        """Where ``systemctl --user`` looks for the user's own unit files."""
        return self.home / ".config/systemd/user"

    @property
    def cgroup(self) -> Path | None:
        mount = cgroup2_mount()
        return None if mount is None else mount / f"lore-harness-{self.user}"

    @property
    def state_dir(self) -> Path:
        """This run's launcher pid and log."""
        return STATE_DIR / self.user

    # -- environment ------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The minimal environment a login session of the user would have."""
        if self.mode == "current":
            env = dict(os.environ)
            env.setdefault("XDG_RUNTIME_DIR", str(self.runtime_dir))
            env.setdefault("DBUS_SESSION_BUS_ADDRESS", f"unix:path={self.runtime_dir}/bus")
            return env
        return {
            "HOME": str(self.home),
            "USER": self.user,
            "LOGNAME": self.user,
            "SHELL": "/bin/sh",
            "PATH": USER_PATH,
            # UTF-8 locale so non-ASCII paths round-trip through Python/systemctl.
            "LANG": "C.UTF-8",
            # systemctl --user needs only this ($XDG_RUNTIME_DIR/systemd/private).
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            # busctl --user and D-Bus clients (keyring's SecretService) need this.
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.runtime_dir}/bus",
        }

    def run_as(
        self, argv: Sequence[str | os.PathLike[str]], *, extra_env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run argv as the test user with :meth:`env`; captures text output by default.

        Keyword arguments go to subprocess (timeout kills the whole group).
        """
        env = self.env()
        env.update(extra_env or {})
        args = [os.fspath(a) for a in argv]
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("check", False)
        # runuser keeps the caller's cwd; root's (e.g. /root, 0700) would make
        # getcwd() fail for the user.
        kw.setdefault("cwd", str(self.home))
        if self.mode == "current":
            return run_killing_group(args, env=env, **kw)
        cmd = ["runuser", "-u", self.user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *args]
        return run_killing_group(cmd, env={"PATH": ROOT_PATH}, **kw)

    def systemctl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``systemctl --user ARGS`` as the test user."""
        return self.run_as(["systemctl", "--user", "--no-pager", *args], **kw)

    # -- lifecycle --------------------------------------------------------

    def query_state(self) -> str:
        """``systemctl --user is-system-running`` output, or the error text."""
        try:
            if self.mode == "private":
                pwd.getpwnam(self.user)
            # Bounded: against a half-dead manager systemctl can hang ~25s.
            res = self.systemctl("is-system-running", timeout=5)
        except (KeyError, OSError, subprocess.TimeoutExpired) as exc:
            return f"error: {exc}"
        out = res.stdout.strip() or res.stderr.strip()
        return out.splitlines()[-1] if out else f"error: exit {res.returncode}"

    def unavailable_reason(self) -> str | None:
        """Why :meth:`start` cannot work here, without changing anything."""
        if self.mode == "current":
            state = self.query_state()
            if state in (*UP_STATES, *BOOTING_STATES):
                return None
            return f"current user's systemd --user manager not usable: {state}"
        if os.geteuid() != 0:
            return (
                "a private systemd --user manager needs root (to create the test user and "
                "its cgroup); run as root, or use UserManager.current() with a logged-in session"
            )
        for tool in ("runuser", "setsid", "useradd", "systemctl"):
            if shutil.which(tool, path=ROOT_PATH) is None:
                return f"{tool} not found"
        if not SYSTEMD_BIN.exists():
            return f"{SYSTEMD_BIN} not found (systemd not installed)"
        if self.cgroup is None:
            return "no cgroup2 hierarchy mounted (systemd --user needs one)"
        return None

    def try_start(self) -> str | None:
        """:meth:`start`, returning the failure reason instead of raising.

        A failed start is undone at once (user, lease): the caller skips and
        never reaches its stop().
        """
        try:
            self.start()
        except (HarnessError, OSError, subprocess.SubprocessError, RuntimeError) as exc:
            self.stop()
            return f"{type(exc).__name__}: {exc}" if not isinstance(exc, HarnessError) else str(exc)
        return None

    def start(self) -> str:
        """Ensure the manager runs; return its state ("running" or "degraded")."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise HarnessError(reason)
        if self.mode == "current":
            self.state = self._wait_up()
            return self.state
        self._acquire()
        # Idempotent: a manager left by an earlier run (or by logind) is reused.
        state = self.query_state()
        if state in UP_STATES:
            self.state = state
            return state
        if self._cgroup_populated():
            if state in BOOTING_STATES:
                self.state = self._wait_up()
                return self.state
            # Leftovers of a dead or wedged manager (e.g. an orphaned dbus-daemon).
            self._stop_manager()
        self._prepare_runtime()
        self._launch()
        self.state = self._wait_up()
        return self.state

    def stop(self) -> None:
        """Stop a private manager and everything it runs, delete the user this
        run created and give up the shared host dirs; no-op in current mode."""
        if self.mode == "current":
            return
        try:
            self._stop_manager()
        finally:
            self._release()
            self.state = None

    def _stop_manager(self) -> None:
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            return
        cg = self.cgroup
        clean = self.query_state() in (*UP_STATES, *BOOTING_STATES, "stopping")
        if clean:
            # Clean path: the manager stops its units, then exits.
            try:
                self.systemctl("exit", timeout=10)
            except subprocess.TimeoutExpired:
                clean = False
        if cg is not None and cg.exists():
            if self._wait_cgroup_empty(15.0 if clean else 0.5):
                shared.remove_cgroup(cg)
            else:
                shared.kill_cgroup(cg)
        # Like logind on logout: drop the runtime dir (a stale bus socket would
        # change the next start's error messages).
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        (self.state_dir / "launcher.pid").unlink(missing_ok=True)

    # -- venv ---------------------------------------------------------------

    def default_venv(self) -> Path:
        # Under the test user's home: user-owned without chown, readable under
        # ProtectHome=read-only just like a real pipx install in ~/.local, gone
        # with `userdel -r`, and outside /tmp, which PrivateTmp=true hides.
        return self.home / ".venv-e2e"

    def ensure_venv(self, path: Path | None = None, packages: Sequence[str] = DEFAULT_PACKAGES) -> Path:
        """Create a venv from /usr/bin/python3 as the user and pip-install packages.

        Returns the venv's python. Skips whatever is already there; a package
        given as a path (contains "/") is always (re)installed and must be
        readable by the test user.
        """
        venv = path or self.default_venv()
        py = venv / "bin/python"
        if not py.exists():
            res = self.run_as([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], timeout=300)
            if res.returncode != 0:
                raise HarnessError(f"venv creation failed: {res.stderr.strip()}")
        missing = [p for p in packages if not self._has_dist(py, p)]
        if missing:
            pip_env = {k: v for k, v in os.environ.items() if k.startswith(_PIP_PASSTHROUGH_PREFIXES)}
            res = self.run_as([str(py), "-m", "pip", "install", "--quiet", *missing], extra_env=pip_env, timeout=600)
            if res.returncode != 0:
                raise HarnessError(f"pip install {missing} failed: {res.stderr.strip()}")
        return py

    def _has_dist(self, py: Path, name: str) -> bool:
        if "/" in name:
            return False
        probe = "import sys, importlib.metadata as m; m.version(sys.argv[1])"
        return self.run_as([str(py), "-c", probe, name], timeout=60).returncode == 0

    # -- internals ----------------------------------------------------------

    def _acquire(self) -> None:
        """Under the machine lock: a lease, the shared host dirs, the user."""
        if self._lease is not None:
            return
        with shared.machine_lock():
            lease = shared.open_lease(LEASE_KIND, self.user)
            self._lease = lease
            lease.cgroup = str(self.cgroup) if self.cgroup else None
            lease.paths = [str(self.state_dir)]
            lease.save()
            for path, mode in _HOST_DIRS:
                if not path.is_dir():
                    path.mkdir(mode=mode, parents=True)
                    path.chmod(mode)
                    # the marker outlives a killed run: the last run of any
                    # later session still knows the dir is ours to remove
                    (STATE_DIR / _marker_name(path)).touch()
            try:
                pwd.getpwnam(self.user)
            except KeyError:
                try:
                    shared.create_user(self.user)
                except RuntimeError as exc:
                    raise HarnessError(str(exc))
                self._created_user = True
            lease.paths.append(str(self.runtime_dir))
            lease.save()
        self.state_dir.mkdir(mode=0o700, exist_ok=True)

    def _release(self) -> None:
        """Under the machine lock: delete our user, drop the lease, and the
        host dirs too when no other live run still uses them."""
        if self._lease is None:
            return
        with shared.machine_lock():
            if self._created_user:
                shared.remove_user(self.user)
                self._created_user = False
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self._lease.close()
            self._lease = None
            if shared.live_leases(LEASE_KIND):
                return
            for path, _mode in _HOST_DIRS:
                marker = STATE_DIR / _marker_name(path)
                if marker.exists():
                    # A bare /run/systemd/system makes dpkg maintainer scripts think
                    # systemd is PID 1 and call the absent system bus: undo it.
                    try:
                        path.rmdir()
                    except OSError:
                        pass
                    marker.unlink(missing_ok=True)

    def _prepare_runtime(self) -> None:
        # What pam_systemd/logind would create for a login session.
        rt = self.runtime_dir
        rt.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(rt, self.uid, self.gid)
        rt.chmod(0o700)
        # A cgroup the user owns (delegation): the manager creates its slices
        # and scopes below it.
        cg = self.cgroup
        assert cg is not None
        cg.mkdir(exist_ok=True)
        for p in [cg, *cg.iterdir()]:
            os.chown(p, self.uid, self.gid)

    def _launch(self) -> None:
        cg = self.cgroup
        assert cg is not None
        log = self.state_dir / "launcher.log"
        pidfile = self.state_dir / "launcher.pid"
        pidfile.unlink(missing_ok=True)
        env_args = [f"{k}={v}" for k, v in self.env().items()]
        # A root shell moves itself into the cgroup (the user may not: moving a
        # process needs write access at the common ancestor, the cgroup root),
        # then execs runuser. `setsid -f` double-forks: the manager is not our
        # child (no zombie, no ResourceWarning) and outlives pytest's process group.
        script = 'echo $$ >"$1" && echo $$ >"$2" && shift 2 && exec "$@"'
        argv = ["setsid", "-f", "sh", "-c", script, "sh", str(cg / "cgroup.procs"), str(pidfile)]
        argv += ["runuser", "-u", self.user, "--", "env", "-i", *env_args, str(SYSTEMD_BIN), "--user"]
        with log.open("wb") as out:
            subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/", check=True, env={"PATH": ROOT_PATH}
            )
        # setsid -f returns at once; the pidfile appears only after the cgroup
        # move, which makes _wait_up's "cgroup empty = manager died" check race-free.
        deadline = time.monotonic() + 5
        while not pidfile.exists() or not pidfile.read_text().strip():
            if time.monotonic() > deadline:
                raise HarnessError(f"launcher did not start: {log.read_text(errors='replace')}")
            time.sleep(0.05)

    def launcher_log(self) -> str:
        """stderr of the launcher (runuser errors, manager startup refusals)."""
        log = self.state_dir / "launcher.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def _wait_up(self) -> str:
        deadline = time.monotonic() + self.timeout
        state = self.query_state()
        while state not in UP_STATES and time.monotonic() < deadline:
            if self.mode == "private" and not self._cgroup_populated():
                break  # manager died: no point waiting
            time.sleep(0.2)
            state = self.query_state()
        if state in UP_STATES:
            return state
        tail = ""
        if self.mode == "private":
            tail = "; launcher log: " + " | ".join(self.launcher_log().splitlines()[-5:])
        raise HarnessError(f"systemd --user for {self.user} not up after {self.timeout:.0f}s: {state}{tail}")

    def _cgroup_populated(self) -> bool:
        cg = self.cgroup
        return cg is not None and shared.cgroup_populated(cg)

    def _wait_cgroup_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._cgroup_populated():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


def _marker_name(path: Path) -> str:
    return "created" + str(path).replace("/", "-")
