"""What end-to-end runs on one machine share, and how they share it.

Stdlib only, Linux and root only (like the private-manager and cron harnesses).

Every run of the suite makes its own test users (``unique_user``: a fixed
prefix and a random suffix) and keeps its files under its own
names, so two runs started at once never drive each other's manager, crontab
or home. Only a few things exist once per machine: the host folders a PID 1
systemd would have made (``/run/systemd/system``, ``/run/systemd/unit-root``)
and the cron daemon (it owns ``/run/crond.pid``). Those are reference counted:

* each run holds a *lease* per harness, a JSON file in ``LEASE_DIR`` naming the
  run's pid (and that process's start time, so a reused pid does not count),
  its user and what it created (cgroup, folders);
* the first lease of a kind sets the shared resource up, the last one takes it
  down; leases are opened and closed only under one machine-wide flock
  (``machine_lock``), which is held for bookkeeping only, never for a test;
* a run that was killed leaves its lease behind, with a dead pid: the next run
  to open a lease reaps it (kills what is left in its cgroup, deletes its user,
  crontab and folders) before counting.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Root-owned bookkeeping of all e2e runs on this machine (tmpfs: gone at reboot,
# like everything it describes).
STATE_ROOT = Path("/run/lore-e2e")
LOCK_FILE = STATE_ROOT / "lock"
LOCK_OWNER = STATE_ROOT / "lock.owner"
LEASE_DIR = STATE_ROOT / "leases"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CRON_SPOOL = Path("/var/spool/cron/crontabs")
# useradd refuses longer names (Debian 12 shadow: 32 characters).
MAX_USER_NAME = 32


def log(message: str) -> None:
    """A line on stderr, where pytest -q still shows it (waits, reaping)."""
    print(f"lore e2e harness: {message}", file=sys.stderr, flush=True)


def unique_user(prefix: str) -> str:
    """``<prefix>-<6 random hex>`` that no user and no lease has yet.

    Kept short on purpose: useradd takes 32 characters, but cron and ``ps``
    columns are less generous; the lease records the pid anyway.
    """
    while True:
        name = f"{prefix}-{secrets.token_hex(3)}"
        if len(name) > MAX_USER_NAME:
            raise ValueError(f"user name {name!r} is longer than {MAX_USER_NAME} characters")
        try:
            pwd.getpwnam(name)
        except KeyError:
            if not any(LEASE_DIR.glob(f"*.{name}.json")):
                return name


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22; the command name (field 2) may hold spaces and parentheses
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if fields[0] != "Z" else None


def _ensure_root() -> None:
    STATE_ROOT.mkdir(mode=0o700, exist_ok=True)
    LEASE_DIR.mkdir(mode=0o700, exist_ok=True)


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """Hold the machine-wide bookkeeping lock; say so when another run has it.

    Held only while leases, users and shared resources change (seconds), so a
    wait here is short, but it is never silent.
    """
    _ensure_root()
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = LOCK_OWNER.read_text().strip() or "?"
            except OSError:
                holder = "?"
            log(f"waiting for another e2e run (pid {holder}) to finish setting up or cleaning up...")
            started = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log(f"got the lock after {time.monotonic() - started:.1f}s")
        LOCK_OWNER.write_text(f"{os.getpid()}\n")
        yield
    finally:
        os.close(fd)  # releases the flock


@dataclass
class Lease:
    """One run's hold on a harness kind ("systemd", "cron") and what it made."""

    kind: str
    user: str
    pid: int = field(default_factory=os.getpid)
    pid_start: str | None = field(default_factory=lambda: process_start(os.getpid()))
    cgroup: str | None = None
    paths: list[str] = field(default_factory=list)

    @property
    def file(self) -> Path:
        return LEASE_DIR / f"{self.kind}.{self.user}.json"

    def save(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(self.file)

    def alive(self) -> bool:
        return self.pid_start is not None and process_start(self.pid) == self.pid_start

    def close(self) -> None:
        self.file.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> Lease | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def all_leases() -> list[Lease]:
    leases = []
    for path in sorted(LEASE_DIR.glob("*.json")):
        lease = Lease.load(path)
        if lease is None:
            path.unlink(missing_ok=True)  # torn or foreign: nothing to reap by
        else:
            leases.append(lease)
    return leases


def live_leases(kind: str) -> list[Lease]:
    """The leases of ``kind`` whose run is still alive (call under the lock)."""
    return [lease for lease in all_leases() if lease.kind == kind and lease.alive()]


def open_lease(kind: str, user: str) -> Lease:
    """Reap dead runs' leftovers, then record this run's lease (under the lock).

    The lease exists before anything it names is made, so whatever a killed
    run created is always found by the next one.
    """
    reap_stale()
    lease = Lease(kind, user)
    lease.save()
    return lease


def reap_stale() -> None:
    """Undo what runs that died without cleaning up left behind."""
    for lease in all_leases():
        if lease.alive():
            continue
        log(f"cleaning up after an e2e run that died (pid {lease.pid}, {lease.kind}, user {lease.user})")
        if lease.cgroup:
            kill_cgroup(Path(lease.cgroup))
        for path in lease.paths:
            shutil.rmtree(path, ignore_errors=True)
        remove_user(lease.user)
        lease.close()


def kill_cgroup(cg: Path) -> None:
    """SIGKILL everything in a cgroup subtree, then remove it (deepest first)."""
    if not cg.exists():
        return
    try:
        # cgroup.kill SIGKILLs the whole subtree (kernel >= 5.14)
        (cg / "cgroup.kill").write_text("1")
    except OSError:
        for procs in cg.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while cgroup_populated(cg) and time.monotonic() < deadline:
        time.sleep(0.1)
    remove_cgroup(cg)


def cgroup_populated(cg: Path) -> bool:
    try:
        # "populated" in cgroup.events covers the whole subtree
        return "populated 1" in (cg / "cgroup.events").read_text()
    except OSError:
        return False


def remove_cgroup(cg: Path) -> None:
    # A cgroup dir can be removed only once it has no children.
    dirs = sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for d in [*dirs, cg]:
        with contextlib.suppress(OSError):
            d.rmdir()


def create_user(name: str) -> None:
    """``useradd -m`` (call under the lock: two useradds at once can fail on
    the /etc/passwd lock)."""
    res = subprocess.run(
        ["useradd", "-m", "-s", "/bin/sh", name], capture_output=True, text=True, check=False, env={"PATH": ROOT_PATH}
    )
    if res.returncode != 0:
        raise RuntimeError(f"useradd {name} failed: {res.stderr.strip()}")


def remove_user(name: str) -> None:
    """Delete a test user, its home, its crontab and its runtime folder.

    Call under the lock, after its processes are gone; a failure is reported,
    not raised: it must not turn a passed run into an error.
    """
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return
    (CRON_SPOOL / name).unlink(missing_ok=True)
    shutil.rmtree(f"/run/user/{pw.pw_uid}", ignore_errors=True)
    res = subprocess.run(["userdel", "-r", name], capture_output=True, text=True, check=False, env={"PATH": ROOT_PATH})
    # 12: the home could not be removed; the account itself is gone
    if res.returncode not in (0, 12):
        log(f"userdel -r {name} failed ({res.returncode}): {res.stderr.strip()}")
