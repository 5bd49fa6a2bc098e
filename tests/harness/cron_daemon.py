"""Drive the real Debian cron daemon (package ``cron``, Vixie cron 3.0pl1) from tests.

Everything here is stdlib only and assumes Linux + root (the e2e fixture runs as
root and creates an unprivileged user whose crontab is the system under test).

Runs of the suite share the machine's one cron daemon, each with a user of its
own: ``begin_run`` makes the user and starts the daemon if none runs,
``end_run`` deletes the user and stops the daemon once no other live run
needs it, and only if a harness run started it (``shared.py`` keeps count).

Functions that can fail for environmental reasons return a human readable
reason string (``None`` meaning "ok"), so a fixture can either ``pytest.skip``
or, with ``LORE_E2E_REQUIRED=1``, ``pytest.fail`` with that reason.

Facts below were verified against cron 3.0pl1-162 (Debian 12):

* a job runs as ``execle($SHELL, $SHELL, "-c", cmd, NULL, env)`` with
  ``SHELL=/bin/sh`` unless the crontab sets it, cwd ``$HOME``;
* env = PAM env (pam_env: /etc/environment, /etc/default/locale) overridden by
  crontab ``VAR=value`` lines, then defaults ``SHELL=/bin/sh``, ``HOME=<pw_dir>``,
  ``PATH=/usr/bin:/bin`` (only if unset) and ``LOGNAME=<user>`` (always); no USER;
* jobs start about 1 s after the minute; the spool is re-read (by mtime, 1 s
  resolution) right before jobs are matched, so no restart is ever needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import shared

CRON_BIN = "/usr/sbin/cron"
CRONTAB_BIN = "/usr/bin/crontab"
PIDFILE = Path("/run/crond.pid")  # /var/run is a symlink to /run on Debian 12
SPOOL_DIR = Path("/var/spool/cron/crontabs")
PAM_CRON = Path("/etc/pam.d/cron")
DEV_LOG = "/dev/log"
# The Debian default for jobs whose crontab does not set PATH (pathnames.h).
CRON_DEFAULT_PATH = "/usr/bin:/bin"
# cron rejects a command of MAX_COMMAND-1 = 999 bytes or more ("command too long").
CRON_MAX_COMMAND_BYTES = 998
CAP_AUDIT_CONTROL = 30
AUDIT_UID_UNSET = "4294967295"

_PAM_LOGINUID_REQUIRED = re.compile(r"^(\s*session\s+)required(\s+pam_loginuid\.so\b)", re.MULTILINE)

LEASE_KIND = "cron"
USER_PREFIX = "lore-cron"  # a run's user: lore-cron-<random hex>
# The daemon (and /dev/log capture) a harness run started, for whichever run
# leaves last to stop; a daemon somebody else runs has no record and is never
# touched.
DAEMON_RECORD = shared.STATE_ROOT / "cron-daemon.json"
DAEMON_OUTPUT = shared.STATE_ROOT / "cron-daemon.log"  # cron -f's own stdout/stderr
SYSLOG_FILE = shared.STATE_ROOT / "cron-syslog.log"  # what cron sent to /dev/log


# --------------------------------------------------------------------------- install


def ensure_cron_installed(install: bool = True) -> str | None:
    """Make sure cron + crontab exist and PAM lets cron run user jobs.

    Installs the package with apt-get when missing (root only). Returns a
    reason string when that is impossible, else None.
    """
    if not Path("/proc/self").is_dir():
        return "cron e2e needs Linux (/proc missing)"
    if os.geteuid() != 0:
        return "cron e2e needs root (to create a user and run the daemon)"
    if not (os.access(CRON_BIN, os.X_OK) and os.access(CRONTAB_BIN, os.X_OK)):
        if not install:
            return f"{CRON_BIN} or {CRONTAB_BIN} missing and install=False"
        if shutil.which("apt-get") is None:
            return "cron is not installed and apt-get is unavailable"
        # --no-install-recommends: otherwise cron pulls in exim4 (an MTA that
        # then queues mail for every job that prints something).
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "cron"],
        ):
            res = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                return f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()[-500:]}"
        if not os.access(CRON_BIN, os.X_OK):
            return f"apt-get install cron did not provide {CRON_BIN}"
    return ensure_pam_ok()


def _loginuid_write_ok(pid: int | None = None) -> bool:
    """Would pam_loginuid succeed in (a child of) process ``pid``?

    pam_loginuid (session *required* in /etc/pam.d/cron) writes the job user's
    uid to /proc/self/loginuid. The kernel allows that if loginuid is still
    unset, or with CAP_AUDIT_CONTROL. pam_loginuid itself ignores the failure
    when /proc/self/loginuid is absent or inside a user namespace. In e.g. a
    Docker container started from a login session (loginuid set, capability
    dropped) it fails and cron logs "PAM ERROR" and silently skips every job.
    """
    if pid is None:
        # Our own lineage (the daemon we would start inherits it): just try it
        # in a throw-away child - that is exactly what pam_loginuid will do.
        if not Path("/proc/self/loginuid").exists():
            return True
        res = subprocess.run(
            ["/bin/sh", "-c", "printf %s 65534 > /proc/self/loginuid"],
            capture_output=True,
            check=False,
        )
        return res.returncode == 0 or not _full_uid_map("self")
    proc = Path(f"/proc/{pid}")
    try:
        loginuid = (proc / "loginuid").read_text().strip()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if loginuid == AUDIT_UID_UNSET or not _full_uid_map(str(pid)):
        return True
    for line in (proc / "status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_AUDIT_CONTROL & 1)
    return False


def _full_uid_map(pid: str) -> bool:
    # pam_loginuid compares with the initial namespace's map; anything else
    # means "container with user namespace" where it ignores write errors.
    try:
        fields = Path(f"/proc/{pid}/uid_map").read_text().split()
    except OSError:
        return True
    return fields == ["0", "0", "4294967295"]


def pam_loginuid_fix_needed() -> bool:
    """True if cron jobs would die in pam_loginuid on this machine."""
    if not PAM_CRON.exists() or not _PAM_LOGINUID_REQUIRED.search(PAM_CRON.read_text()):
        return False
    pid = _pidfile_pid()
    return not _loginuid_write_ok(pid if pid and _pid_alive(pid) else None)


def ensure_pam_ok() -> str | None:
    """Apply the minimal container PAM fix, idempotently and only if needed.

    The fix: ``session required pam_loginuid.so`` -> ``optional`` in
    /etc/pam.d/cron (other session modules still succeed, so an optional
    failure is ignored). PAM files are read per job: no daemon restart.
    """
    try:
        if not pam_loginuid_fix_needed():
            return None
        text = PAM_CRON.read_text()
        PAM_CRON.write_text(_PAM_LOGINUID_REQUIRED.sub(r"\1optional\2", text))
    except OSError as exc:
        return f"cannot check/patch {PAM_CRON}: {exc}"
    return None


# --------------------------------------------------------------------------- daemon


def _pidfile_pid() -> int | None:
    try:
        return int(PIDFILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    # Zombies still have /proc entries; require a live process named cron.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return comm == "cron" and state != "Z"


def daemon_running() -> bool:
    """A cron daemon is alive (a harness run's or anybody's), judged by its pid file.

    cron holds an flock on /run/crond.pid; a stale file is possible, hence the
    /proc check. (``pgrep -x cron`` is equivalent.)
    """
    pid = _pidfile_pid()
    return pid is not None and _pid_alive(pid)


@dataclass
class CronRun:
    """One run's user, and its hold (lease) on the shared daemon."""

    user: str
    uid: int
    gid: int
    home: Path
    lease: shared.Lease


def begin_run(user: str | None = None, loglevel: int = 15, timeout: float = 10.0) -> CronRun:
    """Create a user of this run's own and make sure a cron daemon runs.

    The daemon is started only if none runs (``cron -f -L loglevel``, detached:
    it may outlive this run while another one still needs it). systemd is not
    PID 1 here, so no ``systemctl``. With no syslogd, a small detached server
    on /dev/log writes what cron says (job start/end, PAM errors, "No MTA") to
    a file ``cron_log()`` reads. Raises RuntimeError with the reason on failure.
    """
    name = user or shared.unique_user(USER_PREFIX)
    with shared.machine_lock():
        lease = shared.open_lease(LEASE_KIND, name)
        try:
            _ensure_daemon(loglevel, timeout)
            shared.create_user(name)
        except BaseException:
            lease.close()
            _stop_daemon_if_unused()
            raise
    pw = pwd.getpwnam(name)
    return CronRun(name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir), lease)


def end_run(run: CronRun) -> None:
    """Delete the run's user (and crontab); stop the daemon if this was the
    last run using it and a harness run started it."""
    with shared.machine_lock():
        shared.remove_user(run.user)
        run.lease.close()
        _stop_daemon_if_unused()


def _ensure_daemon(loglevel: int, timeout: float) -> None:
    if daemon_running():
        return  # a harness run's (the last lease stops it) or somebody else's (never stopped)
    DAEMON_RECORD.unlink(missing_ok=True)  # a recorded daemon that died
    reason = ensure_pam_ok()
    if reason:
        raise RuntimeError(reason)
    record: dict[str, Any] = {}
    if not _dev_log_alive():
        SYSLOG_FILE.write_bytes(b"")
        pid = _detach([sys.executable, "-c", _SYSLOG_SERVER, DEV_LOG, str(SYSLOG_FILE)], "syslog")
        record.update(syslog_pid=pid, syslog_start=shared.process_start(pid))
        _save_record(record)
        deadline = time.monotonic() + timeout
        while not _dev_log_alive():
            if time.monotonic() > deadline or shared.process_start(pid) is None:
                raise RuntimeError(f"the /dev/log capture did not start: {_read(_output('syslog'))!r}")
            time.sleep(0.05)
    pid = _detach([CRON_BIN, "-f", "-L", str(loglevel)], "daemon")
    record.update(pid=pid, start=shared.process_start(pid))
    _save_record(record)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and shared.process_start(pid) is not None:
        if _pidfile_pid() == pid:
            return
        time.sleep(0.05)
    raise RuntimeError(f"cron did not start (pid file {PIDFILE} never named it): {_read(_output('daemon'))!r}")


def _detach(argv: Sequence[str], name: str) -> int:
    """Start argv in a session of its own, not as our child (``setsid -f``):
    it may outlive this run. Returns its pid (the session and group leader)."""
    pidfile = shared.STATE_ROOT / f"cron-{name}.pid"
    pidfile.unlink(missing_ok=True)
    script = 'echo $$ >"$1" && shift && exec "$@"'
    with _output(name).open("wb") as out:
        # umask 022 is what jobs inherit (Debian cron does not set one itself)
        subprocess.run(
            ["setsid", "-f", "sh", "-c", script, "sh", str(pidfile), *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            umask=0o022,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
            check=True,
        )
    deadline = time.monotonic() + 5
    while not _read(pidfile).strip():
        if time.monotonic() > deadline:
            raise RuntimeError(f"setsid did not start {argv[0]}: {_read(_output(name))!r}")
        time.sleep(0.02)
    return int(_read(pidfile))


def _output(name: str) -> Path:
    return DAEMON_OUTPUT if name == "daemon" else shared.STATE_ROOT / f"cron-{name}.log"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _save_record(record: dict[str, Any]) -> None:
    DAEMON_RECORD.write_text(json.dumps(record))


def _stop_daemon_if_unused(timeout: float = 10.0) -> None:
    """Call under the machine lock."""
    if shared.live_leases(LEASE_KIND):
        return
    try:
        record = json.loads(DAEMON_RECORD.read_text())
    except (OSError, ValueError):
        return  # no daemon a harness run started
    if record.get("pid"):
        # its running jobs share its process group (cron does not setsid them)
        _terminate_group(record["pid"], record.get("start"), timeout)
        if _pidfile_pid() == record["pid"]:
            PIDFILE.unlink(missing_ok=True)  # cron leaves it behind on SIGTERM
    if record.get("syslog_pid"):
        _terminate_group(record["syslog_pid"], record.get("syslog_start"), timeout)
        if not _dev_log_alive():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(DEV_LOG)
    DAEMON_RECORD.unlink(missing_ok=True)


def _terminate_group(pid: int, start: str | None, timeout: float) -> None:
    # The start time guards against a pid reused since the record was written.
    if start is None or shared.process_start(pid) != start:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while shared.process_start(pid) == start:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def cron_log(user: str | None = None) -> list[str]:
    """Syslog lines cron sent while a harness capture served /dev/log (empty if
    a real syslogd owns it); with ``user``, only the daemon's own lines and
    that user's (other runs' jobs write here too)."""
    lines = _read(SYSLOG_FILE).splitlines()
    if user is None:
        return lines
    return [line for line in lines if f"({user})" in line or "(CRON)" in line]


# Debian cron logs only via syslog(3) (facility cron), even with -f; with no
# rsyslog in the container every message would be dropped. Run detached by
# whichever run starts the daemon, stopped with it.
_SYSLOG_SERVER = """
import os, socket, sys
path, out = sys.argv[1], sys.argv[2]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
try:
    os.unlink(path)  # the stale socket of a capture that was killed
except FileNotFoundError:
    pass
sock.bind(path)
os.chmod(path, 0o666)
with open(out, "ab", buffering=0) as log:
    while True:
        log.write(sock.recv(65536).rstrip(b"\\n\\0") + b"\\n")
"""


def _dev_log_alive() -> bool:
    try:
        if not stat.S_ISSOCK(os.stat(DEV_LOG).st_mode):
            return os.path.exists(DEV_LOG)  # odd non-socket: leave it alone
    except FileNotFoundError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(DEV_LOG)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def avoid_reload_race(margin: float = 3.0) -> None:
    """Sleep past the first seconds of a minute before (re)installing a crontab.

    cron reloads the spool at ~hh:mm:01 if the spool dir mtime (1 s
    resolution) differs from the last load; a crontab written in that same
    second is missed until the *next* change. Call this before installing.
    """
    sec = time.time() % 60
    if sec < margin:
        time.sleep(margin - sec)


def seconds_until_next_run() -> float:
    """Seconds until cron next fires ``* * * * *`` jobs (they start ~1 s past)."""
    return 60 - time.time() % 60 + 1


# --------------------------------------------------------------------------- users


def user_env(user: str) -> dict[str, str]:
    """A plain login-like environment for ``user`` (run_as's default)."""
    pw = pwd.getpwnam(user)
    return {
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "SHELL": pw.pw_shell or "/bin/sh",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
    }


def run_as(
    user: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    input: str | bytes | None = None,  # same name as subprocess.run
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = 120,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run argv as ``user`` with exactly ``env`` (default ``user_env``), cwd $HOME.

    Uses setuid/setgid/initgroups via subprocess rather than runuser/su, so
    no PAM session and no inherited variables leak in: the env is what we say.
    Output is text (UTF-8, surrogateescape).
    """
    pw = pwd.getpwnam(user)
    groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    data = input.encode() if isinstance(input, str) else input
    res = subprocess.run(
        list(argv),
        env=dict(env) if env is not None else user_env(user),
        cwd=cwd if cwd is not None else pw.pw_dir,
        input=data,
        capture_output=True,
        user=pw.pw_uid,
        group=pw.pw_gid,
        extra_groups=groups,
        umask=0o022,
        timeout=timeout,
        check=check,
    )
    return subprocess.CompletedProcess(
        res.args,
        res.returncode,
        res.stdout.decode("utf-8", "surrogateescape"),
        res.stderr.decode("utf-8", "surrogateescape"),
    )


# --------------------------------------------------------------------------- crontab


def crontab_list(user: str) -> subprocess.CompletedProcess[str]:
    """``crontab -l`` as the user. No crontab: rc 1, stdout "", stderr
    "no crontab for <user>\\n". Otherwise stdout == the installed bytes
    (the spool's 3 "# DO NOT EDIT" header lines are stripped by -l)."""
    return run_as(user, [CRONTAB_BIN, "-l"])


def install_crontab(user: str, text: str) -> None:
    """Install ``text`` as the user's crontab via ``crontab -`` (as that user)."""
    run_as(user, [CRONTAB_BIN, "-"], input=text, check=True)


def remove_crontab(user: str) -> None:
    """Remove the user's crontab; fine if there is none."""
    run_as(user, [CRONTAB_BIN, "-r"])


# --------------------------------------------------------------------------- emulation


def _pam_env_file(path: str) -> dict[str, str]:
    # pam_env's envfile syntax: KEY=VALUE, optional "export ", one pair of
    # surrounding quotes stripped; comments and junk lines ignored.
    out: dict[str, str] = {}
    try:
        lines = Path(path).read_text(errors="surrogateescape").splitlines()
    except OSError:
        return out
    for raw in lines:
        line = raw.strip()
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#") or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


def cron_env(user: str, crontab_vars: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Debian cron gives a job of ``user`` (before /bin/sh adds PWD).

    Verified against the daemon: with an empty /etc/environment and
    /etc/default/locale it is exactly HOME, LOGNAME, PATH=/usr/bin:/bin,
    SHELL=/bin/sh. ``crontab_vars`` are ``NAME=value`` lines of the crontab.
    /etc/security/pam_env.conf is not emulated (all comments on Debian).
    """
    pw = pwd.getpwnam(user)
    env = {**_pam_env_file("/etc/environment"), **_pam_env_file("/etc/default/locale")}
    env.update(crontab_vars or {})
    env.setdefault("SHELL", "/bin/sh")
    env.setdefault("HOME", pw.pw_dir)
    env.setdefault("PATH", CRON_DEFAULT_PATH)
    env["LOGNAME"] = pw.pw_name
    return env


def cron_command_as_executed(line_command: str) -> tuple[str, str | None]:
    """Split a crontab command field the way Debian cron (do_command.c) does.

    Returns (shell_command, stdin). In the command part ``\\%`` -> ``%`` and
    ``\\\\`` -> ``\\`` (Debian patch; other backslashes stay), and the first
    unescaped ``%`` ends the command. The rest becomes stdin with ``%`` ->
    newline, ``\\%`` -> ``%``, other ``\\x`` kept, plus a final newline if the
    data did not end with one. stdin is None when there is no unescaped ``%``
    ("" when the % is last: cron then gives an empty stdin, same as None).
    """
    cmd: list[str] = []
    escaped = False
    for i, ch in enumerate(line_command):
        if escaped:
            if ch in "%\\":
                cmd[-1] = ch  # overwrite the backslash
            else:
                cmd.append(ch)
            escaped = False
        elif ch == "%":
            return "".join(cmd), _cron_stdin(line_command[i + 1 :])
        else:
            cmd.append(ch)
            escaped = ch == "\\"
    return "".join(cmd), None


def _cron_stdin(rest: str) -> str:
    # Port of the stdin-feeding loop in do_command.c (child2).
    out: list[str] = []
    need_newline = False
    escaped = False
    for raw in rest:
        ch = raw
        if escaped:
            if ch != "%":
                out.append("\\")
        elif ch == "%":
            ch = "\n"
        escaped = ch == "\\"
        if not escaped:
            out.append(ch)
            need_newline = ch != "\n"
    if escaped:
        out.append("\\")
    if need_newline:
        out.append("\n")
    return "".join(out)


def split_crontab_line(line: str) -> str:
    """The command field of a 5-field user crontab line (``@reboot`` etc. too).

    cron skips blanks after the time fields and keeps everything up to the
    newline, trailing blanks included.
    """
    line = line.rstrip("\n")
    nfields = 1 if line.lstrip().startswith("@") else 5
    m = re.match(rf"\s*(?:\S+[ \t]+){{{nfields}}}", line)
    if m is None:
        raise ValueError(f"not a crontab job line: {line!r}")
    return line[m.end() :]


def run_like_cron(
    user: str,
    line_command: str,
    crontab_vars: Mapping[str, str] | None = None,
    timeout: float | None = 120,
) -> subprocess.CompletedProcess[str]:
    """Run an installed crontab command field exactly as cron would, but now.

    $SHELL -c <command> as the user, in $HOME, with cron's env and stdin.
    """
    env = cron_env(user, crontab_vars)
    command, stdin = cron_command_as_executed(line_command)
    return run_as(
        user,
        [env["SHELL"], "-c", command],
        env=env,
        input=stdin or "",
        cwd=env["HOME"],
        timeout=timeout,
    )
