"""Drive the real Debian cron daemon (package ``cron``, Vixie cron 3.0pl1) from tests.

Everything here is stdlib only and assumes Linux + root (the e2e fixture runs as
root and creates an unprivileged user whose crontab is the system under test).

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
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

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

# State of the daemon *we* started; never touch a daemon someone else runs.
_proc: subprocess.Popen[bytes] | None = None
_stderr_file: tempfile._TemporaryFileWrapper[bytes] | None = None
_syslog: _SyslogCapture | None = None


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
    """A cron daemon is alive (ours or anybody's), judged by its pid file.

    cron holds an flock on /run/crond.pid; a stale file is possible, hence the
    /proc check. (``pgrep -x cron`` is equivalent.)
    """
    if _proc is not None and _proc.poll() is None:
        return True
    pid = _pidfile_pid()
    return pid is not None and _pid_alive(pid)


def start_daemon(loglevel: int = 15, capture_syslog: bool = True, timeout: float = 10.0) -> None:
    """Start ``cron -f -L loglevel`` as our child unless a daemon already runs.

    systemd is not PID 1 here, so no ``systemctl``; ``service cron start``
    also works but daemonizes (we prefer a child we can reliably stop).
    With ``capture_syslog`` and no syslogd, /dev/log is served by us so
    ``cron_log()`` shows what cron says (job start/end, PAM errors, "No MTA").
    Raises RuntimeError with the reason on failure.
    """
    global _proc, _stderr_file, _syslog
    if daemon_running():
        return
    reason = ensure_pam_ok()
    if reason:
        raise RuntimeError(reason)
    if capture_syslog and _syslog is None:
        _syslog = _SyslogCapture.start()
    _stderr_file = tempfile.NamedTemporaryFile(prefix="cron-stderr-", delete=True)  # noqa: SIM115
    # New session: cron must not get the test's terminal signals; umask 022
    # is what jobs inherit (Debian cron does not set one itself).
    _proc = subprocess.Popen(
        [CRON_BIN, "-f", "-L", str(loglevel)],
        stdin=subprocess.DEVNULL,
        stdout=_stderr_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        umask=0o022,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _proc.poll() is not None:
            break
        if _pidfile_pid() == _proc.pid:
            return
        time.sleep(0.05)
    _stderr_file.seek(0)
    err = _stderr_file.read().decode(errors="replace").strip()
    stop_daemon_if_we_started()
    raise RuntimeError(f"cron did not start (pid file {PIDFILE} never named it): {err!r}")


def stop_daemon_if_we_started(timeout: float = 10.0) -> None:
    """Stop the daemon started by ``start_daemon`` (and its running jobs)."""
    global _proc, _stderr_file, _syslog
    if _proc is not None:
        if _proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(_proc.pid, signal.SIGTERM)
            try:
                _proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(_proc.pid, signal.SIGKILL)
                _proc.wait()
        # cron leaves its pid file behind on SIGTERM.
        if _pidfile_pid() == _proc.pid:
            PIDFILE.unlink(missing_ok=True)
        _proc = None
    if _stderr_file is not None:
        _stderr_file.close()
        _stderr_file = None
    if _syslog is not None:
        _syslog.stop()
        _syslog = None


def cron_log() -> list[str]:
    """Syslog lines captured so far (empty if a real syslogd owns /dev/log)."""
    return list(_syslog.lines) if _syslog is not None else []


class _SyslogCapture:
    """Minimal /dev/log receiver; exists only while our daemon runs.

    Debian cron logs only via syslog(3) (facility cron), even with -f; with no
    rsyslog in the container every message would be dropped.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._run, name="cron-syslog", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls) -> _SyslogCapture | None:
        if _dev_log_alive():
            return None  # a real syslogd: see /var/log/syslog or journalctl
        with contextlib.suppress(FileNotFoundError):
            os.unlink(DEV_LOG)  # stale socket of a crashed capture
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(DEV_LOG)
            os.chmod(DEV_LOG, 0o666)
        except OSError:
            sock.close()
            return None
        return cls(sock)

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.lines.append(data.decode(errors="replace").rstrip("\n\0"))

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(DEV_LOG)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(2)


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


def ensure_user(name: str) -> tuple[int, Path]:
    """Create (if needed) an unprivileged user with a home; return (uid, home)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
        pw = pwd.getpwnam(name)
    home = Path(pw.pw_dir)
    if not home.is_dir():
        home.mkdir(mode=0o755, parents=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
    return pw.pw_uid, home


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
