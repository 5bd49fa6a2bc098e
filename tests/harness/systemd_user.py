"""Start a real ``systemd --user`` manager for end-to-end tests.

Two modes:

* ``private`` (CI, containers, root without a logind session): as root, create
  an unprivileged test user, give it ``/run/user/<uid>`` and a delegated cgroup,
  and launch ``/lib/systemd/systemd --user`` for it, detached.
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
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

DEFAULT_USER = "lore-e2e"
DEFAULT_PACKAGES: tuple[str, ...] = ("platformdirs", "keyring", "tomli-w")
SYSTEMD_BIN = Path("/lib/systemd/systemd")
# Debian's interpreter, not pyenv's: pyenv lives under /root (0700), which the
# test user cannot execute.
SYSTEM_PYTHON = Path("/usr/bin/python3")
USER_PATH = "/usr/local/bin:/usr/bin:/bin"
# For the root-side helpers (runuser, useradd live in sbin).
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Root-owned bookkeeping (pid, log, "we created /run/systemd/system" marker).
STATE_DIR = Path("/run/lore-e2e-harness")
# States in which the manager answers and can run units.
UP_STATES = ("running", "degraded")
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
        # "... mountpoint opts ... - fstype source superopts"
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split(" ")[4])
    return None


class UserManager:
    """A ``systemd --user`` instance that tests can drive with ``systemctl --user``."""

    def __init__(self, user: str = DEFAULT_USER, *, mode: Mode = "private", timeout: float = 30.0) -> None:
        self.user = user
        self.mode: Mode = mode
        self.timeout = timeout
        self.state: str | None = None  # "running" / "degraded" once started

    # -- construction -----------------------------------------------------

    @classmethod
    def current(cls, timeout: float = 30.0) -> UserManager:
        """Use the invoking user's existing manager (developer laptop)."""
        return cls(pwd.getpwuid(os.getuid()).pw_name, mode="current", timeout=timeout)

    @classmethod
    def auto(cls, user: str = DEFAULT_USER, timeout: float = 30.0) -> UserManager:
        """Current user's manager if it answers and we are not root, else private."""
        if os.geteuid() != 0:
            cur = cls.current(timeout)
            if cur.query_state() in UP_STATES:
                return cur
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
            # systemctl --user finds the manager via $XDG_RUNTIME_DIR/systemd/private.
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.runtime_dir}/bus",
        }

    def run_as(
        self, argv: Sequence[str | os.PathLike[str]], *, extra_env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run argv as the test user with :meth:`env`; captures text output by default."""
        env = self.env()
        env.update(extra_env or {})
        args = [os.fspath(a) for a in argv]
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("check", False)
        # runuser keeps the caller's cwd; root's cwd (e.g. /root, 0700) would
        # make getcwd() fail for the user.
        kw.setdefault("cwd", str(self.home))
        if self.mode == "current":
            return subprocess.run(args, env=env, **kw)
        cmd = ["runuser", "-u", self.user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *args]
        return subprocess.run(cmd, env={"PATH": ROOT_PATH}, **kw)

    def systemctl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``systemctl --user ARGS`` as the test user."""
        return self.run_as(["systemctl", "--user", "--no-pager", *args], **kw)

    # -- lifecycle --------------------------------------------------------

    def query_state(self) -> str:
        """``systemctl --user is-system-running`` output, or the error text."""
        try:
            if self.mode == "private":
                pwd.getpwnam(self.user)
            res = self.systemctl("is-system-running", timeout=10)
        except (KeyError, OSError, subprocess.TimeoutExpired) as exc:
            return f"error: {exc}"
        out = res.stdout.strip() or res.stderr.strip()
        return out.splitlines()[-1] if out else f"error: exit {res.returncode}"

    def unavailable_reason(self) -> str | None:
        """Why :meth:`start` cannot work here, without changing anything."""
        if self.mode == "current":
            state = self.query_state()
            return (
                None
                if state in UP_STATES + ("starting", "initializing")
                else (f"current user's systemd --user manager not usable: {state}")
            )
        if os.geteuid() != 0:
            return (
                "private systemd --user manager needs root (to create the test "
                "user and its cgroup); run as root or use UserManager.current()"
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
        """:meth:`start`, returning the failure reason instead of raising."""
        try:
            self.start()
        except HarnessError as exc:
            return str(exc)
        return None

    def start(self) -> str:
        """Ensure the manager runs; return its state ("running" or "degraded")."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise HarnessError(reason)
        if self.mode == "current":
            self.state = self._wait_up()
            return self.state
        self._ensure_user()
        # Idempotent: a manager left by an earlier run (or by logind) is reused.
        state = self.query_state()
        if state in UP_STATES:
            self.state = state
            return state
        if self._cgroup_populated():
            # Something of ours is still there (booting or wedged): wait, then give up.
            self.state = self._wait_up()
            return self.state
        self._prepare_host()
        self._launch()
        self.state = self._wait_up()
        return self.state

    def stop(self) -> None:
        """Stop a private manager and everything it runs; no-op in current mode."""
        if self.mode == "current":
            return
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            return
        cg = self.cgroup
        if self.query_state() in UP_STATES + ("starting", "initializing", "stopping"):
            # Clean path: the manager stops its units, then exits.
            try:
                self.systemctl("exit", timeout=10)
            except subprocess.TimeoutExpired:
                pass  # fall through to killing the cgroup
        if cg is not None and cg.exists():
            if not self._wait_cgroup_empty(cg, 15.0):
                # cgroup.kill SIGKILLs every process in the subtree (kernel >= 5.14).
                try:
                    (cg / "cgroup.kill").write_text("1")
                except OSError:
                    self._kill_pids(cg)
                self._wait_cgroup_empty(cg, 5.0)
            self._remove_cgroup(cg)
        # Like logind on logout: drop the runtime dir (stale bus sockets confuse
        # the next start's error messages).
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        marker = STATE_DIR / "created-run-systemd-system"
        if marker.exists():
            # A bare /run/systemd/system makes dpkg maintainer scripts think systemd
            # is PID 1 and try the (absent) system bus, so remove what we added.
            try:
                Path("/run/systemd/system").rmdir()
            except OSError:
                pass
            marker.unlink(missing_ok=True)
        self.state = None

    # -- venv ---------------------------------------------------------------

    def default_venv(self) -> Path:
        # Under the test user's home: user-owned without chown, readable under
        # ProtectHome=read-only (like a real pipx install in ~/.local), gone with
        # `userdel -r`, and outside /tmp, which PrivateTmp=true hides.
        return self.home / ".venv-e2e"

    def ensure_venv(self, path: Path | None = None, packages: Sequence[str] = DEFAULT_PACKAGES) -> Path:
        """Create a venv from /usr/bin/python3 as the user and pip-install packages.

        Returns the venv's python. Skips whatever is already there.
        """
        venv = path or self.default_venv()
        py = venv / "bin/python"
        if not py.exists():
            res = self.run_as([str(SYSTEM_PYTHON), "-m", "venv", str(venv)])
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
        if "/" in name or name.startswith("."):
            return False  # a path: always (re)install, pip is quick about it
        probe = "import sys, importlib.metadata as m; m.version(sys.argv[1])"
        return self.run_as([str(py), "-c", probe, name]).returncode == 0

    # -- internals ----------------------------------------------------------

    def _ensure_user(self) -> None:
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            res = subprocess.run(
                ["useradd", "-m", "-s", "/bin/sh", self.user],
                capture_output=True,
                text=True,
                check=False,
                env={"PATH": ROOT_PATH},
            )
            if res.returncode != 0:
                raise HarnessError(f"useradd {self.user} failed: {res.stderr.strip()}")

    def _prepare_host(self) -> None:
        STATE_DIR.mkdir(mode=0o700, exist_ok=True)
        sysdir = Path("/run/systemd/system")
        if not sysdir.is_dir():
            # systemd --user refuses to start unless this "booted with systemd"
            # flag exists; remember we created it so stop() can undo it.
            sysdir.mkdir(parents=True)
            (STATE_DIR / "created-run-systemd-system").touch()
        # What pam_systemd/logind would normally create for a session.
        rt = self.runtime_dir
        rt.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(rt, self.uid, self.gid)
        rt.chmod(0o700)
        # A delegated cgroup the user owns: the manager must be able to create
        # its slices/scopes below its own cgroup.
        cg = self.cgroup
        assert cg is not None
        cg.mkdir(exist_ok=True)
        for p in [cg, *cg.iterdir()]:
            os.chown(p, self.uid, self.gid)

    def _launch(self) -> None:
        cg = self.cgroup
        assert cg is not None
        log = STATE_DIR / f"{self.user}.log"
        pidfile = STATE_DIR / f"{self.user}.pid"
        pidfile.unlink(missing_ok=True)
        env_args = [f"{k}={v}" for k, v in self.env().items()]
        # Root shell moves itself into the cgroup (an unprivileged process may
        # not: migration needs write access at the common ancestor), then execs
        # runuser. `setsid -f` double-forks so the manager is not our child (no
        # zombie, no ResourceWarning) and survives pytest's process group.
        script = 'echo $$ >"$1" && echo $$ >"$2" && shift 2 && exec "$@"'
        with log.open("wb") as out:
            subprocess.run(
                [
                    "setsid",
                    "-f",
                    "sh",
                    "-c",
                    script,
                    "sh",
                    str(cg / "cgroup.procs"),
                    str(pidfile),
                    "runuser",
                    "-u",
                    self.user,
                    "--",
                    "env",
                    "-i",
                    *env_args,
                    str(SYSTEMD_BIN),
                    "--user",
                    "--log-target=console",
                    "--log-level=debug",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd="/",
                check=True,
                env={"PATH": ROOT_PATH},
            )
        # (--log-target=console above: no journald here, so without it the
        # manager's own errors, e.g. why a sandbox failed, vanish.)
        # setsid -f returns at once; the pidfile appears only after the cgroup
        # move, so _wait_up's "cgroup empty = manager died" check is race-free.
        deadline = time.monotonic() + 5
        while not pidfile.exists() or not pidfile.read_text().strip():
            if time.monotonic() > deadline:
                raise HarnessError(f"launcher did not start: {log.read_text(errors='replace')}")
            time.sleep(0.05)

    def manager_log(self) -> str:
        """The private manager's own log (its stderr): unit failures, sandbox errors."""
        log = STATE_DIR / f"{self.user}.log"
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
        log = STATE_DIR / f"{self.user}.log"
        tail = ""
        if self.mode == "private" and log.exists():
            tail = "; log: " + " | ".join(log.read_text(errors="replace").splitlines()[-5:])
        raise HarnessError(f"systemd --user for {self.user} not up after {self.timeout:.0f}s: {state}{tail}")

    def _cgroup_populated(self) -> bool:
        cg = self.cgroup
        if cg is None or not cg.exists():
            return False
        # cgroup.events "populated" covers the whole subtree.
        return "populated 1" in (cg / "cgroup.events").read_text()

    def _wait_cgroup_empty(self, cg: Path, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._cgroup_populated():
                return True
            time.sleep(0.1)
        return not self._cgroup_populated()

    @staticmethod
    def _kill_pids(cg: Path) -> None:
        for procs in cg.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass

    @staticmethod
    def _remove_cgroup(cg: Path) -> None:
        # Children first: cgroup dirs can only be rmdir'ed when they have none.
        dirs = sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, cg]:
            try:
                d.rmdir()
            except OSError:
                pass
