#!/usr/bin/env python3
"""lore-service: run `lore` (gitlore) sync by itself, per project, on the OS scheduler.

`lore` syncs GitLab issues and merge requests into a local store in four stages
(issues, mrs, docs, embeddings). When the OS scheduler fires, it starts
`lore-service run --service-id ID`, and `run_service()` decides: it takes the
service's lock (a run never overlaps another), skips when the service is
paused, backing off or not yet due, records a skip (never a failure) when a
condition of the machine holds (its project folder missing, offline, on
battery or metered where service.toml says so, or every slot of the
host-wide run limit staying taken), reads the token from its store, keeps
the machine awake while it runs the critical stages (issues, mrs) and then
the optional ones (docs, embeddings; held back on battery by default) with
timeouts and redacted output, and folds the outcome into status.json:
failures grow a persisted full-jitter backoff, a permanent error or too many
transient ones pause the service (the circuit breaker). `install` is the
other half: it resolves the request (`InstallRequest`), plans every file and
command (`InstallPlan`, which is what `--dry-run` prints), and applies the
plan with a rollback, registering the program with one `SchedulerBackend`
(systemd user timer, cron, launchd, Task Scheduler, or none). `status`,
`doctor` and `logs` only read what those two wrote, and ask the backend for
the scheduler's own view.

Contents. The rule of the order: what a run decides, then how it happens, then
how it gets scheduled, then how people look at it; the plumbing every section
uses is last, in the platform appendix. (Python looks names up when a function
runs, so a section may call what a later one defines; only what a class body
or a decorator needs at import time comes earlier, hence section 1.)
    1. Foundations                the error family and exit codes; `record`
    2. Records                    service.toml, settings.toml, manifest.json, status.json, run records,
                                  scheduler state, checks and plans: typed, validated on read
    3. Policy                     skip rules, classification, backoff, circuit breaker, state
    4. The run                    run_service(): lock, orphans, conditions (offline, battery, metered),
                                  run slot, secret, sleep inhibitor, stages, stop signals, record;
                                  what it tells an observer (RunObserver)
   4b.   Alerts                   failed/paused/recovered/stale once per transition; desktop,
                                  webhook, Healthchecks pings; delivered after the lock, bounded
    5. Install and uninstall      admin turns; InstallRequest -> InstallPlan -> apply (with rollback)
    6. Backends                   SchedulerBackend, its registry, `none`
   6a.   systemd                  hardened user timer + oneshot service
   6b.   cron                     a marked block in the user's crontab
   6c.   launchd                  a LaunchAgent in the GUI domain (macOS)
   6d.   schtasks                 a Task Scheduler task from XML (Windows)
   6e.   Kubernetes               not a backend: `export` prints a CronJob for a cluster
    7. Doctor                     checks with ok/warn/fail and a fix
    8. CLI                        argparse, the commands, rendering, the terminal (colour, marks,
                                  live progress), the robot envelope, main()
    9. Platform appendix
   9a.   System                   the one injectable object for OS calls (clock, randomness,
                                  processes, signals, file locks, platform facts, the desktop
                                  session and HTTP for alerts; power source, metered connection,
                                  reachability, sleep inhibitor)
   9b.   Files and time           atomic writes, trusted opens, state reads, timestamps
   9c.   Identity and paths       service ids, per-user folders
   9d.   Locks and the log        run lock, rotating service log, tail, follow
   9e.   Secrets                  env-file, keyring stores
   9f.   The pinned executable    frozen builds copy themselves to a stable path

Start-up cost matters: `status` must start in a few multiples of a bare
interpreter, so the only modules imported at the top are ones every command
needs (json and argparse, and os, stat, sys, time and abc, which the
interpreter has loaded already); records are built by section 1 rather than
by dataclasses for the same reason, and everything else (subprocess,
threading, tomllib, keyring, ...) is imported in the function that needs it.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time

TYPE_CHECKING = False  # importing typing costs ~1.5 ms of every start-up
if TYPE_CHECKING:  # annotations are strings (__future__), so these are for checkers only
    import subprocess
    from collections.abc import Callable, Iterator, Sequence
    from dataclasses import dataclass as record
    from dataclasses import field
    from typing import Any, ClassVar

__version__ = "0.1.0"
APP_NAME = "lore"
TOOL_NAME = "lore-service"
SCHEMA_VERSION = 1


# ============================================================================
# 1. Foundations: the error family and the record decorator
# ============================================================================


EXIT_OK = 0  # success, including a run skipped by policy
EXIT_FAILED = 1  # the operation failed (critical stage failed, doctor fail)
EXIT_USAGE = 2  # bad input or usage
EXIT_NOT_INSTALLED = 3  # no such service installed
EXIT_STATE = 4  # state file corrupt, unreadable or from a newer schema
EXIT_BUSY = 5  # another run holds the lock
EXIT_SCHEDULER = 6  # scheduler or prerequisite failure

EXIT_CODES = {
    EXIT_OK: "success (a scheduled run that is skipped is a success)",
    EXIT_FAILED: "the operation failed",
    EXIT_USAGE: "bad input or usage",
    EXIT_NOT_INSTALLED: "no such service installed",
    EXIT_STATE: "state file corrupt, unreadable, or written by a newer schema",
    EXIT_BUSY: "busy: another run holds the lock",
    EXIT_SCHEDULER: "scheduler or prerequisite failure",
}


class LoreServiceError(Exception):
    """The one error type: main() turns it into output and an exit status."""

    default_code = "failed"
    default_exit = EXIT_FAILED

    def __init__(self, message: str, hint: str = "", *, code: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code or self.default_code
        self.exit_code = self.default_exit if exit_code is None else exit_code
        # a command that fails but still has a result (a failed run, doctor with
        # failing checks): the envelope is ok:false with both error and data
        self.data: dict[str, Any] | None = None
        self.text = ""

    def payload(self) -> dict[str, str]:
        """The `error` object of the JSON envelope (and of a service that cannot be read)."""
        return {"code": self.code, "message": self.message, "hint": self.hint}

    def with_result(self, data: dict[str, Any], text: str = "") -> LoreServiceError:
        self.data, self.text = data, text
        return self


class UsageError(LoreServiceError):
    default_code = "usage"
    default_exit = EXIT_USAGE


class NotInstalledError(LoreServiceError):
    default_code = "not_installed"
    default_exit = EXIT_NOT_INSTALLED


class StateFileError(LoreServiceError):
    default_code = "state_corrupt"
    default_exit = EXIT_STATE


class BusyError(LoreServiceError):
    default_code = "busy"
    default_exit = EXIT_BUSY


class SchedulerError(LoreServiceError):
    default_code = "scheduler"
    default_exit = EXIT_SCHEDULER


# Manifest, config, status and every internal result are data classes declared
# by annotated fields. At run time `record` builds them with one shared
# __init__/__repr__/__eq__ instead of `dataclasses.dataclass`: importing
# dataclasses pulls in inspect, ast, dis and tokenize, about 0.8x of a whole
# interpreter start, which alone would put `status` over its 3x budget
# (measured on Python 3.11-3.13, README "Performance"). Type checkers see the
# real `dataclasses.dataclass` and `field` (the TYPE_CHECKING import above), so
# a record must stay valid as a dataclass: fields without defaults first, and
# mutable defaults only through field(default_factory=...).

if not TYPE_CHECKING:
    _MISSING = object()

    class _Factory:
        __slots__ = ("make",)

        def __init__(self, make: Callable[[], Any]) -> None:
            self.make = make

    def field(*, default_factory: Callable[[], Any]) -> Any:
        return _Factory(default_factory)

    def _record_repr(self: Any) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in type(self).__record_fields__)
        return f"{type(self).__name__}({shown})"

    def _record_eq(self: Any, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in type(self).__record_fields__)

    def record(cls: type) -> type:
        annotations = cls.__dict__.get("__annotations__", {})
        # annotations are strings (__future__); ClassVar ones are not fields, as in dataclasses
        names = tuple(n for n, a in annotations.items() if not str(a).startswith(("ClassVar", "typing.ClassVar")))
        known = frozenset(names)
        defaults: dict[str, Any] = {}
        for name in names:
            if name in cls.__dict__:
                defaults[name] = cls.__dict__[name]
                if isinstance(defaults[name], _Factory):
                    delattr(cls, name)  # instances get their own value; the class keeps none
            elif defaults:
                raise TypeError(f"{cls.__name__}: field {name!r} without a default follows one with a default")

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            if len(args) > len(names):
                raise TypeError(f"{cls.__name__}() takes {len(names)} fields, {len(args)} given")
            values = dict(zip(names, args, strict=False))  # the rest come from kwargs or defaults
            if kwargs:
                if not known.issuperset(kwargs) or not values.keys().isdisjoint(kwargs):
                    bad = sorted(k for k in kwargs if k not in known or k in values)
                    raise TypeError(f"{cls.__name__}() got unexpected or repeated field(s) {', '.join(bad)}")
                values.update(kwargs)
            if len(values) < len(names):
                for name in names:
                    if name not in values:
                        default = defaults.get(name, _MISSING)
                        if default is _MISSING:
                            raise TypeError(f"{cls.__name__}() missing field {name!r}")
                        values[name] = default.make() if isinstance(default, _Factory) else default
            self.__dict__.update(values)

        cls.__init__ = __init__
        cls.__record_fields__ = names
        if "__repr__" not in cls.__dict__:
            cls.__repr__ = _record_repr
        if "__eq__" not in cls.__dict__:
            cls.__eq__ = _record_eq
            cls.__hash__ = None  # mutable and compared by value, as a dataclass
        return cls


# ============================================================================
# 2. Records: what is configured, registered and recorded
# ============================================================================


STAGES = ("issues", "mrs", "docs", "embeddings")
CRITICAL_STAGES = ("issues", "mrs")
PROFILES: dict[str, tuple[str, ...]] = {
    "fast": ("issues", "mrs"),
    "balanced": ("issues", "mrs", "docs"),
    "full": ("issues", "mrs", "docs", "embeddings"),
}
DEFAULT_PROFILE = "balanced"
DEFAULT_INTERVAL = 30 * 60
DEFAULT_TOKEN_ENV = "GITLAB_TOKEN"
DEFAULT_PERMANENT_CODES = (2, 64, 65, 66, 67, 77, 78, 126, 127)
# A scheduler ends a run after SCHEDULER_TIMEOUT seconds at the least (systemd's
# TimeoutStartSec, a task's ExecutionTimeLimit): our own budget ends a minute
# earlier, so the run records its own timeout before the scheduler kills it.
DEFAULT_RUN_BUDGET = 840
SCHEDULER_TIMEOUT = 900
DEFAULT_STAGE_TIMEOUT = 600
# environment: stored nowhere; `run` reads the variable from its own environment
# (a Kubernetes Secret, CI, your own scheduler): backend none only
TOKEN_SOURCES = ("env-file", "keychain", "credential-manager", "embedded", "environment")
UNSTORED_TOKEN_SOURCES = ("embedded", "environment")
# The stores each OS offers, the default first: the macOS Keychain and Windows
# Credential Manager, so no token sits in a file there; elsewhere an env-file,
# or the Secret Service (`keychain`) where one runs.
OS_TOKEN_STORES = {"darwin": ("keychain",), "win32": ("credential-manager",)}
UNIX_TOKEN_STORES = ("env-file", "keychain")
TOKEN_STORE_OS = {"env-file": "Linux", "keychain": "macOS and Linux", "credential-manager": "Windows"}
TOKEN_SOURCES_CLI = ("auto", *TOKEN_SOURCES)
MIN_INTERVAL = 5 * 60
MAX_INTERVAL = 24 * 3600


def minutes_or_hours(text: str) -> int | None:
    """'30m' or '2h' -> seconds; None for anything else (ASCII digits only, at
    most 5 of them: int() refuses a few thousand, and no valid value needs more)."""
    raw = (text or "").strip().lower()
    if not 2 <= len(raw) <= 6 or raw[-1] not in "mh" or not (raw[:-1].isascii() and raw[:-1].isdigit()):
        return None
    return int(raw[:-1]) * (60 if raw[-1] == "m" else 3600)


def parse_interval(text: str) -> int:
    """'30m' or '2h' -> seconds; only m and h, between 5m and 24h."""
    hint = "use minutes or hours between 5m and 24h, e.g. --interval 30m or --interval 2h"
    seconds = minutes_or_hours(text)
    if seconds is None:
        raise UsageError(f"invalid interval {quoted(text)}", hint, code="bad_interval")
    if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise UsageError(f"interval {quoted(text)} is outside 5m..24h", hint, code="bad_interval")
    return seconds


def parse_duration(text: str, what: str, low: int, high: int) -> int:
    """Minutes or hours, as intervals are written (`90m`, `72h`), within low..high seconds."""
    seconds = minutes_or_hours(text)
    if seconds is None:
        raise ValueError(f"{what} must be minutes or hours, e.g. 90m or 72h")
    if not low <= seconds <= high:
        raise ValueError(f"{what} must be between {format_interval(low)} and {format_interval(high)}")
    return seconds


def default_stale_after(interval_seconds: int, step_seconds: int) -> int:
    """About three missed intervals, plus one scheduler step of lateness, never under an hour."""
    return max(3600, 3 * max(interval_seconds, step_seconds) + step_seconds)


def format_interval(seconds: int) -> str:
    return f"{seconds // 3600}h" if seconds % 3600 == 0 else f"{seconds // 60}m"


def _control_character(text: str, *, tab_ok: bool) -> str | None:
    """The first control character in text, named ("a NUL character", "U+000D"), or None."""
    if text.isprintable():  # the common case, without a Python-level loop (`status --all` checks thousands)
        return None
    bad = next((c for c in text if (ord(c) < 32 and not (tab_ok and c == "\t")) or ord(c) == 127), None)
    if bad is None:
        return None
    return "a NUL character" if bad == "\0" else f"the control character U+{ord(bad):04X}"


def looks_like_token(value: str) -> bool:
    """A GitLab token (glpat-..., gloas-..., ...) or a long run of letters and
    digits: an error message never repeats such a value."""
    if value.startswith("gl") and "-" in value[:12] and len(value) >= 20:
        return True
    return len(value) >= 24 and value.isascii() and any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


def quoted(value: str) -> str:
    """A user's value for an error message, unless it looks like a token."""
    return "(a value that looks like a token, not shown)" if looks_like_token(value) else repr(value)


def validate_env_name(name: str) -> str:
    ok = bool(name) and len(name) <= 128 and name.isascii() and not name[0].isdigit()
    if not ok or not all(c.isalnum() or c == "_" for c in name):
        raise UsageError(
            f"invalid environment variable name {quoted(name)}",
            "use letters, digits and '_', e.g. GITLAB_TOKEN",
            code="bad_env",
        )
    return name


def stage_argv(lore: str, stage: str) -> list[str]:
    return {
        "issues": [lore, "ingest", "--type", "issues"],
        "mrs": [lore, "ingest", "--type", "mrs"],
        "docs": [lore, "generate-docs"],
        "embeddings": [lore, "embed"],
    }[stage]


# One line of service.toml in the layout lore-service writes (tomli_w's): a
# table header, `key = value`, the opening line of a multi-line array, or one
# of its items; the values: basic strings, integers, booleans, `[]`.
_TOML_KEY = r"[A-Za-z0-9_-]+"
_TOML_SCALAR = r'"(?:[^"\\]|\\.)*"|-?(?:0|[1-9][0-9]*)|true|false'
_TOML_LINE = (
    rf"[ \t]*(?:\[(?P<table>{_TOML_KEY}(?:\.{_TOML_KEY})*)\]"
    rf"|(?P<key>{_TOML_KEY})[ \t]*=[ \t]*(?P<value>{_TOML_SCALAR}|\[\]|\[)"
    rf"|(?P<item>{_TOML_SCALAR}),"
    rf"|(?P<close>\]))[ \t]*"
)


def read_simple_toml(text: str) -> dict[str, Any] | None:
    """service.toml read without tomllib when it is in the layout lore-service
    writes; None for anything else (a comment after a value, an inline array,
    a float, a duplicate key...), which tomllib then reads and judges. tomllib
    is pure Python: a fifth of a millisecond per file, which `status --all`
    pays for every service. What this accepts, it reads as tomllib would
    (tests/test_state_files.py compares the two on thousands of variants)."""
    if not text.replace("\n", "").replace("\t", "").isprintable():  # control characters, CR, DEL, surrogates
        return None
    try:
        return _simple_toml_lines(text.split("\n"))
    except ValueError:
        return None


def _simple_toml_lines(lines: list[str]) -> dict[str, Any]:
    import re  # (argparse has loaded it)

    line_re = re.compile(_TOML_LINE)
    root: dict[str, Any] = {}
    table, headers = root, set()
    array: list[Any] | None = None
    for line in lines:
        if not line.strip(" \t") or line.lstrip(" \t").startswith("#"):
            continue
        m = line_re.fullmatch(line)
        if m is None or (array is None) != (m["item"] is None and m["close"] is None):
            raise ValueError(line)
        if array is not None:
            if m["close"] is not None:
                array = None
            else:
                array.append(_toml_scalar(m["item"]))
        elif m["table"] is not None:
            if m["table"] in headers:
                raise ValueError(line)
            headers.add(m["table"])
            table = root
            for part in m["table"].split("."):
                table = table.setdefault(part, {})
                if not isinstance(table, dict):
                    raise ValueError(line)
        elif m["key"] in table:
            raise ValueError(line)
        else:
            value: Any = [] if m["value"] in ("[", "[]") else _toml_scalar(m["value"])
            table[m["key"]] = value
            array = value if m["value"] == "[" else None
    if array is not None:
        raise ValueError("an array is not closed")
    return root


def _toml_scalar(token: str) -> Any:
    """A basic string, integer or boolean token. JSON reads TOML's basic strings
    but for `\\/` (not TOML) and `\\u`/`\\U` (a surrogate pair is not TOML):
    those, which lore-service never writes, are left to tomllib."""
    if token[0] != '"':
        return token == "true" if token in ("true", "false") else int(token)
    if "\\/" in token or "\\u" in token or "\\U" in token:
        raise ValueError(token)
    return json.loads(token)  # (a JSONDecodeError is a ValueError)


@record
class StageConfig:
    name: str
    command: list[str]
    timeout_seconds: int = DEFAULT_STAGE_TIMEOUT
    critical: bool = False


def check_notify_url(text: str, what: str) -> str:
    """A webhook or ping URL: http or https with a host, one line. Errors never
    repeat the value: the URL carries a secret (a ping UUID, a hook's key)."""
    hint = f"give an http:// or https:// URL, e.g. {what} https://hc-ping.com/<uuid>"
    bad = _control_character(text, tab_ok=False) or ("a space" if any(c.isspace() for c in text) else None)
    if bad:
        raise UsageError(f"{what} contains {bad}", hint, code="bad_url")
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  (a port that is not a number raises here)
    except ValueError:
        raise UsageError(f"{what} is not a valid URL", hint, code="bad_url") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{what} is not an http:// or https:// URL with a host", hint, code="bad_url")
    if len(text) > 2048:
        raise UsageError(f"{what} is longer than 2048 characters", hint, code="bad_url")
    return text


def shown_url(url: str) -> str:
    """What status, doctor, logs and robot output show of a webhook or ping
    URL: its scheme and host (and port), never the path, query or user that
    hold its secret."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an invalid URL)"
    host = parts.hostname or ""
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}{port}"


@record
class NotifyConfig:
    """service.toml's [notify]: where alerts go (section 4b)."""

    desktop: bool | None = None  # None: on where the run reaches a desktop session
    webhook: str | None = None
    healthchecks_url: str | None = None

    def shown(self) -> dict[str, Any]:
        """For robot output: the URLs as scheme and host only."""
        return {
            "desktop": self.desktop,
            "webhook": shown_url(self.webhook) if self.webhook else None,
            "healthchecks_url": shown_url(self.healthchecks_url) if self.healthchecks_url else None,
        }

    def to_toml_table(self, redact: bool) -> dict[str, Any]:
        def url(value: str) -> str:
            return shown_url(value) + "/(secret)" if redact else value

        return {
            **({"desktop": self.desktop} if self.desktop is not None else {}),
            **({"webhook": url(self.webhook)} if self.webhook else {}),
            **({"healthchecks_url": url(self.healthchecks_url)} if self.healthchecks_url else {}),
        }

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> NotifyConfig:
        unknown = sorted(set(table) - {"desktop", "webhook", "healthchecks_url"})
        if unknown:
            raise ValueError(f"unknown key notify.{unknown[0]} (keys are desktop, webhook, healthchecks_url)")
        desktop = table.get("desktop")
        if desktop is not None and not isinstance(desktop, bool):
            raise ValueError("notify.desktop must be true or false")
        urls = {k: table.get(k) for k in ("webhook", "healthchecks_url")}
        for key, value in urls.items():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"notify.{key} must be a string (a URL)")
            if value:
                check_notify_url(value, f"notify.{key}")
        return cls(desktop, urls["webhook"] or None, urls["healthchecks_url"] or None)


# on_battery and on_metered: what a run does when the machine is on battery or on
# a metered connection; critical-only skips the optional stages (docs, embeddings)
CONDITION_POLICIES = ("run", "critical-only", "skip")
GITLAB_URL_OFF = "none"  # gitlab_url = "none": no offline check (a proxy, a host that refuses probes)


def validate_gitlab_url(value: object) -> str:
    """gitlab_url as service.toml and --gitlab-url take it: an http or https
    URL with a host and an optional port, no user or password in it (the file
    is no place for credentials); or "none". ValueError says what is wrong."""
    # the messages never repeat the value: a URL may carry a token (https://oauth2:<token>@host)
    expected = 'gitlab_url must be an http or https URL with a host, such as "https://gitlab.example.com", or "none"'
    if value == GITLAB_URL_OFF:
        return GITLAB_URL_OFF
    if not isinstance(value, str) or not value or value != value.strip() or _control_character(value, tab_ok=False):
        raise ValueError(expected)
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        credentials = "@" in parts.netloc
        port = None if credentials else parts.port
    except ValueError as exc:
        raise ValueError(f"gitlab_url is not a valid URL: {exc}") from None
    if credentials:
        raise ValueError("gitlab_url must not hold a user name or password")
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or " " in value:
        raise ValueError(expected)
    if port == 0:
        raise ValueError("gitlab_url has port 0")
    return value


def gitlab_endpoint(url: str | None) -> tuple[str, int] | None:
    """(host, port) that the offline check connects to: the URL's port, else
    443 for https and 80 for http; None when no host is known or the check is off."""
    if not url or url == GITLAB_URL_OFF:
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    return host, parts.port or (443 if parts.scheme.lower() == "https" else 80)


def host_port(host: str, port: int) -> str:
    """host:port as people write it ([::1]:443 for an IPv6 address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@record
class ServiceConfig:
    """service.toml: the user-editable half of an install."""

    interval_seconds: int = DEFAULT_INTERVAL
    profile: str = DEFAULT_PROFILE
    token_env: str = DEFAULT_TOKEN_ENV
    run_budget_seconds: int = DEFAULT_RUN_BUDGET
    backoff_base_seconds: int = 60
    backoff_cap_seconds: int = 3600
    circuit_breaker_threshold: int = 8
    stale_after_seconds: int | None = None  # None: default_stale_after() of the interval
    permanent_exit_codes: list[int] = field(default_factory=lambda: list(DEFAULT_PERMANENT_CODES))
    log_max_bytes: int = 5 * 1024 * 1024
    log_backups: int = 3
    extra_write_paths: list[str] = field(default_factory=list)
    # conditions of the machine (section 4): the GitLab host the offline check
    # connects to (None: none known, no check), and what battery and metered do
    gitlab_url: str | None = None
    on_battery: str = "critical-only"
    on_metered: str = "run"
    inhibit_sleep: bool = True  # hold off system sleep while the stages run
    stages: dict[str, StageConfig] = field(default_factory=dict)
    notify: NotifyConfig = field(default_factory=NotifyConfig)

    @classmethod
    def defaults(cls, lore: str) -> ServiceConfig:
        return cls(
            stages={s: StageConfig(s, stage_argv(lore, s), DEFAULT_STAGE_TIMEOUT, s in CRITICAL_STAGES) for s in STAGES}
        )

    def active_stages(self) -> list[StageConfig]:
        return [self.stages[s] for s in PROFILES[self.profile] if s in self.stages]

    def to_toml(self, service_id: str, redact: bool = False) -> str:
        """The file's text; redact: webhook and ping URLs cut to scheme and host (what --dry-run shows)."""
        import tomli_w

        doc: dict[str, Any] = {
            "interval": format_interval(self.interval_seconds),
            "profile": self.profile,
            "token_env": self.token_env,
            "run_budget_seconds": self.run_budget_seconds,
            **({"stale_after": format_interval(self.stale_after_seconds)} if self.stale_after_seconds else {}),
            "extra_write_paths": self.extra_write_paths,
            **({"gitlab_url": self.gitlab_url} if self.gitlab_url else {}),
            "on_battery": self.on_battery,
            "on_metered": self.on_metered,
            "inhibit_sleep": self.inhibit_sleep,
            "backoff": {"base_seconds": self.backoff_base_seconds, "cap_seconds": self.backoff_cap_seconds},
            "circuit_breaker": {
                "threshold": self.circuit_breaker_threshold,
                "permanent_exit_codes": self.permanent_exit_codes,
            },
            "log": {"max_bytes": self.log_max_bytes, "backups": self.log_backups},
            "stages": {
                s.name: {"command": s.command, "timeout_seconds": s.timeout_seconds, "critical": s.critical}
                for s in self.stages.values()
            },
        }
        notify = self.notify.to_toml_table(redact)
        if notify:
            doc["notify"] = notify
        header = (
            f"# lore-service configuration for service {service_id}.\n"
            "# Edit freely; `run` reads it every time. interval and profile take effect\n"
            "# in the OS scheduler after `lore-service install` is run again.\n"
            "# extra_write_paths: folders outside the project that stages write to\n"
            "# (where lore keeps its database); the systemd sandbox allows exactly these.\n"
            "# [notify]: desktop = true|false (default: on where a desktop session is\n"
            '# reachable), webhook = "https://...", healthchecks_url = "https://hc-ping.com/<uuid>".\n'
            "# gitlab_url: the host a run checks it can reach before it starts (else it is\n"
            '# skipped as offline); "none" turns the check off. on_battery, on_metered:\n'
            '# "run", "critical-only" (skip docs and embeddings) or "skip" (the whole run).\n'
            "# inhibit_sleep: keep the machine from sleeping while the stages run.\n\n"
        )
        return header + tomli_w.dumps(doc)

    @classmethod
    def from_toml(cls, text: str, path: str) -> ServiceConfig:
        doc = read_simple_toml(text)
        if doc is not None:
            return cls._checked(doc, path)
        import tomllib

        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise StateFileError(
                f"config {path} is not valid TOML: {exc}",
                "fix the file by hand or re-run install",
                code="config_invalid",
            ) from None
        return cls._checked(doc, path)

    @classmethod
    def _checked(cls, doc: dict[str, Any], path: str) -> ServiceConfig:
        try:
            return cls._from_doc(doc)
        except (KeyError, TypeError, ValueError, UsageError) as exc:
            detail = exc.message if isinstance(exc, LoreServiceError) else str(exc)
            raise StateFileError(
                f"config {path} is invalid: {detail}",
                "fix the value by hand, or delete the file and re-run install",
                code="config_invalid",
            ) from None

    def _conditions_from_doc(self, doc: dict[str, Any]) -> None:
        """gitlab_url, on_battery, on_metered and inhibit_sleep (section 4's conditions)."""
        if "gitlab_url" in doc:
            self.gitlab_url = validate_gitlab_url(doc["gitlab_url"])
        for key in ("on_battery", "on_metered"):
            value = doc.get(key, getattr(self, key))
            if value not in CONDITION_POLICIES:
                raise ValueError(f"{key} must be one of {', '.join(repr(p) for p in CONDITION_POLICIES)}")
            setattr(self, key, value)
        self.inhibit_sleep = doc.get("inhibit_sleep", self.inhibit_sleep)
        if not isinstance(self.inhibit_sleep, bool):
            raise ValueError("inhibit_sleep must be true or false")

    @classmethod
    def _from_doc(cls, doc: dict[str, Any]) -> ServiceConfig:
        def integer(value: Any, name: str, low: int, high: int) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in {low}..{high}")
            return value

        def table(parent: dict[str, Any], name: str) -> dict[str, Any]:
            value = parent.get(name, {})
            if not isinstance(value, dict):
                raise ValueError(f"[{name}] must be a table")
            return value

        cfg = cls()
        cfg.interval_seconds = parse_interval(str(doc.get("interval", "30m")))
        cfg.profile = str(doc.get("profile", DEFAULT_PROFILE))
        if cfg.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}")
        cfg.token_env = validate_env_name(str(doc.get("token_env", DEFAULT_TOKEN_ENV)))
        if "stale_after" in doc:
            cfg.stale_after_seconds = parse_duration(str(doc["stale_after"]), "stale_after", 3600, 30 * 86400)
        cfg.run_budget_seconds = integer(
            doc.get("run_budget_seconds", DEFAULT_RUN_BUDGET), "run_budget_seconds", 1, 86400
        )
        paths = doc.get("extra_write_paths", [])
        if not isinstance(paths, list) or not all(isinstance(p, str) and os.path.isabs(p) for p in paths):
            raise ValueError("extra_write_paths must be a list of absolute paths")
        for path in paths:  # they are written into the systemd unit
            bad = _control_character(path, tab_ok=False)
            if bad:
                raise ValueError(f"extra_write_paths entry {path!r} contains {bad}")
        cfg.extra_write_paths = list(paths)
        cfg._conditions_from_doc(doc)
        backoff = table(doc, "backoff")
        cfg.backoff_base_seconds = integer(backoff.get("base_seconds", 60), "backoff.base_seconds", 1, 86400)
        cfg.backoff_cap_seconds = integer(backoff.get("cap_seconds", 3600), "backoff.cap_seconds", 1, 7 * 86400)
        breaker = table(doc, "circuit_breaker")
        cfg.circuit_breaker_threshold = integer(breaker.get("threshold", 8), "circuit_breaker.threshold", 1, 1000)
        codes = breaker.get("permanent_exit_codes", list(DEFAULT_PERMANENT_CODES))
        if not isinstance(codes, list):
            raise ValueError("circuit_breaker.permanent_exit_codes must be a list of integers")
        cfg.permanent_exit_codes = [integer(c, "permanent_exit_codes[]", 1, 255) for c in codes]
        log = table(doc, "log")
        cfg.log_max_bytes = integer(log.get("max_bytes", 5 * 1024 * 1024), "log.max_bytes", 4096, 1 << 40)
        cfg.log_backups = integer(log.get("backups", 3), "log.backups", 0, 100)
        stages = table(doc, "stages")
        for name, spec in stages.items():
            if name not in STAGES:
                raise ValueError(f"unknown stage {name!r} (stages are {', '.join(STAGES)})")
            if not isinstance(spec, dict):
                raise ValueError(f"[stages.{name}] must be a table")
            critical = spec.get("critical", name in CRITICAL_STAGES)
            if not isinstance(critical, bool):
                raise ValueError(f"stages.{name}.critical must be true or false")
            command = spec.get("command")
            if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
                raise ValueError(f"stages.{name}.command must be a non-empty list of strings")
            bad = next(filter(None, (_control_character(a, tab_ok=True) for a in command)), None)
            if bad:  # a NUL cannot be passed in any OS's argv; the rest would reach the terminal and log
                raise ValueError(f"stages.{name}.command contains {bad}")
            cfg.stages[name] = StageConfig(
                name,
                command,
                integer(spec.get("timeout_seconds", DEFAULT_STAGE_TIMEOUT), f"stages.{name}.timeout_seconds", 1, 86400),
                critical,
            )
        cfg.notify = NotifyConfig.from_table(table(doc, "notify"))
        missing = [s for s in PROFILES[cfg.profile] if s not in cfg.stages]
        if missing:
            raise ValueError(f"profile {cfg.profile} needs [stages.{missing[0]}]")
        return cfg


def load_config(paths: Paths, sid: str) -> ServiceConfig:
    cfg = read_config(paths, sid)
    if cfg is None:
        path = paths.config(sid)
        raise StateFileError(
            f"config {path} is missing", f"re-run `{TOOL_NAME} install` to recreate it", code="config_missing"
        )
    return cfg


def read_config(paths: Paths, sid: str) -> ServiceConfig | None:
    """service.toml, or None when there is none: one read, so an uninstall
    running beside it cannot remove the file between a look and the read."""
    path = paths.config(sid)
    raw = read_state_bytes(path, "config")
    if raw is None:
        return None
    text = user_toml_text(raw, f"config {path}", "save the file as UTF-8, or delete it and re-run install")
    return ServiceConfig.from_toml(text, path)


def user_toml_text(raw: bytes, what: str, fix: str) -> str:
    """A file people edit, as text: an editor's BOM is theirs, not an error."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problem = f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})"
        raise StateFileError(problem, fix, code="config_invalid") from None


def config_or_defaults(paths: Paths, sid: str) -> ServiceConfig:
    """What a backend renders from: the service's config, or the defaults
    before the first install has written one (run reports a broken one)."""
    try:
        return load_config(paths, sid)
    except LoreServiceError:
        return ServiceConfig()


# settings.toml keys: (default, lowest, highest); no file means every default
SETTINGS_KEYS = {
    "max_concurrent_runs": (2, 1, 100),  # runs of all this user's services with a stage running at once
    "busy_wait_seconds": (300, 0, 3600),  # a scheduled run waits this long for a free slot, then is skipped
    "trigger_busy_wait_seconds": (1800, 0, 86400),  # `trigger` waits longer (or until Ctrl-C)
}


@record
class Settings:
    """settings.toml next to the services' folders: what the user decides for
    every service at once (the host-wide run limit). Written by nobody but
    the user; read by every run and by doctor."""

    max_concurrent_runs: int = SETTINGS_KEYS["max_concurrent_runs"][0]
    busy_wait_seconds: int = SETTINGS_KEYS["busy_wait_seconds"][0]
    trigger_busy_wait_seconds: int = SETTINGS_KEYS["trigger_busy_wait_seconds"][0]
    path: str | None = None  # the file it was read from; None: no file, the defaults

    @classmethod
    def from_toml(cls, text: str, path: str) -> Settings:
        import tomllib

        defaults = ", ".join(f"{k} = {d}" for k, (d, _, _) in SETTINGS_KEYS.items())
        hint = f"fix it by hand, or delete {path} to use the defaults ({defaults})"
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise StateFileError(f"settings {path} is not valid TOML: {exc}", hint, code="config_invalid") from None
        settings = cls(path=path)
        for key, value in doc.items():
            if key not in SETTINGS_KEYS:
                raise StateFileError(
                    f"settings {path}: unknown key {key!r} (the keys are {', '.join(SETTINGS_KEYS)})",
                    hint,
                    code="config_invalid",
                )
            _, low, high = SETTINGS_KEYS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise StateFileError(
                    f"settings {path}: {key} must be an integer in {low}..{high}, not {value!r}",
                    hint,
                    code="config_invalid",
                )
            setattr(settings, key, value)
        return settings


def load_settings(paths: Paths) -> Settings:
    """The user's settings.toml (trusted as service.toml is, §3.2); the
    defaults when there is none. A broken one is exit 4, never ignored."""
    path = paths.settings()
    paths.verify_trusted(paths.config_root)
    raw = read_state_bytes(path, "settings")
    if raw is None:
        return Settings()
    text = user_toml_text(raw, f"settings {path}", "save the file as UTF-8, or delete it to use the defaults")
    return Settings.from_toml(text, path)


@record
class Manifest:
    """manifest.json: what `install` registered, read by every command."""

    service_id: str
    project_root: str
    backend: str
    backend_reason: str
    interval_seconds: int
    schedule_step_seconds: int  # how often the scheduler fires; < interval on a coarse schedule (run skips until due)
    profile: str
    token_source: str
    token_env: str
    program: list[str]  # argv the scheduler runs
    lore_path: str | None
    home: str | None
    created_at_iso: str
    updated_at_iso: str
    tool_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "updated_at_iso": self.updated_at_iso,
            "created_at_iso": self.created_at_iso,
            "tool_version": self.tool_version,
            "service_id": self.service_id,
            "project_root": self.project_root,
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "interval_seconds": self.interval_seconds,
            "schedule_step_seconds": self.schedule_step_seconds,
            "profile": self.profile,
            "token_source": self.token_source,
            "token_env": self.token_env,
            "program": self.program,
            "lore_path": self.lore_path,
            "home": self.home,
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any], path: str) -> Manifest:
        f = _Fields(obj, f"manifest {path}")
        sid = f.get("service_id", str)
        if not is_valid_service_id(sid):
            raise f._bad("service_id", "a valid service id")
        interval = f.get("interval_seconds", int)
        if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
            raise f._bad("interval_seconds", "300..86400")
        return cls(
            service_id=sid,
            project_root=f.get("project_root", str),
            backend=f.get("backend", str),
            backend_reason=f.get("backend_reason", str, optional=True, default=""),
            interval_seconds=interval,
            schedule_step_seconds=f.get("schedule_step_seconds", int, optional=True, default=interval),
            profile=f.choice("profile", tuple(PROFILES)),
            token_source=f.choice("token_source", TOKEN_SOURCES),
            token_env=f.get("token_env", str),
            program=f.str_list("program", nonempty=True),
            lore_path=f.get("lore_path", str, optional=True),
            home=f.get("home", str, optional=True),
            created_at_iso=f.get("created_at_iso", str, optional=True, default=""),
            updated_at_iso=f.get("updated_at_iso", str),
            tool_version=f.get("tool_version", str, optional=True, default=""),
            schema_version=f.get("schema_version", int),
        )


def load_manifest(paths: Paths, sid: str) -> Manifest | None:
    """The service's manifest, after its folders are found to be the user's own."""
    paths.verify_service(sid)
    path = paths.manifest(sid)
    obj = read_json_file(path, "manifest")
    return None if obj is None else Manifest.from_dict(obj, path)


def save_manifest(paths: Paths, manifest: Manifest) -> None:
    atomic_write(paths.manifest(manifest.service_id), dump_json(manifest.to_dict()))


HISTORY_LIMIT = 20
STAGE_OUTCOMES = ("success", "failed", "timeout", "skipped")
RUN_OUTCOMES = ("success", "degraded", "failed", "skipped")
# why a run did not start although it was due: a condition of the machine, not
# a failure; checked in this order (a host slot last: an offline run never takes one)
CONDITIONS = ("project_missing", "offline", "on_battery", "metered", "host_busy")
# secret_store: the run could not get its token (a locked keychain, a prompt nobody
# sees, an item gone); retried with backoff like a transient failure
ERROR_CLASSES = ("transient", "permanent", "secret_store")
PAUSE_KINDS = ("permanent_error", "circuit_breaker", "manual")
TRIGGERS = ("scheduled", "manual")
ALERT_EVENTS = ("failed", "paused", "recovered", "stale")


@record
class StageResult:
    stage: str
    critical: bool
    outcome: str
    exit_code: int | None
    duration_ms: int
    error_class: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "critical": self.critical,
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "duration_ms": self.duration_ms,
            "error_class": self.error_class,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, obj: Any, what: str) -> StageResult:
        if not isinstance(obj, dict):
            raise StateFileError(f"{what}: a stage result is not an object", "move the file aside")
        f = _Fields(obj, what)
        return cls(
            stage=f.get("stage", str),
            critical=f.get("critical", bool),
            outcome=f.choice("outcome", STAGE_OUTCOMES),
            exit_code=f.count("exit_code", optional=True, low=-255, high=255),
            duration_ms=f.count("duration_ms"),
            error_class=f.choice("error_class", ERROR_CLASSES, optional=True),
            message=f.get("message", str, optional=True, default=""),
        )


@record
class RunRecord:
    run_id: str
    trigger: str
    started_at_iso: str
    finished_at_iso: str
    duration_ms: int
    outcome: str
    error_class: str | None
    stage_results: list[StageResult]
    started_at_ms: int = 0
    condition: str | None = None  # a skipped run: which of CONDITIONS held
    reason: str | None = None  # a skipped run: what held, in words
    repeats: int = 1  # identical skips in a row, coalesced into one entry

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "trigger": self.trigger,
            "started_at_iso": self.started_at_iso,
            "started_at_ms": self.started_at_ms,
            "finished_at_iso": self.finished_at_iso,
            "duration_ms": self.duration_ms,
            "outcome": self.outcome,
            "error_class": self.error_class,
            "stage_results": [s.to_dict() for s in self.stage_results],
            "condition": self.condition,
            "reason": self.reason,
            "repeats": self.repeats,
        }

    @classmethod
    def from_dict(cls, obj: Any, what: str) -> RunRecord:
        if not isinstance(obj, dict):
            raise StateFileError(f"{what}: a run record is not an object", "move the file aside")
        f = _Fields(obj, what)
        return cls(
            run_id=f.get("run_id", str),
            trigger=f.choice("trigger", TRIGGERS),
            started_at_iso=f.get("started_at_iso", str),
            started_at_ms=f.count("started_at_ms", optional=True) or 0,
            finished_at_iso=f.get("finished_at_iso", str),
            duration_ms=f.count("duration_ms"),
            outcome=f.choice("outcome", RUN_OUTCOMES),
            error_class=f.choice("error_class", ERROR_CLASSES, optional=True),
            stage_results=[StageResult.from_dict(s, what) for s in f.get("stage_results", list)],
            condition=f.choice("condition", CONDITIONS, optional=True),
            reason=f.get("reason", str, optional=True),
            repeats=f.count("repeats", optional=True, low=1) or 1,
        )


@record
class Pause:
    kind: str
    reason: str
    since_iso: str
    hint: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "since_iso": self.since_iso, "hint": self.hint}


@record
class Status:
    """status.json: what happened, and what the policy decided next."""

    service_id: str
    updated_at_iso: str = ""
    last_run: RunRecord | None = None
    consecutive_failures: int = 0
    next_retry_at_ms: int | None = None
    next_due_at_ms: int | None = None  # earliest next scheduled run (coarse cron steps)
    paused: Pause | None = None
    history: list[RunRecord] = field(default_factory=list)
    last_success_at_ms: int | None = None  # the end of the last success or degraded run
    stale_after_seconds: int | None = None  # as the last run found it in service.toml
    last_skip: RunRecord | None = None  # the newest skipped run (last_run is the newest that ran)
    # alerts (section 4b): the last event sent, so each is sent once per transition
    last_alert: str | None = None
    last_alert_at_ms: int | None = None
    desktop_session: bool | None = None  # whether the last scheduled run reached a desktop session
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "updated_at_iso": self.updated_at_iso,
            "service_id": self.service_id,
            "last_run": self.last_run.to_dict() if self.last_run else None,
            "consecutive_failures": self.consecutive_failures,
            "next_retry_at_ms": self.next_retry_at_ms,
            "next_due_at_ms": self.next_due_at_ms,
            "paused": self.paused.to_dict() if self.paused else None,
            "history": [r.to_dict() for r in self.history],
            "last_success_at_ms": self.last_success_at_ms,
            "stale_after_seconds": self.stale_after_seconds,
            "last_skip": self.last_skip.to_dict() if self.last_skip else None,
            "last_alert": self.last_alert,
            "last_alert_at_ms": self.last_alert_at_ms,
            "desktop_session": self.desktop_session,
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any], path: str) -> Status:
        what = f"status {path}"
        f = _Fields(obj, what)
        paused = f.get("paused", dict, optional=True)
        pause = None
        if paused is not None:
            p = _Fields(paused, what + " (paused)")
            pause = Pause(
                p.choice("kind", PAUSE_KINDS),
                p.get("reason", str, optional=True, default=""),
                p.get("since_iso", str, optional=True, default=""),
                p.get("hint", str, optional=True, default=""),
            )
        failures = f.count("consecutive_failures")
        last = f.get("last_run", dict, optional=True)
        skip = f.get("last_skip", dict, optional=True)
        return cls(
            service_id=f.get("service_id", str),
            updated_at_iso=f.get("updated_at_iso", str),
            last_run=RunRecord.from_dict(last, what) if last is not None else None,
            consecutive_failures=failures,
            next_retry_at_ms=f.count("next_retry_at_ms", optional=True),
            next_due_at_ms=f.count("next_due_at_ms", optional=True),
            last_success_at_ms=f.count("last_success_at_ms", optional=True),
            stale_after_seconds=f.count("stale_after_seconds", optional=True),
            last_skip=RunRecord.from_dict(skip, what) if skip is not None else None,
            last_alert=f.choice("last_alert", ALERT_EVENTS, optional=True),
            last_alert_at_ms=f.count("last_alert_at_ms", optional=True),
            desktop_session=f.get("desktop_session", bool, optional=True),
            paused=pause,
            history=[RunRecord.from_dict(r, what) for r in f.get("history", list, optional=True, default=[])],
            schema_version=f.get("schema_version", int),
        )


def load_status(paths: Paths, sid: str) -> Status:
    """The service's status; a fresh one (no runs yet) when the file is absent.
    A command that only reads (`status`, `doctor`) sets paths.read_statuses,
    and each file is then parsed once (its scheduler view reads it too)."""
    kept = paths.read_statuses
    if kept is not None and sid in kept:
        return kept[sid]
    status = _read_status(paths, sid)
    if kept is not None:
        kept[sid] = status
    return status


def _read_status(paths: Paths, sid: str) -> Status:
    path = paths.status(sid)
    obj = read_json_file(path, "status")
    return Status(service_id=sid) if obj is None else Status.from_dict(obj, path)


def save_status(paths: Paths, status: Status, now_ms: int) -> None:
    status.updated_at_iso = iso_from_ms(now_ms)
    atomic_write(paths.status(status.service_id), dump_json(status.to_dict()))


def update_status(paths: Paths, sid: str, system: System, change: Callable[[Status], None]) -> Status:
    """Read-modify-write of status.json under its own short lock, so `pause`
    during a run and the run's own update never lose each other's change."""
    with FileLock(paths.status_lock(sid)):
        return _rewrite_status(paths, sid, system, change)


def update_installed_status(paths: Paths, sid: str, system: System, change: Callable[[Status], None]) -> Status | None:
    """update_status for a writer that holds no run lock of the service (an
    alert claimed after a run, another service's stale event): once uninstall
    has removed the manifest (it does so under this lock) nothing is written
    and no folder is made again; None then."""
    lock = FileLock(paths.status_lock(sid), make_folder=False)
    if not lock.try_acquire(blocking=True):
        if lock.folder_gone:  # uninstalled
            return None
        raise BusyError(f"could not lock {lock.path}", "the next run tries again")  # (msvcrt gave up)
    try:
        return _rewrite_status(paths, sid, system, change) if os.path.lexists(paths.manifest(sid)) else None
    finally:
        lock.release()


def _rewrite_status(paths: Paths, sid: str, system: System, change: Callable[[Status], None]) -> Status:
    status = _read_status(paths, sid)  # the file as it is now, never a read-only command's cached copy
    change(status)
    save_status(paths, status, system.now_ms())
    return status


MAX_STATE_INT = 2**53  # JSON-safe; far beyond any real timestamp in ms


class _Fields:
    """Typed reads from a decoded JSON object; any mismatch is exit 4."""

    def __init__(self, obj: dict[str, Any], what: str) -> None:
        self.obj = obj
        self.what = what

    def _bad(self, key: str, expected: str) -> StateFileError:
        return StateFileError(
            f"{self.what}: field {key!r} should be {expected}, got {self.obj.get(key)!r}",
            "the file is corrupt or hand-edited; move it aside and re-run install",
        )

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False, default: Any = None) -> Any:
        if key not in self.obj or self.obj[key] is None:
            if optional:
                return default
            raise self._bad(key, getattr(kind, "__name__", str(kind)))
        value = self.obj[key]
        if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self._bad(key, getattr(kind, "__name__", str(kind)))
        if not isinstance(value, kind):
            raise self._bad(key, getattr(kind, "__name__", str(kind)))
        return value

    def choice(self, key: str, choices: Sequence[str], *, optional: bool = False) -> Any:
        value = self.get(key, str, optional=optional)
        if value is not None and value not in choices:
            raise self._bad(key, "one of " + "|".join(choices))
        return value

    def str_list(self, key: str, *, nonempty: bool = False) -> list[str]:
        value = self.get(key, list)
        if not all(isinstance(v, str) for v in value) or (nonempty and not value):
            raise self._bad(key, "a non-empty list of strings" if nonempty else "a list of strings")
        return list(value)

    def count(self, key: str, *, optional: bool = False, low: int = 0, high: int = MAX_STATE_INT) -> Any:
        """An integer in range: a timestamp, a duration or a count."""
        value = self.get(key, int, optional=optional)
        if value is not None and not low <= value <= high:
            raise self._bad(key, f"an integer in {low}..{high}")
        return value


@record
class Check:
    name: str
    status: str  # ok | warn | fail
    message: str
    hint: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "message": self.message, "hint": self.hint}


@record
class PlannedFile:
    path: str
    content: str
    mode: int = 0o644
    redacted: str | None = None  # what --dry-run shows when content carries a secret

    def shown(self) -> str:
        return self.content if self.redacted is None else self.redacted

    def __repr__(self) -> str:  # the content may be a token file or an entry with one embedded
        return f"PlannedFile({self.path!r}, mode {self.mode:04o}, {len(self.content)} characters)"


@record
class SchedulerState:
    """SchedulerBackend.state(): the OS scheduler's own view of one entry.
    `status --json` shows it as `scheduler`, `extra` merged in."""

    registered: bool
    active: bool | None  # None: there is no scheduler to be active (backend none)
    detail: str
    drift: list[str] = field(default_factory=list)  # how the entry differs from what install wrote
    next_run_iso: str | None = None
    last_trigger_iso: str | None = None
    last_result: int | str | None = None  # systemd's Result word, launchd's or Task Scheduler's exit code
    # None when the scheduler runs a firing missed during sleep or power-off by
    # itself (soon after wake, boot or login); else what happens instead, one line
    catch_up: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the backend's own facts: units, pid, schedule, ...

    def to_dict(self) -> dict[str, Any]:
        return {
            "registered": self.registered,
            "active": self.active,
            "next_run_iso": self.next_run_iso,
            "last_trigger_iso": self.last_trigger_iso,
            "last_result": self.last_result,
            "drift": self.drift,
            "detail": self.detail,
            "catch_up": self.catch_up,
            **self.extra,
        }


@record
class Plan:
    """A backend's part of an install: its files and commands (InstallPlan holds the rest)."""

    files: list[PlannedFile] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ============================================================================
# 3. Policy: what a run decides
# ============================================================================


@record
class Freshness:
    """Whether a service synced recently enough: computed from the clock
    whenever state is read, so no process has to run for a service to go stale."""

    stale: bool
    stale_since_ms: int | None  # when it went (or will go) stale
    last_success_at_ms: int | None
    stale_after_seconds: int


def freshness(status: Status, manifest: Manifest, now_ms: int) -> Freshness:
    """Stale: not paused, and the last success (or the install, before any) is older than stale_after."""
    after = status.stale_after_seconds or default_stale_after(manifest.interval_seconds, manifest.schedule_step_seconds)
    success = status.last_success_at_ms
    if success is None:  # written by an older lore-service: the history knows
        done = (r for r in status.history if r.outcome in ("success", "degraded"))
        success = next((r.started_at_ms + r.duration_ms for r in done), None)
    base = success if success is not None else ms_from_iso(manifest.created_at_iso)
    if base is None or status.paused:
        return Freshness(False, None, success, after)
    since = base + after * 1000
    return Freshness(now_ms >= since, since, success, after)


def derive_state(status: Status, now_ms: int, running: bool, stale: bool = False) -> str:
    """One word for the service; several may hold (backing off and stale):
    running, then paused, then stale, then the last run's outcome."""
    if running:
        return "running"
    if status.paused:
        return "paused"
    if stale:
        return "stale"
    if status.consecutive_failures > 0 or (status.next_retry_at_ms or 0) > now_ms:
        return "backoff"
    if status.last_run is None:
        return "idle"
    if status.last_run.outcome == "failed":  # resumed after a failure: the next run retries
        return "backoff"
    return "degraded" if status.last_run.outcome == "degraded" else "healthy"


def assess(status: Status, manifest: Manifest, now_ms: int, running: bool) -> tuple[Freshness, str]:
    """Freshness and state from one reading of the clock, as status, list and doctor show them."""
    fresh = freshness(status, manifest, now_ms)
    return fresh, derive_state(status, now_ms, running, fresh.stale)


def skip_reason(status: Status, manifest: Manifest, now_ms: int, trigger: str) -> tuple[str, bool] | None:
    """Why a run must not start now, and whether that is routine (a coarse
    schedule firing before the interval is due: no event worth a log line);
    None to run. Only compares persisted times."""
    if status.paused:
        return f"paused ({status.paused.kind})", False
    if trigger == "manual":
        return None
    if status.next_retry_at_ms is not None and now_ms < status.next_retry_at_ms:
        return f"backing off until {iso_from_ms(status.next_retry_at_ms)}", False
    coarse = manifest.schedule_step_seconds < manifest.interval_seconds
    if coarse and status.next_due_at_ms is not None and now_ms < status.next_due_at_ms:
        return f"not due until {iso_from_ms(status.next_due_at_ms)}", True
    return None


def next_due_ms(manifest: Manifest, started_ms: int) -> int:
    # the slack absorbs the scheduler's own lateness (cron and launchd fire on
    # minute boundaries, a little after the run before it started)
    slack = min(60, manifest.schedule_step_seconds // 2) * 1000
    return started_ms + manifest.interval_seconds * 1000 - slack


def classify_exit(exit_code: int | None, permanent_codes: Sequence[int]) -> tuple[str, str | None]:
    """(outcome, error_class) of a stage that ran to its end."""
    if exit_code == 0:
        return "success", None
    if exit_code is not None and exit_code > 0 and exit_code in permanent_codes:
        return "failed", "permanent"
    return "failed", "transient"  # other codes and signals (negative)


def run_outcome(results: list[StageResult], stopped: bool) -> tuple[str, str | None]:
    """(outcome, error_class) of a run from its stages: a critical failure
    fails it, an optional one degrades it, and a run cut short by a signal is
    failed even if only an optional stage was cut (not a finished sync)."""
    critical_bad = [r for r in results if r.critical and r.outcome in ("failed", "timeout")]
    if critical_bad:
        return "failed", "permanent" if any(r.error_class == "permanent" for r in critical_bad) else "transient"
    if stopped:
        return "failed", "transient"
    optional_bad = [r for r in results if not r.critical and r.outcome in ("failed", "timeout")]
    return ("degraded" if optional_bad else "success"), None


def backoff_delay_ms(failures: int, cfg: ServiceConfig, system: System) -> int:
    """Full jitter: uniform(0, min(cap, base * 2**(n-1))), drawn once."""
    ceiling = min(cfg.backoff_cap_seconds, cfg.backoff_base_seconds * 2 ** min(failures - 1, 62))
    return int(system.uniform(0, ceiling) * 1000)


def apply_skip(status: Status, record: RunRecord, cfg: ServiceConfig) -> None:
    """Fold a skipped run into the status: the history and last_skip only. A
    skip is a condition of the machine (offline, on battery), not a failure:
    it never moves the failures, the backoff, the breaker or the due time, so
    the next firing tries again. Identical skips in a row are one entry."""
    status.stale_after_seconds = cfg.stale_after_seconds
    newest = status.history[0] if status.history else None
    same = newest is not None and (newest.condition, newest.reason) == (record.condition, record.reason)
    if newest is not None and same and newest.outcome == "skipped":
        newest.repeats += 1
        newest.finished_at_iso, newest.duration_ms = record.finished_at_iso, record.duration_ms
        status.last_skip = newest
        return
    status.history = [record, *status.history][:HISTORY_LIMIT]
    status.last_skip = record


def culprit_stage(record: RunRecord) -> StageResult | None:
    """The stage a failed run is told by: the first critical stage that failed
    or timed out, else the first stage that did; None when none ran (no token)."""
    bad = [r for r in record.stage_results if r.outcome in ("failed", "timeout")]
    return next((r for r in bad if r.critical), bad[0] if bad else None)


def apply_outcome(status: Status, record: RunRecord, cfg: ServiceConfig, system: System, now_ms: int) -> None:
    """Fold a finished run into the status: the one place policy decides."""
    status.last_run = record
    status.history = [record, *status.history][:HISTORY_LIMIT]
    status.stale_after_seconds = cfg.stale_after_seconds
    if record.outcome in ("success", "degraded"):
        status.consecutive_failures = 0
        status.next_retry_at_ms = None
        status.last_success_at_ms = now_ms
        return
    culprit = culprit_stage(record)
    detail = f"stage {culprit.stage}: {culprit.message}" if culprit else "a critical stage failed"
    if record.error_class == "secret_store" and record.stage_results:  # no stage ran: say why
        detail = record.stage_results[0].message.removeprefix("skipped: ")
    if record.error_class == "permanent":
        status.next_retry_at_ms = None
        if status.paused is None or status.paused.kind != "manual":
            status.paused = Pause(
                "permanent_error",
                f"permanent failure in {detail}",
                iso_from_ms(now_ms),
                f"fix the cause (see `{TOOL_NAME} logs`), then run `{TOOL_NAME} resume`",
            )
        return
    status.consecutive_failures += 1
    status.next_retry_at_ms = now_ms + backoff_delay_ms(status.consecutive_failures, cfg, system)
    if status.consecutive_failures >= cfg.circuit_breaker_threshold and status.paused is None:
        status.paused = Pause(
            "circuit_breaker",
            f"{status.consecutive_failures} transient failures in a row; last: {detail}",
            iso_from_ms(now_ms),
            f"check the network, GitLab and `{TOOL_NAME} logs`, then run `{TOOL_NAME} resume`",
        )


# ============================================================================
# 4. The run: what happens when the scheduler fires
# ============================================================================


@record
class RunResult:
    """What run_service() did: skipped (and why), or ran (the record, and the
    status the policy left behind)."""

    service_id: str
    skip_reason: str | None = None
    quiet: bool = False  # a routine skip: heard of neither in the log nor the scheduler's output
    record: RunRecord | None = None
    status: Status | None = None


class RunObserver:
    """Who watches a run as it happens; this one hears nothing. `trigger` at a
    terminal passes one that draws each stage (LiveProgress, section 8), so
    the run itself holds no terminal code. stage_output comes from the pump
    threads while the run waits on the stage: an observer must be
    thread-safe, quick, and must not raise."""

    def stage_started(self, stage: str) -> None:
        pass

    def stage_output(self, stage: str, line: str) -> None:
        """One line the stage printed, redacted as the log has it."""

    def stage_finished(self, result: StageResult) -> None:
        pass


def new_run_id(started_ms: int) -> str:
    """`<start ms hex>-<pid hex>`: one spelling, since the stages get it as
    LORE_SERVICE_RUN_ID and the next run finds a stage left behind by it."""
    return f"{started_ms:x}-{os.getpid():x}"


def run_service(
    system: System,
    paths: Paths,
    manifest: Manifest,
    trigger: str,
    notify: Callable[[str], None] | None = None,
    observer: RunObserver | None = None,
) -> RunResult:
    """One attempt at the sync: `run` (trigger "scheduled") when the scheduler
    fires, `trigger` ("manual") when a person asks. Everything it decides is
    persisted before it returns; the CLI only renders the result (and
    `notify` tells a waiting person why nothing happens yet, and `observer`
    hears of each stage as it runs)."""
    sid = manifest.service_id
    cfg = load_config(paths, sid)
    slot = RunSlot(paths, load_settings(paths))  # a broken settings.toml is exit 4 too
    load_status(paths, sid)  # a corrupt status is exit 4 before anything runs
    log = ServiceLog(paths.log(sid), system, cfg.log_max_bytes, cfg.log_backups)
    lock = FileLock(paths.run_lock(sid))
    alerts = RunAlerts(system, paths, manifest, cfg, log)
    result: RunResult | None = None  # set once the run (or its skip by policy) is recorded
    try:
        if not lock.try_acquire():
            if trigger == "manual":
                raise BusyError("another run of this service is in progress", "wait for it; `status` shows it running")
            if not os.path.lexists(paths.manifest(sid)):  # being uninstalled: leave its folders alone
                return RunResult(sid, "the service is being uninstalled", quiet=True)
            log.may_rotate = False  # only the lock holder rotates
            log.write_line("skip", "another run holds the lock")
            return RunResult(sid, "another run holds the lock")
        reap_orphaned_stage(lock.previous_note(), system, log)
        lock.record_owner()
        if manifest.backend in BACKENDS:  # e.g. launchd keeps its crash log bounded
            get_backend(manifest.backend, system, paths).before_run(manifest)
        result = _policy_skip(system, paths, manifest, trigger, log)
        held: Condition | None = None
        if result is None:
            held = check_conditions(system, manifest, cfg)
            if held is None or held.optional_only:  # a run whose optional stages wait still needs a slot
                held = slot.take(system, manifest, cfg, trigger, log, notify) or held
            if held is not None and not held.optional_only:
                result = record_skip(system, paths, manifest, cfg, trigger, held, log)
                return result
        result = result or _run_stages_and_record(
            system, paths, manifest, cfg, trigger, log, lock, alerts, observer, held
        )
        return result
    finally:
        slot.release()
        lock.release()
        if result is not None:  # after the lock: a slow endpoint never holds it (section 4b)
            alerts.finish(result, trigger)
        log.close()


def _policy_skip(system: System, paths: Paths, manifest: Manifest, trigger: str, log: ServiceLog) -> RunResult | None:
    """A skip by policy (paused, backing off, not due), read under the lock;
    a person who triggers a paused service is told, not skipped."""
    sid = manifest.service_id
    status = load_status(paths, sid)
    skip = skip_reason(status, manifest, system.now_ms(), trigger)
    if skip is None:
        return None
    reason, routine = skip
    if trigger == "manual":
        raise LoreServiceError(
            f"{sid} is {reason}: {status.paused.reason if status.paused else ''}".rstrip(": "),
            f"`{TOOL_NAME} resume`, then trigger again",
            code="paused",
        )
    if not routine:
        log.write_line("skip", reason)
    return RunResult(sid, reason, quiet=routine)


# -- conditions: when the machine says "not now" --------------------------------


REACH_TIMEOUT_SECONDS = 3.0  # name lookup and TCP connect together: a run never waits longer to learn it is offline
# the reasons of on_battery and on_metered, also what an optional stage they hold back says ("skipped: on battery")
ON_BATTERY_REASON, METERED_REASON = "on battery", "metered connection"


@record
class Condition:
    """Why a due run does not start: one of CONDITIONS and what held, in words
    (the reason, which identical skips share, so they coalesce; the probe's
    own words go to the log as `detail`). `optional_only`: the condition holds
    back only the optional stages (on_battery or on_metered = "critical-only")."""

    name: str
    reason: str
    detail: str = ""
    optional_only: bool = False


def check_conditions(system: System, manifest: Manifest, cfg: ServiceConfig) -> Condition | None:
    """The first condition that keeps this run from starting, checked in the
    order of CONDITIONS; None to run. A condition is not a failure: the run is
    recorded as skipped and the next firing tries again. A condition that
    holds back only the optional stages is returned when no later one skips
    the whole run."""
    if not os.path.isdir(manifest.project_root):  # a drive not mounted yet, a folder moved
        return Condition("project_missing", f"project folder missing ({manifest.project_root})")
    offline = offline_condition(system, cfg)
    if offline is not None:
        return offline
    partial: Condition | None = None
    for found in _power_and_network(system, cfg):  # (lazily: once one skips the run, no more probing)
        if not found.optional_only:
            return found
        partial = partial or found
    return partial


def offline_condition(system: System, cfg: ServiceConfig) -> Condition | None:
    """Offline: the GitLab host (gitlab_url), or the proxy the sync would go
    through, cannot be reached: name lookup and TCP connect within
    REACH_TIMEOUT_SECONDS. No host known: no check. A stage that fails after
    this passed is an ordinary failure."""
    target = offline_target(cfg, system.environ)
    if target is None:
        return None
    host, port, what = target
    problem = system.reachable(host, port, REACH_TIMEOUT_SECONDS)
    if problem is None:
        return None
    return Condition("offline", f"offline ({what}{host_port(host, port)} unreachable)", problem)


def offline_target(cfg: ServiceConfig, environ: dict[str, str]) -> tuple[str, int, str] | None:
    """What the offline check connects to, as (host, port, "" or "proxy "):
    the GitLab host, or the proxy an HTTP client takes to it (https_proxy /
    http_proxy, then all_proxy, either case, unless no_proxy names the host),
    since behind a proxy the host itself may answer nobody but the proxy."""
    endpoint = gitlab_endpoint(cfg.gitlab_url)
    if endpoint is None or cfg.gitlab_url is None:
        return None
    scheme = cfg.gitlab_url.partition(":")[0].lower()
    names = (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY")
    proxy = next((environ[n] for n in names if environ.get(n)), "")
    if not proxy or _no_proxy(environ, endpoint[0]):
        return (*endpoint, "")
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        port = parts.port
    except ValueError:
        return (*endpoint, "")
    if not parts.hostname:
        return (*endpoint, "")
    default = 1080 if parts.scheme.lower().startswith("socks") else 443 if parts.scheme.lower() == "https" else 80
    return parts.hostname, port or default, "proxy "


def _no_proxy(environ: dict[str, str], host: str) -> bool:
    """no_proxy names the host: `*`, the host, or a domain it is in (`.corp`, `corp`, `*.corp`)."""
    for raw in (environ.get("no_proxy") or environ.get("NO_PROXY") or "").split(","):
        entry = raw.strip().lower()
        if entry == "*":
            return True
        if entry.count(":") == 1:  # host:port (an IPv6 address has more colons)
            entry = entry.partition(":")[0]
        entry = entry.removeprefix("*").lstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


def _power_and_network(system: System, cfg: ServiceConfig) -> Iterator[Condition]:
    """on_battery, then on_metered, each asked of the OS only when its policy
    could change this run: "skip", or "critical-only" with an optional stage
    to hold back. critical-only holds back only the optional stages, unless
    no stage is critical (then nothing would run: the whole run is skipped)."""
    stages = cfg.active_stages()
    optional, critical = any(not s.critical for s in stages), any(s.critical for s in stages)
    probes: tuple[tuple[str, str, str, Callable[[], tuple[Any, str]], Any], ...] = (
        ("on_battery", ON_BATTERY_REASON, cfg.on_battery, system.power_source, "battery"),
        ("metered", METERED_REASON, cfg.on_metered, system.metered, True),
    )
    for name, reason, policy, probe, holding in probes:
        if policy == "skip" or (policy == "critical-only" and optional):
            seen, how = probe()
            if seen == holding:
                yield Condition(name, reason, how, optional_only=policy == "critical-only" and critical)


def record_skip(
    system: System, paths: Paths, manifest: Manifest, cfg: ServiceConfig, trigger: str, held: Condition, log: ServiceLog
) -> RunResult:
    """A due run that a condition kept from starting: logged, and folded into
    the status as a skip (history and last_skip; never the failure count)."""
    now = system.now_ms()
    log.write_line("skip", f"{held.reason}: {held.detail}" if held.detail else held.reason)
    at = iso_from_ms(now)
    run = RunRecord(new_run_id(now), trigger, at, at, 0, "skipped", None, [], now, held.name, held.reason)
    status = update_status(paths, manifest.service_id, system, lambda s: apply_skip(s, run, cfg))
    return RunResult(manifest.service_id, held.reason, record=status.last_skip or run, status=status)


# -- the host-wide run limit: slots -------------------------------------------------
# Twenty services firing at once must not mean twenty `lore` processes. A run
# holds one of max_concurrent_runs OS-locked files while its stages run;
# the lock dies with its process, so a crashed run never keeps a slot. The
# slot is the last condition: a run that is offline never takes one.

SLOT_POLL_SECONDS = (0.5, 3.0)  # a waiting run tries again after a random pause in this range
SLOT_NAME_TRIES, SLOT_NAME_PAUSE_SECONDS = 10, 0.05  # up to 0.5 s for a new holder to name itself
# a scheduled run under a scheduler's time limit (systemd, Task Scheduler) waits
# only as long as its run budget still fits in that limit, less this margin
SLOT_WAIT_MARGIN_SECONDS = 30
SLOTS_FIX = f"the scheduler's entry predates the run limit: run `{TOOL_NAME} install` again"


class RunSlot:
    """The slot this run holds, if any; released by run_service's finally."""

    def __init__(self, paths: Paths, settings: Settings) -> None:
        self.paths, self.settings = paths, settings
        self.held: FileLock | None = None

    @property
    def limit(self) -> int:
        return self.settings.max_concurrent_runs

    def try_take(self, sid: str) -> bool:
        for i in range(self.limit):
            lock = FileLock(self.paths.slot(i))
            if lock.try_acquire():
                lock.record_owner(sid)  # who holds it, for the waiting runs and doctor
                self.held = lock
                return True
        return False

    def take(
        self,
        system: System,
        manifest: Manifest,
        cfg: ServiceConfig,
        trigger: str,
        log: ServiceLog,
        notify: Callable[[str], None] | None = None,
    ) -> Condition | None:
        """Take a free slot (None), waiting up to slot_wait_seconds() with a
        random pause before each try, so runs waiting for slots that free up
        together do not all start in the same second; else the host_busy condition."""
        sid = manifest.service_id
        folder = os.path.dirname(self.paths.slot(0))
        if not system.can_write(folder):  # a sandbox written before the limit: sync anyway, and say so
            log.write_line("run", f"warning: the run limit is not enforced: {folder} is read-only here ({SLOTS_FIX})")
            return None
        self.paths.verify_trusted(folder)  # once: the polls below only take locks in it
        if self.try_take(sid):
            return None
        wait = slot_wait_seconds(self.settings, cfg, manifest, trigger)
        if wait > 0:
            users = self.holders(system)
            in_use = f"{self.limit} of {self.limit} in use" + (f" by: {', '.join(users)}" if users else "")
            log.write_line("run", f"waiting up to {human_duration(wait)} for a free run slot ({in_use})")
            if notify is not None:
                notify(f"waiting for a free run slot ({in_use})…")
            deadline = system.monotonic() + wait
            while (left := deadline - system.monotonic()) > 0:
                system.sleep(min(system.uniform(*SLOT_POLL_SECONDS), left))
                if self.try_take(sid):
                    return None
        return Condition("host_busy", f"host busy ({self.limit} run{'s' if self.limit > 1 else ''} in progress)")

    def holders(self, system: System) -> list[str]:
        """The services holding the slots, as they recorded themselves. A run
        names itself just after it takes its slot, so a slot whose note is not
        yet its live holder's is read again for a moment before it is left out."""
        names: list[str] = []
        for _ in range(1 if System.windows else SLOT_NAME_TRIES):  # (Windows records no note)
            owners = [lock_owner(self.paths.slot(i)) for i in range(self.limit)]
            names = [note for pid, note in owners if note and pid is not None and system.pid_alive(pid)]
            if len(names) == self.limit:
                break
            system.sleep(SLOT_NAME_PAUSE_SECONDS)
        return names

    def release(self) -> None:
        if self.held is not None:
            self.held.clear_owner()
            self.held.release()
            self.held = None


def slot_wait_seconds(settings: Settings, cfg: ServiceConfig, manifest: Manifest, trigger: str) -> int:
    """How long a run waits for a free slot: `trigger` its own (longer) time; a
    scheduled run busy_wait_seconds, but on a scheduler that ends a run after
    scheduler_timeout() never so long that its run budget no longer fits."""
    if trigger == "manual":
        return settings.trigger_busy_wait_seconds
    backend = BACKENDS.get(manifest.backend)
    if backend is None or not backend.time_limit:
        return settings.busy_wait_seconds
    fits = scheduler_timeout(cfg) - cfg.run_budget_seconds - SLOT_WAIT_MARGIN_SECONDS
    return max(0, min(settings.busy_wait_seconds, fits))


def slots_in_use(system: System, paths: Paths, limit: int) -> list[str]:
    """One entry per slot held now (doctor): the service it recorded, "" when
    unknown; probed as lock_is_held does, so asking never makes a run wait."""
    held = []
    for path in (paths.slot(i) for i in range(limit)):
        pid, note = lock_record(path)  # one read for the pid and the name
        if lock_is_held(path, system, pid):
            held.append(note)
    return held


def _run_stages_and_record(
    system: System,
    paths: Paths,
    manifest: Manifest,
    cfg: ServiceConfig,
    trigger: str,
    log: ServiceLog,
    lock: FileLock,
    alerts: RunAlerts,
    observer: RunObserver | None = None,
    held: Condition | None = None,
) -> RunResult:
    system.make_undumpable()  # before the token is in memory: no core dump or ptrace shows it
    try:
        secret = read_secret(paths, manifest, system.environ)
        if secret is None and manifest.token_source in ("keychain", "credential-manager"):
            # the item is gone (deleted in Keychain Access, a new account): no stage can sync
            raise SchedulerError(
                f"the {manifest.token_source} has no token for {manifest.service_id} (the item is missing)",
                f"store one: `printenv {manifest.token_env} | {TOOL_NAME} token --store`",
                code="secret_store",
            )
    except LoreServiceError as exc:  # recorded like any failed run, never a silent stop
        log.write_line("run", f"no token: {exc.message} (fix: {exc.hint})")
        return _record(system, paths, manifest, cfg, token_failure(manifest, cfg, trigger, exc, system.now_ms()))
    if secret is None:
        log.write_line("run", f"warning: no token found in {manifest.token_source}; stages run without {cfg.token_env}")
    hold_optional = held.reason if held is not None else None
    if held is not None:
        log.write_line("run", f"{held.reason}: optional stages skipped ({held.detail})")
    # until restored, SIGTERM ends the waited-on stage and the run is still recorded
    stop = StopSignal()
    restore_signals = system.on_stop_signals(stop)
    alerts.run_started()
    awake: SleepHold | None = None
    try:
        awake = hold_off_sleep(system, cfg, manifest.service_id, log)
        record = run_stages(
            system, manifest, cfg, trigger, log, secret, lock, stop, observer, hold_optional=hold_optional
        )
        return _record(system, paths, manifest, cfg, record)
    finally:
        restore_signals()
        if awake is not None:  # however the run ends; a SIGKILL ends it too (section 9a)
            awake.release()


def hold_off_sleep(system: System, cfg: ServiceConfig, sid: str, log: ServiceLog) -> SleepHold | None:
    """A sleep inhibitor for the stages (inhibit_sleep = true): never a reason
    to fail; where there is none, one log line says so and the run goes on."""
    if not cfg.inhibit_sleep:
        return None
    try:
        awake = system.inhibit_sleep(f"lore sync of {sid} in progress")
    except OSError as exc:  # a pipe or process the OS refused: the sync matters more
        awake = SleepHold("sleep inhibitor", _os_reason(exc))
    if not awake.held:
        log.write_line("run", f"sleep inhibitor unavailable ({awake.problem}); the run goes on without it")
    return awake


def _record(system: System, paths: Paths, manifest: Manifest, cfg: ServiceConfig, record: RunRecord) -> RunResult:
    """Fold a finished run into status.json: what the policy decides next."""

    def change(s: Status) -> None:
        apply_outcome(s, record, cfg, system, system.now_ms())
        s.next_due_at_ms = next_due_ms(manifest, record.started_at_ms)

    status = update_status(paths, manifest.service_id, system, change)
    return RunResult(manifest.service_id, record=record, status=status)


def token_failure(
    manifest: Manifest, cfg: ServiceConfig, trigger: str, exc: LoreServiceError, now_ms: int
) -> RunRecord:
    """The run that could not get its token: failed, error class secret_store,
    every stage skipped with the cause and its fix."""
    why = f"skipped: no token from {manifest.token_source}: {exc.message} (fix: {exc.hint})"
    stages = [StageResult(s.name, s.critical, "skipped", None, 0, None, why) for s in cfg.active_stages()]
    started = iso_from_ms(now_ms)
    run_id = new_run_id(now_ms)
    return RunRecord(run_id, trigger, started, started, 0, "failed", "secret_store", stages, now_ms)


def reap_orphaned_stage(note: str, system: System, log: ServiceLog) -> None:
    """A run killed mid-stage (SIGKILL, out of memory) leaves its stage's
    process group running in a session of its own. The next holder of the
    lock ends it, so two syncs never overlap. Only on Linux, where /proc
    proves the group is that run's (its environment names the run) before
    anything is killed."""
    parts = note.split()
    if len(parts) != 3 or not parts[2].isdigit() or not system.platform.startswith("linux"):
        return
    run_id, pgid = parts[1], int(parts[2])
    env = system.read_proc_environ(pgid)
    if env is None or f"LORE_SERVICE_RUN_ID={run_id}".encode() not in env:
        return
    system.kill_group_id(pgid, hard=True)
    log.write_line("run", f"ended stage process group {pgid} left running by crashed run {run_id}")


def run_stages(
    system: System,
    manifest: Manifest,
    cfg: ServiceConfig,
    trigger: str,
    log: ServiceLog,
    secret: str | None,
    lock: FileLock | None = None,
    stop: StopSignal | None = None,
    observer: RunObserver | None = None,
    *,
    hold_optional: str | None = None,
) -> RunRecord:
    """Critical stages always run; optional ones only after a critical success,
    and not while a condition holds them back (`hold_optional`: on battery...)."""
    stop = stop or StopSignal()
    observer = observer or RunObserver()
    started_ms = system.now_ms()
    start = system.monotonic()
    deadline = start + cfg.run_budget_seconds
    run_id = new_run_id(started_ms)
    env = _stage_environ(system, manifest, cfg, run_id, secret)
    log.write_line("run", f"run {run_id} ({trigger}) profile {cfg.profile} in {manifest.project_root}")
    results: list[StageResult] = []
    stages = cfg.active_stages()

    def on_spawn(pgid: int) -> None:  # lets the next run end this stage if we die
        if lock is not None:
            lock.record_owner(f"{run_id} {pgid}")

    def finish(result: StageResult) -> None:
        results.append(result)
        observer.stage_finished(result)

    ordered = [s for s in stages if s.critical] + [s for s in stages if not s.critical]
    stopped: RunStopped | None = None
    for stage in ordered:
        if stopped is None and stop.signum is not None:  # stopped between two stages
            stopped = RunStopped(stop.signum)
            message = f"stopped by signal {stopped.signum} before it started (the scheduler or system ended the run)"
            log.write_line(stage.name, message)
            finish(StageResult(stage.name, stage.critical, "failed", None, 0, "transient", message))
            continue
        if stopped is not None:
            finish(StageResult(stage.name, stage.critical, "skipped", None, 0, None, "skipped: run stopped"))
            continue
        held_back = _optional_held_back(stage, stages, results, hold_optional)
        if held_back is not None:
            finish(held_back)
            continue
        begun = system.monotonic()
        observer.stage_started(stage.name)
        try:
            where = (manifest.project_root, env, deadline)
            finish(run_stage(system, stage, where, log, cfg, secret, on_spawn, stop, observer))
        except RunStopped as exc:
            stopped = exc
            message = f"stopped by signal {exc.signum} (the scheduler or the system ended the run); group killed"
            log.write_line(stage.name, message)
            took = int((system.monotonic() - begun) * 1000)
            finish(StageResult(stage.name, stage.critical, "failed", None, took, "transient", message))
    order = {name: i for i, name in enumerate(PROFILES[cfg.profile])}
    results.sort(key=lambda r: order.get(r.stage, 99))
    outcome, error_class = run_outcome(results, stopped is not None)
    duration = int((system.monotonic() - start) * 1000)
    log.write_line("run", f"run {run_id} {outcome} in {human_duration(duration / 1000)}")
    return RunRecord(
        run_id=run_id,
        trigger=trigger,
        started_at_iso=iso_from_ms(started_ms),
        started_at_ms=started_ms,
        finished_at_iso=iso_from_ms(started_ms + duration),
        duration_ms=duration,
        outcome=outcome,
        error_class=error_class,
        stage_results=results,
    )


def _stage_environ(
    system: System, manifest: Manifest, cfg: ServiceConfig, run_id: str, secret: str | None
) -> dict[str, str]:
    """The caller's environment, the service and run ids, and the token in token_env."""
    env = dict(system.environ)
    env["LORE_SERVICE_ID"] = manifest.service_id
    env["LORE_SERVICE_RUN_ID"] = run_id
    if secret:
        env[cfg.token_env] = secret
    return env


def _optional_held_back(
    stage: StageConfig, stages: list[StageConfig], results: list[StageResult], hold_optional: str | None
) -> StageResult | None:
    """An optional stage that does not run: a condition holds it back (on
    battery...), or no critical stage succeeded; None to run it."""
    if stage.critical:
        return None
    if hold_optional:
        return StageResult(stage.name, False, "skipped", None, 0, None, f"skipped: {hold_optional}")
    any_critical_ok = any(r.outcome == "success" for r in results if r.critical)
    if not any_critical_ok and any(s.critical for s in stages):
        return StageResult(stage.name, False, "skipped", None, 0, None, "skipped: no critical stage succeeded")
    return None


KILL_GRACE_SECONDS = 3.0
MAX_LINE_BYTES = 64 * 1024  # longer lines are split: memory stays flat


class RunStopped(BaseException):
    """SIGTERM during a run (systemctl stop, shutdown, a scheduler's time
    limit): the running stage is killed and the run still recorded."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignal:
    """The stop-signal handler of one run (SIGTERM, SIGINT, SIGHUP): a signal is noted at once but raised
    only while the run waits on a stage, so the bookkeeping between stages
    (and the write of the run record) is never cut in half."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.waiting = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self.waiting:
            self.waiting = False  # a second signal during the clean-up must not cut it short
            raise RunStopped(signum)

    def raise_if_stopped(self) -> None:
        if self.signum is not None:
            self.waiting = False
            raise RunStopped(self.signum)


def run_stage(
    system: System,
    stage: StageConfig,
    where: tuple[str, dict[str, str], float],
    log: ServiceLog,
    cfg: ServiceConfig,
    secret: str | None,
    on_spawn: Callable[[int], None] | None,
    stop: StopSignal | None,
    observer: RunObserver,
) -> StageResult:
    """One stage in its own process group, in `where` = (cwd, environment,
    monotonic deadline of the run); its output, redacted, to the log and the observer."""
    import subprocess  # (loaded already: spawn started the stage with it)
    import threading

    cwd, env, deadline = where
    stop = stop or StopSignal()

    start = system.monotonic()
    budget = deadline - start
    if budget <= 0:
        log.write_line(stage.name, "not started: the run budget is used up")
        return StageResult(
            stage.name, stage.critical, "timeout", None, 0, "transient", "run budget exhausted before start"
        )
    limit = min(float(stage.timeout_seconds), budget)
    redact = Redactor(secret)
    log.write_line(stage.name, redact.scrub_text("start: " + " ".join(stage.command)))
    try:
        proc = system.spawn(stage.command, cwd=cwd, env=env)
        if on_spawn is not None:
            on_spawn(proc.pid)
    except (OSError, ValueError) as exc:  # ValueError: an argv the OS cannot take
        message = _start_failure(system, stage, cwd, exc)
        log.write_line(stage.name, message)
        return StageResult(stage.name, stage.critical, "failed", None, 0, "permanent", message)
    pump = threading.Thread(target=_pump, args=(proc.stdout, stage.name, log, redact, observer), daemon=True)
    pump.start()
    timed_out = False
    stop.waiting = True  # from here a SIGTERM interrupts the wait
    try:
        stop.raise_if_stopped()  # one that came while the stage was being started
        code: int | None = proc.wait(timeout=limit)
    except RunStopped:  # the scheduler stops us: the stage's group must not outlive the run
        system.kill_group(proc, hard=True)
        proc.wait()
        pump.join(timeout=5)
        raise
    except subprocess.TimeoutExpired:
        stop.waiting = False
        timed_out = True
        system.kill_group(proc, hard=False)
        try:
            code = proc.wait(timeout=KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            system.kill_group(proc, hard=True)
            code = proc.wait()
    finally:
        stop.waiting = False
    # stragglers of a finished stage (or a timed-out one) die with their group
    system.kill_group(proc, hard=True)
    pump.join(timeout=5)
    if proc.stdout is not None and not pump.is_alive():
        proc.stdout.close()
    duration = int((system.monotonic() - start) * 1000)
    error_class: str | None
    if timed_out:
        why = "stage timeout" if limit == stage.timeout_seconds else "run budget"
        message = f"timed out after {human_duration(limit)} ({why}); process group killed"
        outcome, error_class = "timeout", "transient"
    else:
        outcome, error_class = classify_exit(code, cfg.permanent_exit_codes)
        if code is not None and code < 0:
            message = f"killed by signal {-code}"
        else:
            message = "ok" if outcome == "success" else f"exit status {code}"
    log.write_line(stage.name, f"end: {outcome} ({message}) in {human_duration(duration / 1000)}")
    return StageResult(stage.name, stage.critical, outcome, None if timed_out else code, duration, error_class, message)


def _start_failure(system: System, stage: StageConfig, cwd: str, exc: Exception) -> str:
    """Why a stage could not start; when the project folder, not lore, is the cause, it says so."""
    if isinstance(exc, PermissionError) and not system.can_list(cwd):
        message = f"cannot enter the project folder {cwd}: {exc.strerror}"
        if system.platform == "darwin":
            message += f"; macOS keeps it from scheduled jobs: {PRIVACY_FIX}"
        return message
    return f"cannot start {stage.command[0]}: {getattr(exc, 'strerror', None) or exc}"


class Redactor:
    """Replaces the token in stage output and log lines, in the forms a
    program may print it: as is, base64 (standard and URL-safe, with or
    without padding), URL-encoded, and UTF-16 (both byte orders)."""

    def __init__(self, secret: str | None) -> None:
        self.forms: list[bytes] = []
        if secret:
            import base64
            import urllib.parse

            raw = secret.encode()
            forms = {raw, urllib.parse.quote(secret, safe="").encode()}
            forms |= {secret.encode("utf-16-le"), secret.encode("utf-16-be")}
            for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
                forms |= {encoded, encoded.rstrip(b"=")}
            self.forms = sorted((f for f in forms if len(f) > 1), key=len, reverse=True)
        self.longest = max((len(f) for f in self.forms), default=0)

    def scrub(self, data: bytes) -> bytes:
        for form in self.forms:
            data = data.replace(form, SECRET_PLACEHOLDER.encode())
        return data

    def scrub_text(self, text: str) -> str:
        return self.scrub(text.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")


def _pump(stream: Any, stage: str, log: ServiceLog, redact: Redactor, observer: RunObserver) -> None:
    """Child output -> log (and observer), one line at a time. A line longer than
    MAX_LINE_BYTES is written in pieces; the last bytes of each piece (as
    many as the longest form of the token, less one) are carried into the
    next so a token on the cut is still redacted."""
    keep = redact.longest - 1
    carry = b""
    try:
        while True:
            chunk = stream.readline(MAX_LINE_BYTES)
            if not chunk:
                break
            data = redact.scrub(carry + chunk)
            if data.endswith(b"\n") or keep <= 0:
                carry = b""
            else:
                data, carry = data[:-keep], data[-keep:]
            if data:
                line = data.decode("utf-8", "replace").rstrip("\r\n")
                log.write_line(stage, line)
                observer.stage_output(stage, line)
    except (OSError, ValueError):
        pass  # pipe closed under us after a kill
    if carry:
        log.write_line(stage, redact.scrub(carry).decode("utf-8", "replace"))


# ----------------------------------------------------------------------------
# 4b. Alerts: failed, paused, recovered, stale; once per transition
# ----------------------------------------------------------------------------
# A person learns of trouble without looking. After each run (and each skip by
# policy) the service's alert condition (paused, stale, failed or ok) is
# compared with the last event status.json says was sent: a change sends one
# event (`recovered` when it turns ok after a problem), and nothing is sent
# again while it lasts. The same run also looks at every other installed
# service and sends its `stale` event, so a service whose own scheduler died
# is still reported while any other one runs; `status`, `list`, `--check` and
# `doctor` compute staleness at every read, and a Healthchecks server, which
# notices pings that stop, catches a machine or scheduler that stopped
# entirely. Events go to the desktop, a webhook (one JSON event document,
# specs/schemas/event.schema.json) or both; a Healthchecks check gets a ping
# at each run's start and end. Delivery starts after the run lock is released,
# in threads all bounded together by ALERT_BUDGET_SECONDS: a hung endpoint
# delays a run by that much at the most, never holds its lock, never fails
# it, and what failed is logged with the URL cut to its scheme and host.

ALERT_BUDGET_SECONDS = 5.0  # all deliveries of one run together
ALERT_TIMEOUT_SECONDS = 3.0  # one HTTP request or desktop command
PING_LOG_BYTES = 10 * 1024  # the run's last log lines in a Healthchecks ping
EVENT_SCHEMA_VERSION = 1
WINDOWS_POWERSHELL_APP_ID = "{1AC14E77-02E7-4E5D-B744-2EB1AE5198B7}\\WindowsPowerShell\\v1.0\\powershell.exe"


def alert_condition(status: Status, fresh: Freshness) -> str | None:
    """paused > stale > failed > ok: a failing service that has also gone
    stale says so once more; None while a person paused it (no alert)."""
    if status.paused is not None:
        return None if status.paused.kind == "manual" else "paused"
    if fresh.stale:
        return "stale"
    if status.last_run is not None and status.last_run.outcome == "failed":
        return "failed"
    return "ok"


def alert_to_send(last: str | None, condition: str | None) -> str | None:
    """The event a change of condition sends, or None (no change, or nothing to say)."""
    if condition is None or condition == last:
        return None
    if condition == "ok":
        return "recovered" if last in ("failed", "paused", "stale") else None
    return condition


def run_problem(record: RunRecord) -> str:
    """`issues failed: exit status 1`: the stage that failed the run (a critical one first)."""
    culprit = culprit_stage(record)
    if culprit is None:  # no stage ran (no token): the first stage says why
        first = record.stage_results[0].message if record.stage_results else "no stage ran"
        return first.removeprefix("skipped: ")
    return f"{culprit.stage} {culprit.outcome}: {culprit.message}"


def alert_message(event: str, manifest: Manifest, status: Status, fresh: Freshness, now_ms: int) -> str:
    last = status.last_run
    if event == "paused" and status.paused is not None:
        return f"paused ({status.paused.kind}): {status.paused.reason}; fix: {status.paused.hint}"
    if event == "stale":
        return stale_summary(fresh, manifest, now_ms)
    if event == "failed" and last is not None:
        return f"sync failed: {run_problem(last)}"
    if last is not None:
        return f"synced again: last run {last.outcome} in {human_duration(last.duration_ms / 1000)}"
    return "synced again"


def event_document(event: str, manifest: Manifest, status: Status, now_ms: int, host: str) -> dict[str, Any]:
    """The webhook's JSON (specs/schemas/event.schema.json); never the token or a URL."""
    fresh, state = assess(status, manifest, now_ms, False)
    success = fresh.last_success_at_ms
    return {
        "schema_version": EVENT_SCHEMA_VERSION,
        "event": event,
        "service_id": manifest.service_id,
        "project_root": manifest.project_root,
        "host": host,
        "state": state,
        "message": alert_message(event, manifest, status, fresh, now_ms),
        "at_iso": iso_from_ms(now_ms),
        "at_ms": now_ms,
        "stale": fresh.stale,
        "last_success_at_iso": iso_from_ms(success) if success is not None else None,
        "consecutive_failures": status.consecutive_failures,
        "paused": status.paused.to_dict() if status.paused else None,
        "last_run": status.last_run.to_dict() if status.last_run else None,
        "tool_version": __version__,
    }


@record
class Alert:
    """One event of one service, to deliver where its [notify] says."""

    notify: NotifyConfig
    document: dict[str, Any]


def claim_alert(
    system: System,
    paths: Paths,
    manifest: Manifest,
    events: Sequence[str],
    desktop: bool | None = None,
    notify: NotifyConfig | None = None,
) -> Alert | None:
    """The event (one of `events`) the service's condition calls for, marked
    sent in status.json under its status lock (so two runs never both send
    it); desktop: what this scheduled run found, kept for doctor; notify: the
    service's [notify] when the caller has read it already. Nothing is
    written when nothing changed."""
    sid, now = manifest.service_id, system.now_ms()
    status = load_status(paths, sid)
    event = alert_to_send(status.last_alert, alert_condition(status, freshness(status, manifest, now)))
    if (event is None or event not in events) and (desktop is None or desktop == status.desktop_session):
        return None
    claimed: list[str] = []

    def change(s: Status) -> None:
        again = alert_to_send(s.last_alert, alert_condition(s, freshness(s, manifest, now)))
        if again is not None and again in events:
            s.last_alert, s.last_alert_at_ms = again, now
            claimed.append(again)
        if desktop is not None:
            s.desktop_session = desktop

    written = update_installed_status(paths, sid, system, change)
    if written is None or not claimed:  # (uninstalled since it was read)
        return None
    notify = notify if notify is not None else load_config(paths, sid).notify
    return Alert(notify, event_document(claimed[0], manifest, written, now, system.hostname()))


def stale_elsewhere(system: System, paths: Paths, own: str) -> list[Alert]:
    """The `stale` events of the user's other services: one whose scheduler
    stopped is reported by any run that still happens. A service that cannot
    be read is passed over (its own status says why)."""
    alerts: list[Alert] = []
    for sid in paths.installed_ids():
        if sid == own:
            continue
        try:
            manifest = load_manifest(paths, sid)
            alert = claim_alert(system, paths, manifest, ("stale",)) if manifest is not None else None
        except LoreServiceError:
            continue
        if alert is not None:
            alerts.append(alert)
    return alerts


def ping_url(url: str, suffix: str) -> str:
    """A Healthchecks ping URL with /start or /fail added to its path."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + suffix)) if suffix else url


def gvariant_string(text: str) -> str:
    """A GVariant text-format string literal (what `gdbus call` parses)."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 32 or ord(c) == 127:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


WINDOWS_TOAST = (
    "[Windows.UI.Notifications.ToastNotificationManager, Windows.UI.Notifications, ContentType = WindowsRuntime]"
    " > $null; $t = [Windows.UI.Notifications.ToastNotificationManager]::GetTemplateContent("
    "[Windows.UI.Notifications.ToastTemplateType]::ToastText02); $x = $t.GetElementsByTagName('text');"
    " $x.Item(0).AppendChild($t.CreateTextNode($env:LORE_NOTIFY_TITLE)) > $null;"
    " $x.Item(1).AppendChild($t.CreateTextNode($env:LORE_NOTIFY_BODY)) > $null;"
    " [Windows.UI.Notifications.ToastNotificationManager]::CreateToastNotifier($env:LORE_NOTIFY_APP).Show("
    "[Windows.UI.Notifications.ToastNotification]::new($t))"
)


def desktop_command(system: System, session: str, title: str, body: str) -> tuple[list[str], dict[str, str]] | str:
    """The argv and environment that show one notification here, or why there is none.
    The texts are passed as data, never spliced into a script: Linux gets
    GVariant literals, osascript its `argv`, PowerShell environment variables."""
    env = dict(system.environ)
    if system.platform == "darwin":
        script = ["on run argv", "display notification (item 2 of argv) with title (item 1 of argv)", "end run"]
        return ["osascript", *(w for line in script for w in ("-e", line)), title, body], env
    if system.platform == "win32":
        env.update(LORE_NOTIFY_TITLE=title, LORE_NOTIFY_BODY=body, LORE_NOTIFY_APP=WINDOWS_POWERSHELL_APP_ID)
        return ["powershell", "-NoProfile", "-NonInteractive", "-WindowStyle", "Hidden", "-Command", WINDOWS_TOAST], env
    env["DBUS_SESSION_BUS_ADDRESS"] = session
    if system.which("gdbus"):
        dest = ["--dest", "org.freedesktop.Notifications", "--object-path", "/org/freedesktop/Notifications"]
        method = ["--method", "org.freedesktop.Notifications.Notify"]
        args = [gvariant_string(TOOL_NAME), "uint32 0", '""', gvariant_string(title), gvariant_string(body)]
        args += ["@as []", "@a{sv} {}", "int32 -1"]
        return ["gdbus", "call", "--session", *dest, *method, *args], env
    if system.which("notify-send"):
        return ["notify-send", f"--app-name={TOOL_NAME}", title, body], env
    return "neither gdbus nor notify-send is installed (Debian: libglib2.0-bin or libnotify-bin)"


def send_desktop(system: System, title: str, body: str) -> str | None:
    """Show one desktop notification; None when shown, else why not."""
    session = system.desktop_session()
    if session is None:
        return "no desktop session is reachable from this run"
    command = desktop_command(system, session, title, body)
    if isinstance(command, str):
        return command
    argv, env = command
    result = system.run(argv, env=env, timeout=ALERT_TIMEOUT_SECONDS)
    return None if result.ok else f"{argv[0]}: {result.summary()}"


def alert_jobs(system: System, alert: Alert) -> list[tuple[str, Callable[[], str | None]]]:
    """(channel as logged, sender) for each place the alert goes."""
    doc, notify = alert.document, alert.notify
    jobs: list[tuple[str, Callable[[], str | None]]] = []
    if notify.desktop or (notify.desktop is None and system.desktop_session() is not None):
        title = f"{TOOL_NAME}: {doc['service_id']} {doc['event']}"
        jobs.append(("desktop", lambda: send_desktop(system, title, doc["message"])))
    if notify.webhook:
        url, body = notify.webhook, json.dumps(doc).encode()
        post = lambda: system.http_post(url, body, "application/json", ALERT_TIMEOUT_SECONDS)  # noqa: E731
        jobs.append((f"webhook {shown_url(url)}", post))
    return jobs


def deliver(system: System, jobs: list[tuple[str, Callable[[], str | None]]], budget: float) -> list[str]:
    """Run the senders side by side and wait for them `budget` seconds in all;
    returns one line per failure (a sender still waiting is left behind: it
    is a daemon thread, and ends with the process)."""
    import threading

    answers: dict[int, str | None] = {}

    def work(i: int, send: Callable[[], str | None]) -> None:
        try:
            answers[i] = send()
        except Exception as exc:  # a notification never fails the run: whatever went wrong is reported
            answers[i] = f"{type(exc).__name__}"

    threads = [threading.Thread(target=work, args=(i, send), daemon=True) for i, (_, send) in enumerate(jobs)]
    for t in threads:
        t.start()
    deadline = system.monotonic() + budget
    problems = []
    for i, ((channel, _), t) in enumerate(zip(jobs, threads, strict=True)):
        t.join(max(0.0, deadline - system.monotonic()))
        if t.is_alive():
            problems.append(f"{channel}: no answer within {budget:g} s; left behind")
        elif answers.get(i):
            problems.append(f"{channel}: {answers[i]}")
    return problems


class RunAlerts:
    """One run's notifications: its Healthchecks pings, and after the run
    (lock released) the events of this service and the stale ones of others."""

    def __init__(self, system: System, paths: Paths, manifest: Manifest, cfg: ServiceConfig, log: ServiceLog) -> None:
        self.system, self.paths, self.manifest, self.log = system, paths, manifest, log
        self.notify = cfg.notify
        self.started: Any = None  # the thread sending the /start ping
        self.start_error: list[str] = []
        if self.notify.healthchecks_url:
            log.keep_bytes = PING_LOG_BYTES

    def run_started(self) -> None:
        """The /start ping, sent beside the stages: it never delays them."""
        url = self.notify.healthchecks_url
        if not url:
            return
        import threading

        def ping() -> None:
            body = self.log.recent()
            error = self.system.http_post(ping_url(url, "/start"), body, "text/plain", ALERT_TIMEOUT_SECONDS)
            if error:
                self.start_error.append(error)

        self.started = threading.Thread(target=ping, daemon=True)
        self.started.start()

    def _ping_job(self, record: RunRecord) -> list[tuple[str, Callable[[], str | None]]]:
        url = self.notify.healthchecks_url
        suffix = {"success": "", "degraded": "", "failed": "/fail"}.get(record.outcome)
        if not url or suffix is None:  # a skipped run ran no stage: the server expects no ping
            return []
        body = self.log.recent()

        def ping() -> str | None:
            if self.started is not None:  # /start first, or the server times the run wrong
                self.started.join(ALERT_TIMEOUT_SECONDS)
            return self.system.http_post(ping_url(url, suffix), body, "text/plain", ALERT_TIMEOUT_SECONDS)

        return [(f"healthchecks {shown_url(url)}", ping)]

    def finish(self, result: RunResult, trigger: str) -> None:
        """Decide and deliver; called after the run lock is released. Never raises."""
        self.log.may_rotate = False  # only a lock holder rotates
        try:
            jobs = self._ping_job(result.record) if result.record is not None else []
            sent = []
            for alert in self._claim(trigger):
                channels = alert_jobs(self.system, alert)
                jobs += channels
                to = ", ".join(c for c, _ in channels) or "nowhere ([notify] in service.toml sets none)"
                sent.append(f"{alert.document['event']} event of {alert.document['service_id']} to {to}")
            problems = deliver(self.system, jobs, ALERT_BUDGET_SECONDS) if jobs else []
        except (LoreServiceError, OSError) as exc:  # a notification never fails the run
            sent, problems = [], [f"could not decide or send alerts: {getattr(exc, 'message', exc)}"]
        if self.start_error:
            shown = shown_url(self.notify.healthchecks_url or "")
            problems.insert(0, f"healthchecks {shown} (start): {self.start_error[0]}")
        for line in sent:
            self.log.write_line("notify", line)
        for problem in problems:
            self.log.write_line("notify", f"failed: {problem}")

    def _claim(self, trigger: str) -> list[Alert]:
        desktop = self.system.desktop_session() is not None if trigger == "scheduled" else None
        own = claim_alert(self.system, self.paths, self.manifest, ALERT_EVENTS, desktop, self.notify)
        return ([own] if own else []) + stale_elsewhere(self.system, self.paths, self.manifest.service_id)


# ============================================================================
# 5. Install and uninstall
# ============================================================================


# `install` runs in three steps, each with a typed result: resolve the request
# (InstallRequest: every option and default decided, bad input refused before
# the machine is probed), plan it (InstallPlan: the manifest, every file with
# its content and mode, every scheduler command, warnings and what is missing;
# `--dry-run` prints exactly this), and apply it (apply_install: pin the
# program, write, register, and put everything back if any step fails).


ADMIN_WAIT_SECONDS = 60.0  # another install, uninstall, pause or resume of the service
RUN_END_WAIT_SECONDS = 30.0  # uninstall lets a run in progress finish this long, then stops it
RUN_STOP_WAIT_SECONDS = 15.0  # ... and waits this long for the stopped run to record itself


def wait_for_lock(lock: FileLock, system: System, seconds: float) -> bool:
    deadline = system.monotonic() + seconds
    while not lock.try_acquire():
        if system.monotonic() >= deadline:
            return False
        system.sleep(0.2)
    return True


def admin_lock(system: System, paths: Paths, sid: str) -> FileLock:
    """install, uninstall, pause and resume of one service take turns, so
    none of them sees (or leaves) the other half done. Returned held."""
    lock = FileLock(os.path.join(paths.state_root, ".admin", f"{sid}.lock"))
    if not wait_for_lock(lock, system, ADMIN_WAIT_SECONDS):
        raise BusyError(
            f"another install, uninstall, pause or resume of {sid} has not finished in {ADMIN_WAIT_SECONDS:.0f} s",
            "run the command again when it has finished",
        )
    return lock


def end_runs(system: System, paths: Paths, sid: str) -> FileLock | None:
    """Hold the service's run lock, so no run is in progress or starts while
    it is removed: a run in progress gets RUN_END_WAIT_SECONDS to finish, then
    is stopped as the scheduler would (SIGTERM: it ends its stage and records
    itself). None when the service never ran (no lock file to hold)."""
    path = paths.run_lock(sid)
    if not os.path.lexists(path):
        return None
    lock = FileLock(path)
    if wait_for_lock(lock, system, RUN_END_WAIT_SECONDS):
        return lock
    holder = lock_holder(path)
    if holder is not None:
        system.terminate(holder)
    if wait_for_lock(lock, system, RUN_STOP_WAIT_SECONDS):
        return lock
    raise BusyError(
        f"a run of {sid} (pid {holder}) is still in progress after it was asked to stop",
        f"wait for it (`{TOOL_NAME} status`), then run the command again; nothing was removed",
    )


# the manifest's fields that `install --json` reports
INSTALL_SUMMARY = (
    "service_id", "project_root", "backend", "backend_reason", "interval_seconds",
    "schedule_step_seconds", "profile", "token_source", "token_env", "program",
)  # fmt: skip


@record
class InstallRequest:
    """What `install` was asked for, every default resolved."""

    service_id: str
    project_root: str
    backend: str
    backend_reason: str
    token_source: str
    config: ServiceConfig  # service.toml as it will be (interval, profile, token variable, stages)
    lore_path: str | None
    existing: Manifest | None  # the service as installed now (a re-install)
    dry_run: bool = False
    missing: list[str] = field(default_factory=list)  # what a --dry-run found absent
    force: bool = False  # may undo the user's choice in the OS's settings (macOS Login Items)


@record
class InstallPlan:
    """Everything install writes and runs, in order; --dry-run shows it with the token redacted."""

    request: InstallRequest
    manifest: Manifest
    core_files: list[PlannedFile]  # token.env (env-file store), service.toml, manifest.json
    scheduler: Plan  # the backend's files and commands
    bundle: Bundle  # the running program: apply pins this very build where the manifest says
    token: str | None  # to store (or embed); a re-install carries the stored one over
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    carried: bool = False  # token is what the store holds now: apply need not read it again

    def __repr__(self) -> str:  # never the token
        return f"InstallPlan({self.manifest.service_id}, {len(self.core_files + self.scheduler.files)} files)"

    def summary(self) -> dict[str, Any]:
        """The facts `install --json` reports, as the manifest records them."""
        facts = self.manifest.to_dict()
        return {key: facts[key] for key in INSTALL_SUMMARY}


def self_command() -> list[str]:
    """The argv prefix that starts this very program, in absolute paths: the
    interpreter and script from source (abspath, not realpath: a virtualenv's
    python is a symlink that must stay inside the venv), the frozen program, or
    interpreter + .pyz. What the scheduler runs is planned_program()."""
    return bundle_command(running_bundle())


def planned_program(paths: Paths, bundle: Bundle) -> list[str]:
    """The argv prefix a scheduler entry names: from source the running
    program, for a frozen build or a .pyz its pinned copy under
    <data_root>/bin/<version>/ (section 9f; apply_install makes the copy), so
    no entry names the download or a PyInstaller extraction folder."""
    if bundle.kind == "source":
        return self_command()
    _bundle_parts(bundle)  # refuses a one-file build's extraction folder
    return pinned_command(paths.data_root, bundle)


def scheduled_program(prefix: Sequence[str], paths: Paths, sid: str) -> list[str]:
    home = ["--home", paths.home] if paths.home else []
    return [*prefix, *home, "run", "--service-id", sid]


# -- 1. resolve -----------------------------------------------------------------


def resolve_install(system: System, paths: Paths, args: argparse.Namespace) -> InstallRequest:
    """Every option decided: flags, else what is installed now, else defaults.
    Bad input is refused here, before install writes or registers anything
    (auto does ask each scheduler whether it answers)."""
    project = check_path_text(canonical_project(args.project or os.getcwd()), "project folder")
    if paths.home:
        check_path_text(paths.home, "--home")
    if not os.path.isdir(project):
        raise UsageError(
            f"project folder {project} does not exist", "pass --project DIR of a lore workspace", code="bad_project"
        )
    sid = validate_service_id(args.name) if args.name else derive_service_id(project)
    existing = load_manifest(paths, sid)
    if existing is not None and existing.project_root != project:
        raise UsageError(
            f"service id {sid!r} already belongs to {existing.project_root}",
            "choose another --name for this project",
            code="id_taken",
        )
    cfg, lore = _resolve_config(system, paths, args, existing)
    cfg.gitlab_url = _resolve_gitlab_url(system, args, cfg, project)
    missing: list[str] = []
    backend, reason = _resolve_backend(system, paths, args, existing, missing)
    source = args.token_source or "auto"
    if source == "auto" and existing is not None and existing.backend == backend.name and args.token_source is None:
        source = existing.token_source
    if source == "auto":
        source = backend.default_token_source()
    backend.check_token_source(source)
    if lore is None:
        if not args.dry_run:
            raise SchedulerError(
                "`lore` was not found on PATH", "install gitlore, or pass --lore /path/to/lore", code="lore_missing"
            )
        missing.append("`lore` is not on PATH (pass --lore PATH)")
    return InstallRequest(
        sid, project, backend.name, reason, source, cfg, lore, existing, bool(args.dry_run), missing, bool(args.force)
    )


def _resolve_config(
    system: System, paths: Paths, args: argparse.Namespace, existing: Manifest | None
) -> tuple[ServiceConfig, str | None]:
    """service.toml as the install leaves it, and the lore program. A flag not
    given keeps what service.toml says now: the user's edits there are exactly
    what a re-install is asked to apply."""
    sid = existing.service_id if existing else ""
    old = read_config(paths, sid) if existing is not None else None
    if old is None and existing is not None:  # config deleted: the manifest remembers the options
        now = ServiceConfig(existing.interval_seconds, existing.profile, existing.token_env)
    else:
        now = old or ServiceConfig()
    interval = parse_interval(args.interval) if args.interval is not None else now.interval_seconds
    profile = args.profile or now.profile
    token_env = validate_env_name(args.token_env or now.token_env)
    lore = _resolve_lore(system, args, existing)
    cfg = old or ServiceConfig.defaults(lore or "lore")
    if old is not None and lore and existing and existing.lore_path and existing.lore_path != lore:
        for stage in cfg.stages.values():  # follow a moved lore, keep hand-written commands
            if stage.command and stage.command[0] == existing.lore_path:
                stage.command[0] = lore
    cfg.interval_seconds, cfg.profile, cfg.token_env = interval, profile, token_env
    _apply_notify_options(cfg.notify, args)
    return cfg, lore


def _apply_notify_options(notify: NotifyConfig, args: argparse.Namespace) -> None:
    """--notify-desktop/--no-notify-desktop, --notify-webhook, --healthchecks-url;
    an empty URL removes it. Options not given keep what service.toml says."""
    if getattr(args, "notify_desktop", None) is not None:
        notify.desktop = args.notify_desktop
    for option, dest, key in (
        ("--notify-webhook", "notify_webhook", "webhook"),
        ("--healthchecks-url", "healthchecks_url", "healthchecks_url"),
    ):
        value = getattr(args, dest, None)
        if value is not None:
            setattr(notify, key, check_notify_url(value, option) if value else None)


def _resolve_gitlab_url(system: System, args: argparse.Namespace, cfg: ServiceConfig, project: str) -> str | None:
    """--gitlab-url, else what service.toml says, else the host of the
    project's git remote `origin` (None: no host known, runs are not checked)."""
    if getattr(args, "gitlab_url", None) is not None:
        try:
            return validate_gitlab_url(args.gitlab_url)
        except ValueError as exc:
            hint = "e.g. --gitlab-url https://gitlab.example.com (--gitlab-url none: no offline check)"
            raise UsageError(str(exc), hint, code="bad_url") from None
    return cfg.gitlab_url if cfg.gitlab_url is not None else derived_gitlab_url(system, project)


def derived_gitlab_url(system: System, project: str) -> str | None:
    """gitlab_url as install takes it from the project's git remote origin, or None."""
    home = system.environ.get("HOME") or system.environ.get("USERPROFILE")
    derived = gitlab_url_from_remote(git_origin_url(project, home) or "")
    try:
        return validate_gitlab_url(derived) if derived else None
    except ValueError:  # a remote this cannot make a URL of: no check rather than a broken service.toml
        return None


def git_origin_url(project: str, home: str | None = None) -> str | None:
    """The url of remote "origin" in the git repository holding `project`,
    read from its config file (no git process: install asks no more programs
    than it needs). A worktree's or submodule's `.git` file leads to its git
    folder, and a worktree's config is in the common one; includes and
    url.<base>.insteadOf are not followed. The search goes up from the
    project but not into `home` itself: a home folder kept in git (dotfiles)
    says nothing about a project under it."""
    folder = project
    ceiling = os.path.realpath(home) if home else None
    while True:
        if folder == ceiling and folder != project:
            return None
        dot_git = os.path.join(folder, ".git")
        if os.path.lexists(dot_git):
            break
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    git_dir = dot_git
    if os.path.isfile(dot_git):  # "gitdir: <path>", relative to the folder holding it
        pointer = (read_text(dot_git) or "").strip()
        if not pointer.startswith("gitdir:"):
            return None
        git_dir = os.path.join(folder, pointer.removeprefix("gitdir:").strip())
    common = (read_text(os.path.join(git_dir, "commondir")) or "").strip()
    if common:
        git_dir = os.path.join(git_dir, common)
    return remote_url_in_git_config(read_text(os.path.join(git_dir, "config")) or "", "origin")


def remote_url_in_git_config(text: str, remote: str) -> str | None:
    """The first `url` of [remote "<remote>"] in a git config file's text."""
    section: tuple[str, ...] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            head = line[1 : line.find("]")] if "]" in line else ""
            name, _, sub = head.partition(" ")
            section = (name.lower(), sub.strip().strip('"')) if sub else tuple(head.lower().split(".", 1))
            continue
        key, sep, value = line.partition("=")
        if sep and section == ("remote", remote) and key.strip().lower() == "url":
            value = value.strip()
            if value.startswith('"'):
                return value[1:].partition('"')[0]
            return value.split(" #")[0].split(" ;")[0].strip() or None
    return None


def gitlab_url_from_remote(remote: str) -> str | None:
    """The GitLab a git remote points at, as gitlab_url: https://host[:port]
    from an http(s) remote (without any user or token in it), and
    https://host from ssh://[user@]host[:port]/path and scp-like
    [user@]host:path, since GitLab's API is https on 443 whatever port ssh
    uses. None for a local path, file:// and anything not understood."""
    from urllib.parse import urlsplit

    text = remote.strip()
    if "://" in text:
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018  (a port that is not a number raises here)
        except ValueError:
            return None
        host, scheme = parts.hostname, parts.scheme.lower()
        if not host:
            return None
        if scheme in ("http", "https"):
            return shown_url(text)  # scheme, host and port: a user or token in the remote stays behind
        return f"https://{f'[{host}]' if ':' in host else host}" if scheme in ("ssh", "git+ssh", "ssh+git") else None
    # scp-like: a colon before any slash; `C:/x` (one letter before it) is a Windows path
    head, colon, _ = text.partition(":")
    if not colon or "/" in head or "\\" in head:
        return None
    host = head.rpartition("@")[2].strip("[]")
    if len(host) < 2 or not all(c.isalnum() or c in ".-" for c in host):
        return None
    return f"https://{host.lower()}"


def _resolve_lore(system: System, args: argparse.Namespace, existing: Manifest | None) -> str | None:
    if args.lore:
        path = check_path_text(os.path.abspath(os.path.expanduser(args.lore)), "--lore")
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise UsageError(
                f"--lore {quoted(args.lore)}: not an executable file",
                "give the full path of the lore program",
                code="bad_lore",
            )
        return path
    if existing and existing.lore_path and os.path.exists(existing.lore_path):
        return existing.lore_path
    found = system.which("lore")
    return os.path.abspath(found) if found else None


def _resolve_backend(
    system: System, paths: Paths, args: argparse.Namespace, existing: Manifest | None, missing: list[str]
) -> tuple[SchedulerBackend, str]:
    """The backend and why it was chosen; auto asks each candidate's availability."""
    requested = args.backend or (existing.backend if existing else "auto")
    if requested != "auto":
        reason = existing.backend_reason if existing is not None and args.backend is None else f"--backend {requested}"
        return get_backend(requested, system, paths), reason
    chosen, reason, _ = choose_backend(system)
    if chosen is None:
        if not args.dry_run:
            raise SchedulerError(
                reason,
                "start a systemd user manager (Linux) or install cron, or pass "
                "`--backend none` and call `lore-service run` from your own scheduler",
            )
        missing.append(reason)
        chosen, reason = "none", f"auto found nothing usable; previewing backend none ({reason})"
    return get_backend(chosen, system, paths), reason


def obtain_token(system: System, args: argparse.Namespace, token_env: str, interactive: bool) -> str | None:
    """From --token-stdin, the named variable, or a hidden prompt; never argv."""
    if args.token_stdin:
        lines = [line for line in system.read_stdin().splitlines() if line.strip()]
        if len(lines) > 1:  # e.g. a whole .env file piped in: its first line is not a token
            raise UsageError(
                f"standard input holds {len(lines)} lines; --token-stdin takes the token alone",
                "pipe only the token, e.g. printenv GITLAB_TOKEN | lore-service install --token-stdin",
                code="bad_token",
            )
        token = lines[0].strip() if lines else ""
        name, sep, rest = token.partition("=")
        # NAME=value (a line of a .env file); a base64 token's "=" padding ends it instead
        env_like = name.isascii() and name[:1].isalpha() and all(c.isalnum() or c == "_" for c in name)
        if sep and rest and env_like and name.replace("_", "").isupper():
            name = "NAME" if looks_like_token(name) else name
            raise UsageError(
                f"standard input holds a {name}=... line; --token-stdin takes the token alone",
                f"pipe only the value, e.g. printenv {name} | lore-service install --token-stdin",
                code="bad_token",
            )
        return validate_token(token)
    value = system.environ.get(token_env)
    if value:
        return validate_token(value)
    if interactive and system.stdin_isatty():
        return validate_token(system.prompt_secret("GitLab token (stored in the OS store, not shown): "))
    return None


# -- 2. plan ----------------------------------------------------------------------


def plan_install(system: System, paths: Paths, request: InstallRequest, token: str | None) -> InstallPlan:
    """The manifest and every file and command, after the backend's
    prerequisites (a failing one stops a real install, and is listed as
    missing by --dry-run). Reads the stored token only to carry it over."""
    backend = get_backend(request.backend, system, paths)
    bundle = running_bundle()
    manifest = _planned_manifest(system, paths, request, backend, planned_program(paths, bundle))
    warnings: list[str] = []
    missing = list(request.missing)
    # prerequisites before the stored token is read: on macOS the GUI-session
    # check must come before any keychain access, in --dry-run too
    prereq = backend.prerequisites(manifest, request.config)
    failing = [c for c in prereq if c.status == "fail"]
    warnings.extend(f"{c.message} (fix: {c.hint})" for c in prereq if c.status == "warn")
    if failing and not request.dry_run:
        raise SchedulerError(failing[0].message, failing[0].hint, code="prerequisite")
    missing.extend(f"{c.message} (fix: {c.hint})" for c in failing)
    existing, source = request.existing, request.token_source
    carried = False
    if source == "environment":
        token = None  # never stored: each run reads it from its own environment
    elif token is None and existing is not None and existing.token_source not in UNSTORED_TOKEN_SOURCES and not failing:
        token = _stored_secret(paths, existing)  # a re-install without a new token carries the stored one over
        carried = token is not None
    token_env = request.config.token_env
    if token is None and source != "environment":
        if not request.dry_run:
            raise UsageError(
                f"no token: {token_env} is not set",
                f"export {token_env}=<GitLab token>, or pipe it with --token-stdin",
                code="no_token",
            )
        missing.append(f"no token yet ({token_env} is not set)")
    if source == "embedded":
        warnings.append(
            "--token-source embedded writes the token in plain text into the scheduler entry; anyone "
            "who can read that file can use your GitLab account"
        )
    scheduler = backend.plan(manifest, request.config, token if source == "embedded" else None)
    warnings.extend(scheduler.warnings)
    core = _core_files(paths, manifest, request.config, token)
    return InstallPlan(request, manifest, core, scheduler, bundle, token, warnings, missing, carried)


def _planned_manifest(
    system: System, paths: Paths, request: InstallRequest, backend: SchedulerBackend, program: list[str]
) -> Manifest:
    cfg, existing, sid = request.config, request.existing, request.service_id
    now_iso = iso_from_ms(system.now_ms())
    manifest = Manifest(
        service_id=sid,
        project_root=request.project_root,
        backend=request.backend,
        backend_reason=request.backend_reason,
        interval_seconds=cfg.interval_seconds,
        schedule_step_seconds=backend.schedule_step(cfg.interval_seconds),
        profile=cfg.profile,
        token_source=request.token_source,
        token_env=cfg.token_env,
        program=scheduled_program(program, paths, sid),
        lore_path=request.lore_path,
        home=paths.home,
        created_at_iso=existing.created_at_iso if existing else now_iso,
        updated_at_iso=now_iso,
    )
    if existing is not None:  # an unchanged re-install keeps the manifest byte for byte
        unstamped = {"updated_at_iso": "", "tool_version": ""}
        if {**existing.to_dict(), **unstamped} == {**manifest.to_dict(), **unstamped}:
            manifest.updated_at_iso = existing.updated_at_iso
    return manifest


def _core_files(paths: Paths, manifest: Manifest, cfg: ServiceConfig, token: str | None) -> list[PlannedFile]:
    sid = manifest.service_id
    secret_urls = cfg.notify.webhook or cfg.notify.healthchecks_url  # --dry-run shows scheme and host only
    files = [
        PlannedFile(paths.config(sid), cfg.to_toml(sid), 0o600, cfg.to_toml(sid, redact=True) if secret_urls else None),
        PlannedFile(paths.manifest(sid), dump_json(manifest.to_dict()), 0o600),
    ]
    if manifest.token_source == "env-file":
        line, shown = f"{manifest.token_env}={token or ''}\n", f"{manifest.token_env}={SECRET_PLACEHOLDER}\n"
        files.insert(0, PlannedFile(paths.env_file(sid), line, 0o600, redacted=shown))
    return files


# -- 3. apply ---------------------------------------------------------------------


def apply_install(system: System, paths: Paths, plan: InstallPlan) -> tuple[bool, Plan]:
    """With the service's admin turn (admin_lock), and only if
    nobody changed the service since it was planned: pin, write, register."""
    sid, existing = plan.manifest.service_id, plan.request.existing
    lock = admin_lock(system, paths, sid)
    try:
        now = load_manifest(paths, sid)
        if (now.to_dict() if now else None) != (existing.to_dict() if existing else None):
            raise BusyError(
                f"{sid} was installed, changed or uninstalled by another command meanwhile; nothing was written",
                "run install again",
            )
        return _apply_install(system, paths, plan)
    finally:
        lock.release()


def _apply_install(system: System, paths: Paths, plan: InstallPlan) -> tuple[bool, Plan]:
    """Pin the program, then write secret, config, scheduler entry and
    manifest; on failure put back what was there before. Returns whether
    anything changed, and what the backend did."""
    manifest, existing, cfg = plan.manifest, plan.request.existing, plan.request.config
    sid, source, token = manifest.service_id, manifest.token_source, plan.token
    pin_running_program(paths, system, plan.bundle)  # before any entry can name the copy
    backend = get_backend(manifest.backend, system, paths)
    backend.force = plan.request.force
    old_secret = token if plan.carried else _stored_secret(paths, existing)  # the store is read once
    same_store = existing is not None and existing.token_source == source and existing.token_env == manifest.token_env
    unchanged = same_store and old_secret == token
    store_token = token is not None and source not in UNSTORED_TOKEN_SOURCES and not unchanged
    old_config, config_text = read_text(paths.config(sid)), cfg.to_toml(sid)
    switched = existing is not None and existing.backend != manifest.backend and existing.backend in BACKENDS
    entry_changed = existing is None or switched or backend.entry_changed(manifest, plan.scheduler)
    try:
        if switched and existing is not None:  # a service must never run from two schedulers
            get_backend(existing.backend, system, paths).uninstall(existing)
            plan.warnings.append(f"removed the {existing.backend} entry before registering with {manifest.backend}")
        if store_token and token is not None:
            store_secret(paths, manifest, token)
        if old_config != config_text:
            atomic_write(paths.config(sid), config_text, 0o600)
        ensure_dir(paths.state_dir(sid))
        ensure_dir(paths.log_dir(sid))
        ensure_dir(os.path.dirname(paths.slot(0)))  # a systemd sandbox lets runs write there only if it exists
        applied = backend.install(manifest, cfg, token if source == "embedded" else None)
        # last, and inside the rollback: without a manifest nothing could find
        # (or uninstall) the token and entry written above
        manifest_changed = file_differs(paths.manifest(sid), dump_json(manifest.to_dict()))
        if manifest_changed:
            save_manifest(paths, manifest)
    except BaseException:
        _roll_back_install(system, paths, plan, backend, store_token, old_secret, old_config)
        raise
    if existing is not None and existing.token_source != source:
        try:  # the old store must not keep a copy of the token
            delete_secret(paths, existing)
        except LoreServiceError as exc:
            plan.warnings.append(f"could not remove the token from {existing.token_source}: {exc.message}")
    regrant = regrant_keychain(system, manifest, plan.bundle, token)
    if regrant:
        plan.warnings.append(regrant)
    return manifest_changed or store_token or old_config != config_text or entry_changed, applied


def regrant_keychain(system: System, manifest: Manifest, bundle: Bundle, token: str | None) -> str | None:
    """macOS's Keychain trusts an item for the program that stored it, and
    asks anyone else (a prompt no scheduled run can answer). A frozen build
    installs from its download but the agent runs the pinned copy: so the
    copy stores the token again itself (`token --store`, the token on stdin).
    Returns a warning when it could not."""
    if not (system.platform == "darwin" and manifest.token_source == "keychain" and bundle.kind != "source"):
        return None
    if not token:
        return None
    argv = [*program_prefix(manifest), "--json", "token", "--store", "--service-id", manifest.service_id]
    result = system.run(argv, input=token + "\n", timeout=60)
    if result.ok:
        return None
    return (
        f"{argv[0]} could not store the token in the Keychain itself ({result.summary()}): scheduled runs may meet "
        "a permission prompt; unlock the login keychain and run install again from Terminal"
    )


def _stored_secret(paths: Paths, manifest: Manifest | None) -> str | None:
    if manifest is None:
        return None
    try:
        return read_secret(paths, manifest, {})
    except LoreServiceError:
        return None


def _roll_back_install(
    system: System,
    paths: Paths,
    plan: InstallPlan,
    backend: SchedulerBackend,
    stored_token: bool,
    old_secret: str | None,
    old_config: str | None,
) -> None:
    """Best effort: each step may itself fail, and the original error wins."""
    manifest, existing = plan.manifest, plan.request.existing
    sid = manifest.service_id
    steps: list[Callable[[], object]] = []
    if existing is None:
        steps.append(lambda: backend.uninstall(manifest))
        steps.append(lambda: remove_file(paths.config(sid)))
        if stored_token:
            steps.append(lambda: delete_secret(paths, manifest))
    else:
        if existing.backend != manifest.backend:  # a service must never run from two schedulers
            steps.append(lambda: backend.uninstall(manifest))
        if old_config is not None:
            steps.append(lambda: atomic_write(paths.config(sid), old_config, 0o600))
        if stored_token:
            if old_secret is not None and existing.token_source == manifest.token_source:
                steps.append(lambda: store_secret(paths, existing, old_secret))
            elif existing.token_source != manifest.token_source:
                steps.append(lambda: delete_secret(paths, manifest))
        if existing.token_source not in UNSTORED_TOKEN_SOURCES:  # the entry as it was (launchd's is unloaded by now)
            old_backend = get_backend(existing.backend, system, paths)
            # rendered from the config just put back
            steps.append(lambda: old_backend.install(existing, config_or_defaults(paths, sid), None))
    for step in steps:
        try:
            step()
        except Exception:
            pass


# -- uninstall ----------------------------------------------------------------------


@record
class Removal:
    """What uninstall removed, kept, and could not finish."""

    removed: list[str]
    kept: list[str]
    warnings: list[str]


def uninstall_service(system: System, paths: Paths, manifest: Manifest, purge: bool) -> Removal:
    """Scheduler entry first (nothing may fire into a half-removed service), then
    token, config and manifest; with purge also status and logs. A run in
    progress ends first, so nothing writes state after it is gone."""
    sid = manifest.service_id
    if manifest.backend not in BACKENDS:
        raise SchedulerError(
            f"this lore-service cannot remove a {manifest.backend} entry",
            f"uninstall with the lore-service build that installed it ({manifest.tool_version})",
        )
    _check_removable(paths, sid, purge)  # all of it can go, or nothing is touched
    run_lock = end_runs(system, paths, sid)
    try:
        return _remove_service(system, paths, manifest, purge)
    finally:
        if run_lock is not None:
            run_lock.release()


def _set_aside(folder: str) -> str:
    """Rename a folder that is about to be deleted out of its place first: a
    writer that comes late (an alert claimed after its run) then finds no
    folder rather than recreating a file in one half deleted. Where it cannot
    be renamed (Windows, a file in it open), it is deleted where it is."""
    aside = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.removed-{os.getpid()}")
    try:
        os.replace(folder, aside)
    except OSError:
        return folder
    return aside


def _check_removable(paths: Paths, sid: str, purge: bool) -> None:
    files = [paths.config(sid), paths.manifest(sid), paths.env_file(sid)]
    folders = [paths.state_dir(sid), paths.log_dir(sid)] if purge else []
    for path, want_dir in [(f, False) for f in files] + [(d, True) for d in folders]:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StateFileError(f"cannot look at {path}: {exc.strerror}", "check its permissions") from None
        if stat.S_ISDIR(st.st_mode) != want_dir or stat.S_ISLNK(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a file"
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else kind
            raise StateFileError(
                f"{path} is {kind}, not what lore-service made there; uninstall changed nothing",
                "move it aside yourself, then run uninstall again",
            )


def _remove_service(system: System, paths: Paths, manifest: Manifest, purge: bool) -> Removal:
    import shutil

    sid = manifest.service_id
    backend = get_backend(manifest.backend, system, paths)
    removed = backend.file_paths(manifest)
    backend.uninstall(manifest)
    warnings: list[str] = []
    try:
        delete_secret(paths, manifest)
    except LoreServiceError as exc:  # the entry is gone already: finish, and say what is left
        warnings.append(f"the token may still be in {manifest.token_source}: {exc.message}")
    # under the status lock: an alert claimed after a run (update_installed_status)
    # either wrote before this or sees the manifest gone and writes nothing
    status_lock = FileLock(paths.status_lock(sid), make_folder=False)
    locked = status_lock.try_acquire(blocking=True)
    try:
        for path in (paths.config(sid), paths.manifest(sid)):
            remove_file(path)
    finally:
        if locked:
            status_lock.release()
    removed += [paths.config(sid), paths.manifest(sid)]
    kept: list[str] = []
    if purge:
        for folder in (paths.state_dir(sid), paths.log_dir(sid)):
            shutil.rmtree(_set_aside(folder), ignore_errors=True)
        removed += [paths.state_dir(sid), paths.log_dir(sid)]
    else:
        kept = [p for p in (paths.status(sid), paths.log(sid), paths.crash_log(sid)) if os.path.exists(p)]
    _sweep_stale_temps(paths.config_dir(sid))  # every temp file: a killed install's copy of the token among them
    try:
        os.rmdir(paths.config_dir(sid))
    except OSError:
        pass
    # pinned copies of older versions that no service runs any more
    removed += prune_pinned(paths, system, pinned_folder(paths.data_root))
    return Removal(removed, kept, warnings)


# ============================================================================
# 6. Backends: the SchedulerBackend interface, its registry, `none`
# ============================================================================


from abc import ABC, abstractmethod  # noqa: E402  (abc is loaded at interpreter start: free)


class SchedulerBackend(ABC):
    """One OS scheduler. Backends never touch the run policy: they make the
    scheduler start `manifest.program` every schedule step, and report what
    the scheduler itself says about that entry.

    A backend holds all of its own knowledge: the token stores its OS offers,
    whether a token can be embedded in its entry, whether this machine can
    use it (`availability`), what install needs beyond that (`requirements`)
    and what doctor looks at once it is installed (`health`)."""

    name: ClassVar[str] = ""
    # token stores of this scheduler's OS, the one `--token-source auto` picks first
    token_stores: ClassVar[tuple[str, ...]] = UNIX_TOKEN_STORES
    can_embed: ClassVar[bool] = False
    # why `--token-source embedded` is refused here (can_embed False)
    embed_refusal: ClassVar[str] = ""
    # the hint of a scheduler command that failed during install
    command_hint: ClassVar[str] = ""
    # the scheduler ends a run after scheduler_timeout(): a run waits for a slot only as long as it still fits
    time_limit: ClassVar[bool] = False

    def __init__(self, system: System, paths: Paths) -> None:
        self.system = system
        self.paths = paths
        # install may undo what the user chose in the OS's own settings (install --force)
        self.force = False

    # -- can this machine use it, and what does it need
    @classmethod
    @abstractmethod
    def availability(cls, system: System) -> Check:
        """ok with what answers, or fail with why and the fix (for auto, install and doctor)."""

    def requirements(self, manifest: Manifest | None, cfg: ServiceConfig | None = None) -> list[Check]:
        """What install needs beyond availability; asked only once available."""
        return []

    def health(self, manifest: Manifest | None) -> list[Check]:
        """doctor's look at an installed entry; asked only when no prerequisite fails."""
        return []

    def prerequisites(self, manifest: Manifest | None, cfg: ServiceConfig | None = None) -> list[Check]:
        """Checks that must not fail before install touches the scheduler
        (cfg: the service.toml being installed; else the one on disk)."""
        available = self.availability(self.system)
        return [available] if available.status == "fail" else [available, *self.requirements(manifest, cfg)]

    def diagnose(self, manifest: Manifest | None) -> list[Check]:
        checks = self.prerequisites(manifest)
        return checks if any(c.status == "fail" for c in checks) else checks + self.health(manifest)

    # -- the token
    def allowed_token_stores(self) -> tuple[str, ...]:
        return self.token_stores

    def default_token_source(self) -> str:
        """What `--token-source auto` means here."""
        return self.allowed_token_stores()[0]

    def check_token_source(self, source: str) -> None:
        """Refuse a store this scheduler's OS does not offer, each with the way out."""
        store = self.default_token_source()
        if source == "embedded":
            if not self.can_embed:
                hint = f"use --token-source {store} (the default)"
                raise UsageError(self.embed_refusal, hint, code="bad_token_source")
        elif source == "environment" and source not in self.allowed_token_stores():
            raise UsageError(
                f"--token-source environment is offered with --backend none only: {self.name} runs would have no token",
                f"use --token-source {store} (the default)",
                code="bad_token_source",
            )
        elif source not in self.allowed_token_stores():
            raise UsageError(
                f"the {source} token store is offered on {TOKEN_STORE_OS.get(source, 'other systems')} only",
                f"use --token-source {store} (the default there)"
                + (" so nothing secret sits in a file" if source == "env-file" else ""),
                code="bad_token_source",
            )

    # -- the entry
    def schedule_step(self, interval_seconds: int) -> int:
        """How often the scheduler fires for an interval; == interval unless coarse."""
        return interval_seconds

    def firing_after_ms(self, manifest: Manifest) -> int:
        """The time after which a firing will run rather than skip as not due
        (skip_reason): now, or just before next_due_at_ms on a coarse schedule
        that is not due yet. `state` looks for its next run after it."""
        now = self.system.now_ms()
        due = self.pending_due_ms(manifest)
        return due - 1 if due is not None and due > now else now

    def pending_due_ms(self, manifest: Manifest) -> int | None:
        """next_due_at_ms where `run` skips until due (a coarse schedule), else None."""
        if manifest.schedule_step_seconds >= manifest.interval_seconds:
            return None
        try:
            return load_status(self.paths, manifest.service_id).next_due_at_ms
        except LoreServiceError:  # status reports the broken file itself
            return None

    @abstractmethod
    def plan(self, manifest: Manifest, cfg: ServiceConfig, embedded_token: str | None) -> Plan:
        """Files to write and commands to run; pure, safe for --dry-run on any OS."""

    def refuse_unsafe_values(self, manifest: Manifest, cfg: ServiceConfig) -> None:
        """Every value an entry is rendered from, checked before it is rendered
        (in --dry-run too): a line break or other control character would start
        a new directive or line, and no format may quietly change it."""
        values = [("program argument", arg) for arg in manifest.program]
        values += [("project folder", manifest.project_root), ("token variable", manifest.token_env)]
        sid = manifest.service_id
        for what, folder in (("config", self.paths.config_dir(sid)), ("state", self.paths.state_dir(sid))):
            values.append((f"{what} folder", folder))
        values += [("log folder", self.paths.log_dir(sid)), ("data folder", self.paths.data_root)]
        values += [("extra_write_paths entry", p) for p in cfg.extra_write_paths]
        home = self.system.environ.get("HOME") or os.path.expanduser("~")
        values += [(f"{var} folder", folder) for var, folder in self.paths.xdg_pins(home)]
        values.append(("home folder", home))
        for what, value in values:
            check_path_text(value, what)

    def install(self, manifest: Manifest, cfg: ServiceConfig, embedded_token: str | None) -> Plan:
        plan = self.plan(manifest, cfg, embedded_token)
        with RestoreOnFailure([f.path for f in plan.files]):
            for planned in plan.files:
                if file_differs(planned.path, planned.content):
                    atomic_write(planned.path, planned.content, planned.mode)
            for argv in plan.commands:
                self.run_checked(argv, hint=self.command_hint)
        return plan

    @abstractmethod
    def uninstall(self, manifest: Manifest) -> None: ...

    @abstractmethod
    def state(self, manifest: Manifest) -> SchedulerState:
        """The scheduler's own view of the entry, drift included."""

    def states(self, manifests: Sequence[Manifest]) -> dict[str, SchedulerState | LoreServiceError]:
        """state() of many entries, for `status --all`: service id -> its view,
        or the error that kept it from being read (each service its own). A
        scheduler that can answer for every entry at once overrides this, so
        that the questions asked do not grow with the number of services; this
        default asks state() once per service."""
        return self.each_service(manifests, self.state)

    @staticmethod
    def each_service(
        manifests: Sequence[Manifest], view: Callable[[Manifest], SchedulerState]
    ) -> dict[str, SchedulerState | LoreServiceError]:
        """view() of every manifest; one that raises gets its own error, not the others'."""
        views: dict[str, SchedulerState | LoreServiceError] = {}
        for manifest in manifests:
            try:
                views[manifest.service_id] = view(manifest)
            except LoreServiceError as exc:
                views[manifest.service_id] = exc
        return views

    @abstractmethod
    def file_paths(self, manifest: Manifest) -> list[str]: ...

    def before_run(self, manifest: Manifest) -> None:
        """Called by `run` before its stages (e.g. to bound scheduler-held output files)."""
        return None

    def scheduled_path(self, manifest: Manifest) -> str | None:
        """The PATH a scheduled run gets (None: whatever its caller's is); doctor shows it."""
        return None

    def entry_changed(self, manifest: Manifest, plan: Plan) -> bool:
        """Whether installing `plan` would change the scheduler's entry, so a
        re-install with the same options can say (and do) nothing."""
        return any(file_differs(f.path, f.content) for f in plan.files)

    # -- helpers shared by backends
    @classmethod
    def os_tool_availability(cls, system: System, os_key: str, tool: str, folder: str, what: str) -> Check:
        """A scheduler that exists on one OS and is driven by one command (found in `folder`)."""
        os_name = {"darwin": "macOS", "win32": "Windows"}.get(os_key, os_key)
        if system.platform != os_key:
            hint = f"install on the {os_name} machine itself; `--dry-run` previews the entry anywhere"
            return Check(cls.name, "fail", f"{tool} is {os_name} only", hint)
        found = system.which(tool)
        if not found:
            return Check(cls.name, "fail", f"{tool} is not on PATH", f"add {folder} to PATH")
        return Check(cls.name, "ok", f"{what} ({found})")

    def run_checked(self, argv: Sequence[str], *, hint: str = "", **kwargs: Any) -> CommandResult:
        result = self.system.run(argv, **kwargs)
        if not result.ok:
            raise SchedulerError(
                f"`{' '.join(argv)}` failed ({result.returncode}): {result.summary()}",
                hint or f"run `{TOOL_NAME} doctor` for the {self.name} prerequisites",
            )
        return result


class RestoreOnFailure:
    """Put scheduler files back as they were (content and mode) when an
    install fails after writing them: an embedded token's 0600 file stays
    0600, and a file that did not exist is removed again."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.saved = [(path, _read_bytes(path), _file_mode(path)) for path in paths]

    def __enter__(self) -> RestoreOnFailure:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            return
        for path, previous, mode in self.saved:
            if previous is None:
                remove_file(path)
            else:
                atomic_write(path, previous, mode)


BACKENDS: dict[str, type[SchedulerBackend]] = {}


def register_backend(cls: type[SchedulerBackend]) -> type[SchedulerBackend]:
    BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str, system: System, paths: Paths) -> SchedulerBackend:
    try:
        return BACKENDS[name](system, paths)
    except KeyError:
        raise UsageError(
            f"unknown backend {name!r}", f"choose one of: {', '.join(sorted(BACKENDS))}", code="bad_backend"
        ) from None


# auto's preference per OS; a backend that is not registered is passed over
AUTO_ORDER = {"darwin": ("launchd",), "win32": ("schtasks",), "linux": ("systemd", "cron")}


def choose_backend(system: System) -> tuple[str | None, str, list[str]]:
    """(backend or None, reason, what was tried) for --backend auto."""
    tried: list[str] = []
    key = "linux" if system.platform.startswith("linux") else system.platform
    # other Unix (the BSDs, ...) have cron but no user manager
    for name in AUTO_ORDER.get(key, ("cron",)):
        cls = BACKENDS.get(name)
        if cls is None:
            continue
        available = cls.availability(system)
        if available.status == "ok":
            return name, f"auto: {available.message}", tried
        tried.append(f"{name}: {available.message}")
    reason = "no OS scheduler is usable here" + (f" ({'; '.join(tried)})" if tried else "")
    return None, reason, tried


@register_backend
class NoneBackend(SchedulerBackend):
    """Manifest and config only: for people who call `run` from their own
    cron, CI job or Kubernetes CronJob."""

    name = "none"
    embed_refusal = "--token-source embedded needs a scheduler entry to embed into, and backend none has none"

    @classmethod
    def availability(cls, system: System) -> Check:
        return Check("backend", "ok", "nothing to detect: runs only when you call it")

    def allowed_token_stores(self) -> tuple[str, ...]:
        # whoever calls `run` gets the OS's own store (an env-file only on Linux),
        # or gives `run` the variable itself (environment)
        return (*OS_TOKEN_STORES.get(self.system.platform, self.token_stores), "environment")

    def check_token_source(self, source: str) -> None:
        if source == "embedded":  # not the base's hint: here the variable can come from the caller
            raise UsageError(
                self.embed_refusal,
                f"use --token-source {self.default_token_source()}, or set the token variable where `run` is called",
                code="bad_token_source",
            )
        super().check_token_source(source)

    def plan(self, manifest: Manifest, cfg: ServiceConfig, embedded_token: str | None) -> Plan:
        return Plan(warnings=[f"nothing is scheduled: call `{' '.join(manifest.program)}` every interval yourself"])

    def uninstall(self, manifest: Manifest) -> None:
        return None

    def state(self, manifest: Manifest) -> SchedulerState:
        return SchedulerState(registered=False, active=None, detail="no OS scheduler: `run` is called by you")

    def file_paths(self, manifest: Manifest) -> list[str]:
        return []


def scheduler_timeout(cfg: ServiceConfig) -> int:
    """Seconds a scheduler lets a run take: a minute beyond the run's own
    budget, never below SCHEDULER_TIMEOUT, so the run records its own timeout."""
    return max(SCHEDULER_TIMEOUT, cfg.run_budget_seconds + 60)


# -- shared by backends whose scheduler captures the run's output (cron, launchd)

# That output only holds crashes and stray lines (the run writes its real log
# itself); trim_crash_log keeps it this small.
CRASH_LOG_MAX_BYTES = 1024 * 1024
CRASH_LOG_KEEP_BYTES = 256 * 1024


def trim_crash_log(path: str, max_bytes: int = CRASH_LOG_MAX_BYTES, keep_bytes: int = CRASH_LOG_KEEP_BYTES) -> bool:
    """Bound a file the scheduler holds open; True when it was trimmed.

    launchd keeps StandardOutPath open (O_APPEND), so renaming would not rotate
    it: the same inode is rewritten with its last `keep_bytes`, from a line start.
    """
    try:
        size = os.path.getsize(path)
    except OSError:
        return False
    if size <= max_bytes:
        return False
    keep = min(keep_bytes, max_bytes)
    try:
        with open(path, "r+b") as fh:
            fh.seek(size - keep)
            tail = fh.read(keep)
            cut = tail.find(b"\n")
            if 0 <= cut < len(tail) - 1:
                tail = tail[cut + 1 :]
            fh.seek(0)
            fh.write(b"[older output trimmed by lore-service]\n" + tail)
            fh.truncate()
    except OSError:
        return False
    return True


def crash_log_check(path: str, what: str) -> Check:
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    if size <= CRASH_LOG_MAX_BYTES:
        return Check("crash log", "ok", f"{path} ({size} bytes; {what}, trimmed by each run)")
    return Check("crash log", "warn", f"{path} is {size} bytes", f"`{TOOL_NAME} run` trims it")


# ----------------------------------------------------------------------------
# 6a. systemd user timers (Linux)
# ----------------------------------------------------------------------------


SYSTEMD_MIN_VERSION = 247  # ProtectProc=, ProcSubset= and FixedRandomDelay= arrived in 247
SYSTEMD_UP_STATES = ("running", "degraded", "starting", "initializing")


def systemd_quote(arg: str, *, specifiers: bool = True, variables: bool = True) -> str:
    """One argument in systemd's unit syntax: double-quoted, C escapes,
    `%` -> `%%` (specifiers) and `$` -> `$$` (ExecStart= variable expansion).
    Verified with systemd 252 on spaces, quotes, `$VAR`, `${VAR}`, `%h`, `;`
    and non-ASCII letters; ReadWritePaths= and Environment= expand no variables,
    hence the flag."""
    out = arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    if variables:
        out = out.replace("$", "$$")
    if specifiers:
        out = out.replace("%", "%%")
    return f'"{out}"'


def _environment_line(name: str, value: str) -> str:
    return "Environment=" + systemd_quote(f"{name}={value}", variables=False)


def systemd_seconds(seconds: int) -> str:
    return f"{seconds // 60}min" if seconds % 60 == 0 else f"{seconds}s"


# what `status` reads of the timer and of the service (`systemctl show -p`)
SYSTEMD_TIMER_PROPERTIES = "LoadState,ActiveState,SubState,UnitFileState"
SYSTEMD_SERVICE_PROPERTIES = "Result,ExecMainStatus,ExecMainExitTimestamp,ActiveState"


def _systemd_timestamp(value: str) -> str | None:
    """`@1795825944` (show --timestamp=unix) -> ISO 8601 UTC, or None."""
    value = value.strip()
    if value.startswith("@") and value[1:].isdigit() and int(value[1:]) > 0:
        return iso_from_ms(int(value[1:]) * 1000)
    return None


def _show_properties(text: str) -> dict[str, str]:
    """`systemctl show -p A,B` output (`A=value` lines) as a dict."""
    return dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)


def _show_blocks(text: str, units: int) -> list[str]:
    """`systemctl show A B` output, one block per unit (a blank line between them)."""
    blocks = text.replace("\r\n", "\n").split("\n\n")
    return (blocks + [""] * units)[:units]


def _json_rows(text: str, key: str) -> dict[str, dict[str, Any]] | None:
    """A JSON table of systemctl (`--output=json`: a list of objects) by each
    row's `key`; None when the text is not one."""
    try:
        rows = json.loads(text) if text.strip() else []
    except ValueError:
        return None
    if not isinstance(rows, list):
        return None
    return {row[key]: row for row in rows if isinstance(row, dict) and isinstance(row.get(key), str)}


def _user_manager_problem(system: System, answer: CommandResult) -> str:
    """One sentence on why `systemctl --user` does not answer."""
    env = system.environ
    missing = [v for v in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS") if not env.get(v)]
    if answer.returncode == 127:
        return "systemctl is not installed"
    if answer.stdout.strip() == "offline":
        return "this system was not booted with systemd (no /run/systemd/system), so there is no user manager"
    if len(missing) == 2:
        return (
            "no user manager reachable: XDG_RUNTIME_DIR and DBUS_SESSION_BUS_ADDRESS are not set "
            "(typical under sudo, su, cron or in containers)"
        )
    return f"no user manager reachable ({answer.summary()})"


@register_backend
class SystemdBackend(SchedulerBackend):
    """A user timer + a hardened oneshot service in the user's own manager."""

    name = "systemd"
    can_embed = True
    time_limit = True  # TimeoutStartSec=
    command_hint = "`lore-service doctor` checks the user manager; or use --backend cron"
    # PrivateTmp=true gives the service an empty /tmp: nothing it needs may live there
    hidden_roots: tuple[str, ...] = ("/tmp", "/var/tmp")

    def schedule_step(self, interval_seconds: int) -> int:
        # OnUnitActiveSec= counts from the last activation in this boot and
        # Persistent= only serves calendar timers: a 24h timer on a laptop that
        # is shut down nightly would never fire. Fire at least hourly (and 5 min
        # after the manager starts) and let `run` skip until the interval is due.
        return min(interval_seconds, 3600)

    # -- naming and files
    @staticmethod
    def unit_base(sid: str) -> str:
        return f"lore-sync-{sid}"

    def unit_dir(self) -> str:
        env = self.system.environ
        config = env.get("XDG_CONFIG_HOME", "").strip() or os.path.join(
            env.get("HOME") or os.path.expanduser("~"), ".config"
        )
        return os.path.join(config, "systemd", "user")

    def file_paths(self, manifest: Manifest) -> list[str]:
        base = os.path.join(self.unit_dir(), self.unit_base(manifest.service_id))
        return [base + ".service", base + ".timer"]

    def _systemctl(self, *args: str, timeout: float = 30) -> CommandResult:
        return self.system.run(["systemctl", "--user", "--no-pager", *args], timeout=timeout)

    # -- availability and requirements
    @classmethod
    def availability(cls, system: System) -> Check:
        def missing(why: str) -> Check:
            hint = (
                "log in as this user directly (not sudo/su), or export XDG_RUNTIME_DIR=/run/user/$(id -u); "
                "on machines without a user manager use --backend cron"
            )
            return Check("user manager", "fail", why, hint)

        if not system.platform.startswith("linux"):
            return missing("systemd user timers exist on Linux only")
        if system.which("systemctl") is None:
            return missing("systemctl is not installed")
        answer = system.run(["systemctl", "--user", "is-system-running"], timeout=15)
        state = answer.stdout.strip()
        if state in SYSTEMD_UP_STATES:
            return Check("user manager", "ok", f"the systemd user manager answers ({state})")
        return missing(_user_manager_problem(system, answer))

    def requirements(self, manifest: Manifest | None, cfg: ServiceConfig | None = None) -> list[Check]:
        checks = [self._version_check(), self._linger_check()]
        if manifest is not None:
            checks.extend(self._sandbox_check(manifest, cfg or config_or_defaults(self.paths, manifest.service_id)))
        return checks

    def _sandbox_check(self, manifest: Manifest, cfg: ServiceConfig) -> list[Check]:
        # what the run reads (program, config and token) and starts (stages), and where it writes
        needed = [*manifest.program[:2], self.paths.config_dir(manifest.service_id)]
        stages = [s.command[0] for s in cfg.active_stages()] if cfg.stages else [manifest.lore_path or ""]
        needed += [p for p in stages if os.path.isabs(p)]  # (no config before the first install: lore's)
        needed += self._write_paths(manifest, cfg)
        hidden = [p for p in needed if any(p == r or p.startswith(r + "/") for r in self.hidden_roots)]
        if not hidden:
            return []
        return [
            Check(
                "sandbox",
                "fail",
                f"{hidden[0]} is under a temporary folder, which the service's private /tmp hides from it",
                "keep the project, lore-service and its --home outside /tmp, or use --backend cron",
            )
        ]

    def _version_check(self) -> Check:
        first = self._systemctl("--version").stdout.strip().splitlines()
        words = first[0].split() if first else []
        version = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
        if version is None:
            return Check("systemd version", "warn", "could not read the systemd version", "systemctl --version")
        if version < SYSTEMD_MIN_VERSION:
            return Check(
                "systemd version",
                "fail",
                f"systemd {version} is older than {SYSTEMD_MIN_VERSION}, which the unit's sandbox options need",
                "use --backend cron on this machine",
            )
        return Check("systemd version", "ok", f"systemd {version}")

    _linger_record: tuple[bool | None] | None = None

    def _lingers(self) -> bool | None:
        """logind's record of lingering, read once: the same for every service `status --all` shows."""
        if self._linger_record is None:
            self._linger_record = (self.system.lingering(self.system.username()),)
        return self._linger_record[0]

    def _linger_check(self) -> Check:
        user = self.system.username()
        hint = f"loginctl enable-linger {user}"
        answer = self.system.run(["loginctl", "show-user", user, "-p", "Linger", "--value"], timeout=15)
        value = answer.stdout.strip()
        if answer.ok and value in ("yes", "no"):
            linger = value == "yes"
        elif (recorded := self.system.lingering(user)) is not None:
            linger = recorded
        else:
            return Check(
                "lingering",
                "warn",
                f"lingering is unknown: logind does not answer ({answer.summary()})",
                f"if the machine has logind, run `{hint}` so the timer also fires while you are logged out",
            )
        if linger:
            return Check("lingering", "ok", f"lingering is on for {user}: the timer fires while logged out")
        return Check(
            "lingering",
            "warn",
            f"lingering is off for {user}: the timer only fires while {user} is logged in",
            hint,
        )

    def scheduled_path(self, manifest: Manifest) -> str | None:
        """The user manager's own PATH, which its services inherit."""
        answer = self._systemctl("show-environment")
        found = [line[5:] for line in answer.stdout.splitlines() if line.startswith("PATH=")] if answer.ok else []
        return found[0] if found else None

    # -- units
    def _write_paths(self, manifest: Manifest, cfg: ServiceConfig) -> list[str]:
        """Where a run writes: the first three must exist; then the run slots
        shared by every service (install makes the folder), then the config's."""
        sid = manifest.service_id
        paths = [self.paths.state_dir(sid), self.paths.log_dir(sid), manifest.project_root]
        paths.append(os.path.dirname(self.paths.slot(0)))
        return paths + [p for p in cfg.extra_write_paths if p not in paths]

    def render(self, manifest: Manifest, cfg: ServiceConfig, token_line: str | None) -> tuple[str, str]:
        """The .service and .timer units."""
        sid = manifest.service_id
        what = f"lore sync for {manifest.project_root.replace('%', '%%')}"
        exec_start = " ".join(systemd_quote(a) for a in manifest.program)
        # the slots and extra paths may not exist: "-" keeps a missing one from failing the unit
        rw = [
            ("-" if i >= 3 else "") + systemd_quote(p, variables=False)
            for i, p in enumerate(self._write_paths(manifest, cfg))
        ]
        service = [
            "# Written by lore-service; `lore-service install` rewrites it, edits are reported as drift.",
            "[Unit]",
            f"Description={what} ({sid})",
            "",
            "[Service]",
            "Type=oneshot",
            f"ExecStart={exec_start}",
            # our own run budget ends first, so the run records its own timeout
            f"TimeoutStartSec={scheduler_timeout(cfg)}",
            "Nice=10",
            "IOSchedulingClass=idle",
            # no CPUSchedulingPolicy=: systemd 252 sets it with nice 0, which a user
            # manager started at a positive nice may not do (the unit exits 214/SETSCHEDULER)
        ]
        home = self.system.environ.get("HOME") or os.path.expanduser("~")
        # Environment= expands specifiers but no $VARIABLES: a `$` is written as itself
        pins = self.paths.xdg_pins(home)
        service += ["Environment=" + systemd_quote(f"{k}={v}", variables=False) for k, v in pins]
        if token_line is not None:
            service.append(token_line)
        service += [
            "NoNewPrivileges=true",
            "PrivateTmp=true",
            "PrivateDevices=true",
            # user managers ignore namespace options without a user namespace before systemd 254
            "PrivateUsers=true",
            "ProtectSystem=strict",
            "ProtectHome=read-only",
            "ReadWritePaths=" + " ".join(rw),
            "ProtectKernelTunables=true",
            "ProtectKernelModules=true",
            "ProtectKernelLogs=true",
            "ProtectControlGroups=true",
            "ProtectClock=true",
            "ProtectHostname=true",
            "ProtectProc=invisible",
            "ProcSubset=pid",
            "RestrictNamespaces=true",
            "RestrictRealtime=true",
            "RestrictSUIDSGID=true",
            "LockPersonality=true",
            "MemoryDenyWriteExecute=true",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "SystemCallArchitectures=native",
            "SystemCallFilter=@system-service",
            "SystemCallFilter=~@privileged @resources",
            "CapabilityBoundingSet=",
            "UMask=0077",
            "",
        ]
        return "\n".join(service), self._timer_unit(manifest, what)

    def _timer_unit(self, manifest: Manifest, what: str) -> str:
        sid, interval = manifest.service_id, manifest.schedule_step_seconds
        splay = max(30, min(300, interval // 10))
        timer = [
            "# Written by lore-service; `lore-service install` rewrites it, edits are reported as drift.",
            "[Unit]",
            f"Description=every {format_interval(manifest.interval_seconds)}: {what} ({sid})",
            "",
            "[Timer]",
            # catch up after boot, login or a manager restart (in the past: fires on enable)
            "OnStartupSec=5min",
            f"OnUnitActiveSec={systemd_seconds(interval)}",
            # spread many workspaces over a few minutes instead of one second
            f"RandomizedDelaySec={splay}s",
            "FixedRandomDelay=true",
            "AccuracySec=30s",
            f"Unit={self.unit_base(sid)}.service",
            "",
            "[Install]",
            "WantedBy=timers.target",
            "",
        ]
        return "\n".join(timer)

    def plan(self, manifest: Manifest, cfg: ServiceConfig, embedded_token: str | None) -> Plan:
        self.refuse_unsafe_values(manifest, cfg)
        service_path, timer_path = self.file_paths(manifest)
        shown_token = None
        token_line = None
        if manifest.token_source == "embedded":
            token_line = _environment_line(manifest.token_env, embedded_token or "")
            shown_token = _environment_line(manifest.token_env, SECRET_PLACEHOLDER)
        service, timer = self.render(manifest, cfg, token_line)
        shown = self.render(manifest, cfg, shown_token)[0] if token_line else None
        timer_unit = self.unit_base(manifest.service_id) + ".timer"
        return Plan(
            files=[PlannedFile(service_path, service, 0o600, redacted=shown), PlannedFile(timer_path, timer, 0o644)],
            commands=[["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", timer_unit]],
        )

    def uninstall(self, manifest: Manifest) -> None:
        timer_unit = self.unit_base(manifest.service_id) + ".timer"
        existing = [p for p in self.file_paths(manifest) if os.path.exists(p)]
        # always: a manager may still hold a timer whose files were deleted by
        # hand; "not loaded" is fine, we are removing it anyway
        self._systemctl("disable", "--now", timer_unit)
        for path in existing:
            remove_file(path)
        reload = self._systemctl("daemon-reload")
        if existing and not reload.ok:
            raise SchedulerError(
                f"`systemctl --user daemon-reload` failed: {reload.summary()}",
                "the unit files are removed; run `systemctl --user daemon-reload` once the user manager answers",
            )

    # -- state
    def _next_due_tick(self, manifest: Manifest, tick_ms: int) -> int:
        """The first timer tick at which `run` will not skip as not due."""
        due = self.pending_due_ms(manifest)
        if due is None or due <= tick_ms:
            return tick_ms
        step = manifest.schedule_step_seconds * 1000
        return tick_ms + -(-(due - tick_ms) // step) * step

    def _drift(self, manifest: Manifest) -> list[str]:
        cfg = config_or_defaults(self.paths, manifest.service_id)  # the units are rendered from it
        expected = self.plan(manifest, cfg, SECRET_PLACEHOLDER if manifest.token_source == "embedded" else None)
        token_prefix = 'Environment="' + manifest.token_env + "="
        problems = []
        for planned in expected.files:
            actual = read_text(planned.path)
            if actual is None:
                problems.append(f"{planned.path} is missing")
                continue
            if manifest.token_source == "embedded":  # compare without the token itself
                placeholder = _environment_line(manifest.token_env, SECRET_PLACEHOLDER)
                actual = "\n".join(
                    placeholder if line.startswith(token_prefix) else line for line in actual.split("\n")
                )
            if actual != planned.content:
                problems.append(f"{planned.path} differs from what install wrote (edited by hand?)")
        return problems

    def state(self, manifest: Manifest) -> SchedulerState:
        base = self.unit_base(manifest.service_id)
        # asked directly (no is-system-running first), both units in one `show`:
        # `status` pays for each call
        props = f"{SYSTEMD_TIMER_PROPERTIES},{SYSTEMD_SERVICE_PROPERTIES}"
        answer = self._systemctl("show", base + ".timer", base + ".service", "-p", props, "--timestamp=unix")
        if not answer.ok:
            return self._unreadable_view(manifest, answer)
        timer, service = (_show_properties(block) for block in _show_blocks(answer.stdout, 2))
        elapses = self._list_timers([base + ".timer"])
        return self._view(manifest, timer, elapses.get(base + ".timer", {}), service)

    def states(self, manifests: Sequence[Manifest]) -> dict[str, SchedulerState | LoreServiceError]:
        """Two questions for any number of services: `list-units` of every
        lore-sync unit (load, active and sub state) and `list-timers` of every
        lore-sync timer. `show` would cost the user manager a D-Bus call per
        unit (about 0.5 ms each: 0.2 s for 200 services), so the timer's
        enablement is read where systemd records it, the timers.target.wants
        link, and the service's last exit (Result, ExecMainStatus, exit time)
        is left to `status` of that one service."""
        listing = self._systemctl("list-units", "--all", "--output=json", "lore-sync-*")
        loaded = _json_rows(listing.stdout, "unit") if listing.ok else None
        if loaded is None:
            if listing.ok:  # a systemctl without JSON tables: ask about each service
                return super().states(manifests)
            return self.each_service(manifests, lambda m: self._unreadable_view(m, listing))
        elapses = self._list_timers(["lore-sync-*.timer"])

        def view(manifest: Manifest) -> SchedulerState:
            timer = self.unit_base(manifest.service_id) + ".timer"
            row = loaded.get(timer, {"load": "not-found", "active": "inactive", "sub": "dead"})
            props = {"LoadState": row.get("load"), "ActiveState": row.get("active"), "SubState": row.get("sub")}
            props["UnitFileState"] = self._unit_file_state(timer)
            return self._view(manifest, {k: str(v) for k, v in props.items()}, elapses.get(timer, {}), {})

        return self.each_service(manifests, view)

    def _unit_file_state(self, timer: str) -> str:
        """UnitFileState as systemd tells it for our own timer: `enable` links it
        into timers.target.wants beside it (its [Install] section)."""
        folder = self.unit_dir()
        if not os.path.exists(os.path.join(folder, timer)):
            return ""
        return "enabled" if os.path.lexists(os.path.join(folder, "timers.target.wants", timer)) else "disabled"

    def _unreadable_view(self, manifest: Manifest, answer: CommandResult) -> SchedulerState:
        base = self.unit_base(manifest.service_id)
        view = SchedulerState(False, False, "", drift=self._drift(manifest))
        view.extra["units"] = [base + ".timer", base + ".service"]
        view.detail = f"cannot read the timer: {_user_manager_problem(self.system, answer)}"
        return view

    def _view(
        self, manifest: Manifest, timer: dict[str, str], elapses: dict[str, Any], service: dict[str, str]
    ) -> SchedulerState:
        """The entry as the timer's and the service's properties and the timer's elapses say."""
        base = self.unit_base(manifest.service_id)
        units = [base + ".timer", base + ".service"]
        # lingering: whether the timer fires while the user is logged out (STALE's likeliest cause when off)
        extra = {"units": units, "linger": self._lingers()}
        view = SchedulerState(False, False, "", drift=self._drift(manifest), extra=extra)
        loaded, enabled = timer.get("LoadState") == "loaded", timer.get("UnitFileState") == "enabled"
        view.registered, view.active = loaded and enabled, timer.get("ActiveState") == "active"
        self._read_elapses(manifest, view, elapses)
        self._read_last_result(service, view)
        active_sub = f"{timer.get('ActiveState', '?')}/{timer.get('SubState', '?')}"
        if not view.active and not view.drift:
            view.drift.append(f"{base}.timer is not active ({active_sub})")
        elif loaded and not enabled and not view.drift:
            # running now, but gone after the next log-in or reboot
            view.drift.append(f"{base}.timer is not enabled ({timer.get('UnitFileState') or 'unknown'})")
        view.detail = f"timer {active_sub}, {timer.get('UnitFileState') or 'not installed'}"
        return view

    def _list_timers(self, patterns: list[str]) -> dict[str, dict[str, Any]]:
        """`list-timers` rows (JSON, times in microseconds) by timer unit; {} when it does not answer."""
        listing = self._systemctl("list-timers", "--all", "--output=json", *patterns)
        return (_json_rows(listing.stdout, "unit") if listing.ok else None) or {}

    def _read_elapses(self, manifest: Manifest, view: SchedulerState, row: dict[str, Any]) -> None:
        """The timer's next and last elapse, from its `list-timers` row."""
        if isinstance(row.get("next"), int) and row["next"] > 0:
            view.next_run_iso = iso_from_ms(self._next_due_tick(manifest, row["next"] // 1000))
        if isinstance(row.get("last"), int) and row["last"] > 0:
            view.last_trigger_iso = iso_from_ms(row["last"] // 1000)

    @staticmethod
    def _read_last_result(service: dict[str, str], view: SchedulerState) -> None:
        """How the service's last run ended, as systemd saw it (Result, exit status)."""
        finished = _systemd_timestamp(service.get("ExecMainExitTimestamp", ""))
        if finished:
            view.last_result = service.get("Result") or None
            status_text = service.get("ExecMainStatus", "")
            view.extra["last_exit_status"] = int(status_text) if status_text.isdigit() else None
            view.extra["last_finished_iso"] = finished

    def health(self, manifest: Manifest | None) -> list[Check]:
        paths = self.file_paths(manifest) if manifest is not None else []
        return [Check("unit file", "ok", path) for path in paths if os.path.exists(path)]


# ----------------------------------------------------------------------------
# 6b. cron (Linux and other Unix without a user manager)
# ----------------------------------------------------------------------------


CRON_BEGIN = "# BEGIN lore-service "
CRON_END = "# END lore-service "
# cron rejects a command of 999 bytes or more ("command too long"); we hold the
# whole line (schedule included) to that limit
CRON_MAX_LINE_BYTES = 998
# cron gives jobs PATH=/usr/bin:/bin; the run gets this instead
CRON_PATH = "/usr/local/bin:/usr/bin:/bin"
# steps cron's fields express exactly: `*/N` restarts every hour (or day), so
# only divisors of 60 minutes (or 24 hours) give even gaps
CRON_MINUTE_STEPS = (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30)
CRON_HOUR_STEPS = (1, 2, 3, 4, 6, 8, 12, 24)
CRON_STEPS = tuple(m * 60 for m in CRON_MINUTE_STEPS) + tuple(h * 3600 for h in CRON_HOUR_STEPS)
# Vixie cron re-reads changed crontabs at about hh:mm:01, judged by the spool's
# mtime (1 s resolution): a crontab written in that very second is missed until
# the next change, so none is written in a minute's first seconds
CRON_RELOAD_GUARD_SECONDS = 3.0
CRON_SPLICE_SECONDS = 2.0  # ample for crontab -l, the splice and crontab FILE (milliseconds in practice)
# cron keeps no record of the minutes it did not see: a tick that falls while
# the machine sleeps or is off is lost, and the next one runs as usual
CRON_CATCH_UP = "none: cron skips runs missed while the machine sleeps or is off"
CRON_DAEMONS = ("cron", "crond")  # Debian/Ubuntu's Vixie cron, cronie (Fedora, Arch)
CRON_INSTALL_HINT = (
    "install cron: `sudo apt install --no-install-recommends cron` (Debian/Ubuntu; without the flag apt "
    "also pulls in a mail server) or `sudo dnf install cronie` (Fedora/RHEL); or use `--backend none`"
)
CRON_DAEMON_HINT = (
    "start it: `sudo service cron start` (Debian/Ubuntu; `sudo systemctl enable --now cron` where systemd "
    "runs the system), `sudo systemctl enable --now crond` with cronie; in a container, start `cron` from "
    "its entrypoint"
)


def cron_step(interval_seconds: int) -> int:
    """The largest step cron fires at exactly that divides the interval (45m -> 15m, 7h -> 1h)."""
    fits = [s for s in CRON_STEPS if s <= interval_seconds and interval_seconds % s == 0]
    return max(fits) if fits else 60


def _cron_seed(service_id: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"cron:{service_id}".encode()).digest()[:8], "big")


def cron_expression(service_id: str, step_seconds: int) -> str:
    """Five cron fields firing every `step_seconds` (one of CRON_STEPS), at a
    minute (and hour) derived from the service id, so that many services on
    one machine do not all start at :00."""
    seed = _cron_seed(service_id)
    minute, hour_seed = seed % 60, seed // 60
    if step_seconds < 3600:
        n = max(1, step_seconds // 60)
        return "* * * * *" if n == 1 else f"{seed % n}-59/{n} * * * *"
    hours = step_seconds // 3600
    if hours == 1:
        return f"{minute} * * * *"
    if hours >= 24:
        return f"{minute} {hour_seed % 24} * * *"
    return f"{minute} {hour_seed % hours}-23/{hours} * * *"


def _cron_field(text: str, low: int, high: int) -> set[int] | None:
    """Values of one numeric cron field (`*`, `a`, `a-b`, `/step`, lists); None if not understood."""
    values: set[int] = set()
    try:
        for part in text.split(","):
            span, slash, step_text = part.partition("/")
            step = int(step_text) if slash else 1
            if span == "*":
                first, last = low, high
            elif "-" in span:
                a, b = span.split("-", 1)
                first, last = int(a), int(b)
            else:
                first = int(span)
                last = high if slash else first
            if step < 1 or not low <= first <= last <= high:
                return None
            values.update(range(first, last + 1, step))
    except ValueError:
        return None
    return values


def _cron_times(expression: str) -> tuple[set[int], set[int]] | None:
    fields = expression.split()
    if len(fields) != 5 or fields[2:] != ["*", "*", "*"]:
        return None
    minutes, hours = _cron_field(fields[0], 0, 59), _cron_field(fields[1], 0, 23)
    return (minutes, hours) if minutes and hours else None


def cron_next_ms(expression: str, after_ms: int) -> int | None:
    """The first minute strictly after `after_ms` at which cron fires the
    expression (local time, like cron); None for fields we do not parse."""
    times = _cron_times(expression)
    return None if times is None else next_calendar_ms([times], after_ms)


def next_calendar_ms(times: Sequence[tuple[set[int], set[int]]], after_ms: int) -> int | None:
    """The first minute strictly after `after_ms` whose local (minute, hour)
    one of the (minutes, hours) pairs holds: cron's fields, launchd's calendar."""
    t = (after_ms // 60000 + 1) * 60
    for _ in range(2 * 24 * 60 + 120):  # two days (plus a DST hour) always hold a match
        lt = time.localtime(t)
        if any(lt.tm_min in minutes and lt.tm_hour in hours for minutes, hours in times):
            return t * 1000
        t += 60
    return None


def cron_describe(expression: str) -> str:
    """`7-59/15 * * * *` -> 'every 15 minutes, at :07, :22, :37, :52'."""
    times = _cron_times(expression)
    if times is None:
        return f"`{expression}`"
    minutes, hours = sorted(times[0]), sorted(times[1])
    if len(hours) == 24:
        if len(minutes) == 60:
            return "every minute"
        if len(minutes) == 1:
            return f"every hour at :{minutes[0]:02d}"
        gap = minutes[1] - minutes[0]
        if len(minutes) > 6:
            return f"every {gap} minutes from :{minutes[0]:02d}"
        return f"every {gap} minutes, at " + ", ".join(f":{m:02d}" for m in minutes)
    clock = [f"{h:02d}:{m:02d}" for h in hours for m in minutes]
    if len(clock) == 1:
        return f"daily at {clock[0]} (local time)"
    if len(minutes) == 1:
        return f"every {hours[1] - hours[0]} hours, at {', '.join(clock)} (local time)"
    return "at " + ", ".join(clock[:12]) + (" ..." if len(clock) > 12 else "") + " (local time)"


def crontab_lines(text: str) -> list[str]:
    """Lines with their '\\n' (the last one may lack it); only '\\n' separates
    (str.splitlines would also split on \\r, \\f, \\x1c ... and lose bytes)."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def cron_blocks(text: str, service_id: str, action: str = "install") -> list[list[str]]:
    """The lines inside each `# BEGIN/END lore-service <id>` block; a lone or
    nested marker is refused (SchedulerError) rather than guessed at."""
    begin, end = CRON_BEGIN + service_id, CRON_END + service_id
    blocks: list[list[str]] = []
    current: list[str] | None = None
    opened = 0
    for number, line in enumerate(crontab_lines(text), 1):
        mark = line.strip()
        if mark == begin:
            if current is not None:
                raise _cron_marker_error(f"`{begin}` on line {opened} has no END before line {number}", action)
            current, opened = [], number
        elif mark == end:
            if current is None:
                raise _cron_marker_error(f"`{end}` on line {number} has no BEGIN before it", action)
            blocks.append(current)
            current = None
        elif current is not None:
            current.append(line)
    if current is not None:
        raise _cron_marker_error(f"`{begin}` on line {opened} has no END marker", action)
    return blocks


def _cron_marker_error(problem: str, action: str) -> SchedulerError:
    return SchedulerError(
        f"your crontab has a lone lore-service marker: {problem}",
        "lore-service will not guess which lines are its own: open the crontab with `crontab -e`, delete the "
        f"stray marker (or the whole broken block), save, then run `{TOOL_NAME} {action}` again",
        code="crontab_marker",
    )


def cron_splice(text: str, service_id: str, block: str | None, action: str = "install") -> tuple[str, int]:
    """The crontab with this service's block(s) replaced by `block` (or removed
    when None), and how many blocks were found. Every other byte is kept; the
    block goes where the first old one was, else at the end."""
    begin, end = CRON_BEGIN + service_id, CRON_END + service_id
    found = len(cron_blocks(text, service_id, action))  # raises on a lone marker
    out: list[str] = []
    inside = placed = False
    for line in crontab_lines(text):
        mark = line.strip()
        if mark == begin:
            inside = True
        elif mark == end:
            inside = False
            if block is not None and not placed:
                out.append(block)
                placed = True
        elif not inside:
            out.append(line)
    if block is not None and not placed:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(block)
    result = "".join(out)
    if result and not result.endswith("\n"):
        result += "\n"  # crontab refuses a file whose last line has no newline
    return result, found


@register_backend
class CronBackend(SchedulerBackend):
    """One marked block in the user's crontab, fired every schedule step."""

    name = "cron"
    # cron hands its line to `sh -c`: an embedded token would sit in an argv every process can read
    embed_refusal = (
        "--token-source embedded is not offered with cron: the token would be visible in the process list "
        "while a run lasts"
    )

    @classmethod
    def availability(cls, system: System) -> Check:
        if system.platform in ("darwin", "win32"):
            why = (
                "cron is not used on macOS (crontab raises a permission dialog; launchd is the scheduler)"
                if system.platform == "darwin"
                else "there is no cron on Windows"
            )
            hint = "use the default backend there (`--backend auto`); `--dry-run` previews the cron line anywhere"
            return Check("crontab", "fail", why, hint)
        failure = cls._crontab_failure(system.ask(["crontab", "-l"], timeout=30, keep_newlines=True))
        if failure is None:
            return Check("crontab", "ok", "the user's crontab can be read (`crontab -l`)")
        return Check("crontab", "fail", failure.message, failure.hint)

    @staticmethod
    def _no_crontab(result: CommandResult) -> bool:
        return result.returncode == 1 and "no crontab for" in (result.stderr + result.stdout)

    @classmethod
    def _crontab_failure(cls, result: CommandResult) -> SchedulerError | None:
        """What a `crontab -l` that failed means; None when it read a crontab (or there is none yet)."""
        if result.ok or cls._no_crontab(result):
            return None
        if result.returncode == 127:
            return SchedulerError("crontab is not installed", CRON_INSTALL_HINT, code="crontab_missing")
        why = f"`crontab -l` failed ({result.returncode}): {result.summary()}"
        return SchedulerError(why, cls._crontab_hint(result), code="crontab")

    def schedule_step(self, interval_seconds: int) -> int:
        return cron_step(interval_seconds)

    # -- names
    def user(self) -> str:
        return self.system.username()

    def entry_path(self) -> str:
        return f"crontab:{self.user()}"  # descriptive: the crontab is only reached through `crontab`

    def file_paths(self, manifest: Manifest) -> list[str]:
        return [self.entry_path()]

    def tmp_path(self, manifest: Manifest) -> str:
        # private to the user (0600 in a 0700 folder), unlike /tmp
        return os.path.join(self.paths.state_dir(manifest.service_id), "crontab.new")

    # -- the line
    def scheduled_path(self, manifest: Manifest) -> str | None:
        return CRON_PATH  # written into the crontab line

    def environment(self) -> list[tuple[str, str]]:
        """What the run needs beyond cron's HOME, LOGNAME, SHELL and PATH=/usr/bin:/bin.
        Never the token: `--token-source embedded` is refused for cron, since
        `sh -c` would show it in the process list."""
        home = self.system.environ.get("HOME") or os.path.expanduser("~")
        return [("HOME", home), ("PATH", CRON_PATH), ("LANG", "C.UTF-8"), *self.paths.xdg_pins(home)]

    def line(self, manifest: Manifest) -> str:
        """`<schedule> VAR=value ... <program> >> <crash log> 2>&1`, each word
        quoted for /bin/sh, then every `%` escaped for cron."""
        import shlex

        crash_log = self.paths.crash_log(manifest.service_id)
        env = self.environment()
        for what, value in [*env, *(("program", a) for a in manifest.program), ("log", crash_log)]:
            self._check_data(what, value)
        words = [f"{k}={shlex.quote(v)}" for k, v in env]
        words += [shlex.quote(a) for a in manifest.program]
        words += [">>", shlex.quote(crash_log), "2>&1"]
        step = self.schedule_step(manifest.interval_seconds)
        return cron_expression(manifest.service_id, step) + " " + " ".join(words).replace("%", "\\%")

    @staticmethod
    def _check_data(what: str, value: str) -> None:
        # A backslash is refused, not escaped: Debian's cron turns `\\` into `\`
        # in the command while cronie and ISC cron keep both, so no spelling
        # of a backslash next to `%` or `\` survives every cron (a lone
        # backslash before other characters would, but a path holding one
        # is almost always a mistake; refusing is the predictable rule).
        bad = "\\" if "\\" in value else ("a line break" if "\n" in value or "\r" in value else None)
        if bad is None:
            return
        raise UsageError(
            f"cannot put {what} value {value!r} into a crontab line: it contains {bad}",
            "cron implementations disagree on backslashes and a line break ends the entry: rename or move the "
            "folder (project, --home, lore-service's own location) so its path has neither, or use another "
            "backend (`--backend systemd` / `--backend none`)",
            code="cron_unsafe",
        )

    def block(self, manifest: Manifest) -> str:
        sid = manifest.service_id
        line = self.line(manifest)
        size = len(line.encode("utf-8"))
        if size > CRON_MAX_LINE_BYTES:
            raise UsageError(
                f"the crontab line for {sid} would be {size} bytes; cron refuses commands of 999 bytes or more",
                "shorten the paths in it: install lore-service (and its Python) under a shorter folder, pass a "
                "shorter --home, or use a shorter project path; `--dry-run` shows the line",
                code="cron_line_too_long",
            )
        return f"{CRON_BEGIN}{sid}\n{line}\n{CRON_END}{sid}\n"

    def plan(self, manifest: Manifest, cfg: ServiceConfig, embedded_token: str | None) -> Plan:
        self.refuse_unsafe_values(manifest, cfg)
        planned = PlannedFile(self.entry_path(), self.block(manifest), 0o600)
        warnings: list[str] = []
        step = self.schedule_step(manifest.interval_seconds)
        if step < manifest.interval_seconds:
            warnings.append(
                f"cron cannot fire exactly every {format_interval(manifest.interval_seconds)}: it fires every "
                f"{format_interval(step)} and `run` skips until {format_interval(manifest.interval_seconds)} "
                "have passed since the last run"
            )
        return Plan(
            files=[planned],
            commands=[["crontab", "-l"], ["crontab", self.tmp_path(manifest)]],
            warnings=warnings,
        )

    # -- crontab
    def read_crontab(self) -> str:
        """The user's crontab; '' when there is none yet."""
        result = self.system.ask(["crontab", "-l"], timeout=30, keep_newlines=True)
        if (failure := self._crontab_failure(result)) is not None:
            raise failure
        if self._no_crontab(result):
            return ""
        if "\ufffd" in result.stdout:
            raise SchedulerError(
                "your crontab is not valid UTF-8; rewriting it could change bytes that are not ours",
                "open it with `crontab -e`, fix or remove the lines with other encodings, then try again",
                code="crontab_encoding",
            )
        return result.stdout

    @staticmethod
    def _crontab_hint(result: CommandResult) -> str:
        text = result.stderr + result.stdout
        if "not allowed" in text or "cron.allow" in text or "cron.deny" in text:
            return "ask an administrator to allow you in /etc/cron.allow (or remove you from /etc/cron.deny)"
        return f"run `crontab -l` yourself to see the problem; `{TOOL_NAME} doctor` checks cron"

    def write_crontab(self, manifest: Manifest, text: str) -> list[str]:
        tmp = self.tmp_path(manifest)
        ensure_dir(os.path.dirname(tmp))
        remove_file(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
        argv = ["crontab", tmp]
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(text.encode("utf-8"))
            self._outside_reload_window(room=0)
            result = self.system.run(argv, timeout=60)
        finally:
            remove_file(tmp)
        if not result.ok:
            raise SchedulerError(
                f"`crontab` refused the new crontab ({result.returncode}): {result.summary()}",
                CRON_INSTALL_HINT if result.returncode == 127 else self._crontab_hint(result),
                code="crontab_write",
            )
        return argv

    def entry_changed(self, manifest: Manifest, plan: Plan) -> bool:
        try:
            current = self.read_crontab()
            return cron_splice(current, manifest.service_id, plan.files[0].content)[0] != current
        except LoreServiceError:
            return True  # install will report the problem

    def _crontab_lock(self) -> FileLock:
        """One lock per user, whatever --home says: the crontab is the user's.
        Without it two installs would each splice into the same old text and
        the later `crontab FILE` would drop the other's block."""
        return FileLock(os.path.join(_user_dirs(self.system)[1], "crontab.lock"))

    def _outside_reload_window(self, room: float = CRON_SPLICE_SECONDS) -> None:
        """Wait until a write is at least `room` seconds away from the first
        seconds of a minute (cron's 1-second reload race). Called before the
        read, so read, splice and write follow each other at once and a user's
        `crontab -e` has the smallest window to be overwritten; and again
        (room 0) right before the write, in case the read was slow."""
        second = self.system.now_ms() / 1000 % 60
        if second < CRON_RELOAD_GUARD_SECONDS:
            self.system.sleep(CRON_RELOAD_GUARD_SECONDS - second)
        elif second > 60 - room:  # would end in the next minute's window: start after it instead
            self.system.sleep(60 - second + CRON_RELOAD_GUARD_SECONDS)

    def install(self, manifest: Manifest, cfg: ServiceConfig, embedded_token: str | None) -> Plan:
        plan = self.plan(manifest, cfg, embedded_token)  # refuses an unsafe or too long line first
        block = plan.files[0].content
        ran = [["crontab", "-l"]]
        with self._crontab_lock():
            self._outside_reload_window()
            current = self.read_crontab()
            updated, _ = cron_splice(current, manifest.service_id, block)
            if updated != current:  # installing the same block again writes nothing
                ran.append(self.write_crontab(manifest, updated))
                # a `crontab -e` in between is not ours to lock: check the block landed
                if block not in self.read_crontab():
                    raise SchedulerError(
                        "the crontab changed while lore-service was writing it; the block is not in place",
                        f"run `{TOOL_NAME} install` again",
                        code="crontab_race",
                    )
        return Plan(files=plan.files, commands=ran, warnings=plan.warnings)

    def uninstall(self, manifest: Manifest) -> None:
        # An emptied crontab is written empty, not removed with `crontab -r`:
        # -r would also delete anything the user added since we read it.
        with self._crontab_lock():
            self._outside_reload_window()
            try:
                current = self.read_crontab()
            except SchedulerError as exc:
                if exc.code == "crontab_missing":
                    return  # no crontab program: nothing can be scheduled
                raise
            updated, found = cron_splice(current, manifest.service_id, None, action="uninstall")
            if found:
                self.write_crontab(manifest, updated)

    def before_run(self, manifest: Manifest) -> None:
        trim_crash_log(self.paths.crash_log(manifest.service_id))

    # -- daemon
    def daemon(self) -> tuple[bool | None, str]:
        """(running, how we know); None when it cannot be told."""
        for name in CRON_DAEMONS:
            result = self.system.ask(["pgrep", "-x", name], timeout=10)
            if result.ok:
                pid = (result.stdout.split() or ["?"])[0]
                return True, f"the cron daemon runs ({name}, pid {pid})"
            if result.returncode != 1:
                break  # no pgrep (procps): look at /proc ourselves
        else:
            return False, "no cron daemon (cron or crond) is running"
        try:
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return None, "could not tell whether a cron daemon runs (no pgrep, no /proc)"
        for pid in pids:
            try:
                with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
                    comm = fh.read().strip()
            except OSError:
                continue
            if comm in CRON_DAEMONS:
                return True, f"the cron daemon runs ({comm}, pid {pid})"
        return False, "no cron daemon (cron or crond) is running"

    def _daemon_check(self) -> Check:
        running, why = self.daemon()
        if running:
            return Check("cron daemon", "ok", why)
        if running is None:
            return Check("cron daemon", "warn", why, "install procps (pgrep) or check with `ps -e | grep cron`")
        return Check("cron daemon", "warn", f"{why}: the crontab entry will never fire", CRON_DAEMON_HINT)

    # -- state
    def state(self, manifest: Manifest) -> SchedulerState:
        crontab = self.read_crontab()
        return self._view(manifest, crontab, self.daemon())

    def states(self, manifests: Sequence[Manifest]) -> dict[str, SchedulerState | LoreServiceError]:
        """One `crontab -l` and one look for the daemon, whatever the number of services."""
        try:
            crontab = self.read_crontab()
        except LoreServiceError as exc:
            return {m.service_id: exc for m in manifests}
        daemon = self.daemon()
        return self.each_service(manifests, lambda m: self._view(m, crontab, daemon))

    def _view(self, manifest: Manifest, crontab: str, daemon: tuple[bool | None, str]) -> SchedulerState:
        """The service's entry as the crontab's text and the daemon's presence say."""
        step = self.schedule_step(manifest.interval_seconds)
        blocks, drift = self._block_drift(manifest, crontab)
        running, why = daemon
        registered = bool(blocks)
        lines = [line.rstrip("\r\n") for line in blocks[0]] if blocks else []
        job = next((line for line in lines if line.strip() and not line.lstrip().startswith("#")), "")
        expression = " ".join(job.split()[:5])
        next_ms = self._next_firing(manifest, expression) if registered and running is not False else None
        parts = [f"crontab of {self.user()}: `{expression}` ({cron_describe(expression)})"]
        if not registered:
            parts = ["not in the crontab"]
        if step < manifest.interval_seconds:
            parts.append(f"fires every {format_interval(step)}; `run` skips until the interval has passed")
        parts.append(why)
        return SchedulerState(
            registered=registered,
            active=registered and bool(running),
            detail="; ".join(parts),
            drift=drift,
            next_run_iso=iso_from_ms(next_ms) if next_ms is not None else None,
            # (no last trigger: cron keeps no record of its own; status has the runs)
            catch_up=CRON_CATCH_UP,
            extra={"schedule": expression or None, "step_seconds": step, "daemon_running": running},
        )

    def _block_drift(self, manifest: Manifest, text: str) -> tuple[list[list[str]], list[str]]:
        """This service's blocks in the crontab, and how they differ from what install writes."""
        sid = manifest.service_id
        step = self.schedule_step(manifest.interval_seconds)
        drift: list[str] = []
        try:
            blocks = cron_blocks(text, sid)
        except SchedulerError as exc:
            blocks, drift = [], [exc.message]
        lines = [line.rstrip("\r\n") for line in blocks[0]] if blocks else []
        if not blocks and not drift:
            drift.append(f"the crontab of {self.user()} has no `{CRON_BEGIN}{sid}` block")
        elif len(blocks) > 1:
            drift.append(f"the crontab has {len(blocks)} blocks for {sid}")
        if blocks and lines != [self.line(manifest)]:
            drift.append(f"the crontab block for {sid} was edited (it differs from what install writes)")
        if manifest.schedule_step_seconds != step:
            drift.append(
                f"the manifest records a {format_interval(manifest.schedule_step_seconds)} step; cron needs "
                f"{format_interval(step)} for a {format_interval(manifest.interval_seconds)} interval"
            )
        return blocks, drift

    def _next_firing(self, manifest: Manifest, expression: str) -> int | None:
        """The next tick of the expression at which `run` will not skip as not due."""
        return cron_next_ms(expression, self.firing_after_ms(manifest))

    # -- checks
    def requirements(self, manifest: Manifest | None, cfg: ServiceConfig | None = None) -> list[Check]:
        return [self._daemon_check()]

    def health(self, manifest: Manifest | None) -> list[Check]:
        if manifest is None:
            return []
        log_dir = self.paths.log_dir(manifest.service_id)
        if not os.path.isdir(log_dir):
            crash = Check(
                "crash log",
                "fail",
                f"{log_dir} is missing: /bin/sh cannot open the cron line's `>>` target, so nothing runs",
                f"re-run `{TOOL_NAME} install` (it recreates the folder)",
            )
        else:
            crash = crash_log_check(self.paths.crash_log(manifest.service_id), "cron output lands here")
        return [crash, self._catch_up_check(manifest)]

    def _catch_up_check(self, manifest: Manifest) -> Check:
        """cron cannot run what it missed; a systemd user timer can, so where
        a user manager answers that is the fix (a warning: cron still syncs)."""
        manager = BACKENDS["systemd"].availability(self.system) if "systemd" in BACKENDS else None
        if manager is None or manager.status != "ok":
            why = manager.message if manager is not None else "no systemd backend"
            return Check("catch-up", "ok", f"{CRON_CATCH_UP} (no systemd user manager to do better: {why})")
        return Check(
            "catch-up",
            "warn",
            f"{CRON_CATCH_UP}; the systemd user manager here would run a missed sync within an hour of wake, "
            "boot or login",
            "`loginctl enable-linger $USER` (timers then run without a login session), then in "
            f"{manifest.project_root}: `{TOOL_NAME} install --backend systemd --name {manifest.service_id}` "
            "(it replaces the cron entry)",
        )


# ----------------------------------------------------------------------------
# 6c. launchd LaunchAgents (macOS)
# ----------------------------------------------------------------------------


LAUNCHD_LABEL_PREFIX = "com.gitlore.sync."
LAUNCHD_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
LAUNCHD_NICE = 10
LAUNCHCTL_NO_SUCH_SERVICE = (113, 3)  # "Could not find service" (113); older macOS: "No such process" (3)
LAUNCHCTL_IN_PROGRESS = 36  # bootout of a running job: "Operation now in progress", it is being removed
# bootout returns before launchd has let go of the label: a bootstrap right
# after it fails with 5 (Input/output error) or 37 (already in progress) for a
# few seconds, so install waits for the label to go and retries bootstrap
LAUNCHCTL_BUSY = (5, 37)
LAUNCHCTL_SETTLE_SECONDS = 10.0
LOGIN_ITEMS = "System Settings › General › Login Items (Allow in the Background)"
# folders macOS's privacy protection (TCC) keeps from agents, relative to the home, and absolute
PRIVACY_FOLDERS = ("Documents", "Desktop", "Downloads", "Library/Mobile Documents")
PRIVACY_FIX = (
    "give the scheduled program Full Disk Access (System Settings › Privacy & Security › Full Disk Access), "
    "or move the project (and lore-service) out of Documents, Desktop, Downloads, iCloud Drive and /Volumes"
)
LAUNCHD_GUI_HINT = (
    "launchd agents live in your GUI login session (domain gui/<uid>) and the token lives in your login "
    "keychain; SSH, sudo and su sessions reach neither. Log in at the Mac, open Terminal there and run the "
    f"same `{TOOL_NAME}` command as yourself, without sudo"
)


def parse_launchctl_print(text: str) -> dict[str, str]:
    """Top-level `key = value` lines of `launchctl print gui/<uid>/<label>`.

    Only lines indented by exactly one tab count: nested blocks (coalitions,
    event channels) repeat keys such as `state`. Apple says the format is not API,
    so unknown lines are ignored and the first occurrence of a key wins.
    """
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("\t") or line.startswith("\t\t"):
            continue
        key, sep, value = line[1:].partition(" = ")
        key = key.strip()
        if sep and key and key not in info:
            info[key] = value.strip()
    return info


def parse_launchd_services(text: str) -> dict[str, dict[str, str]]:
    """The `services = {...}` list of `launchctl print gui/<uid>`, one loaded
    job a line: `pid  last-exit-status  label`, pid 0 when it is not running,
    the status `-` when it never exited and negative for a signal. Each job's
    facts are given under the keys its own `print` uses (`state`, `pid`,
    `last exit code` or `last terminating signal`, neither while it runs, as
    there), so one reading of them serves both."""
    jobs: dict[str, dict[str, str]] = {}
    inside = False
    for line in text.splitlines():
        if line.startswith("\t") and not line.startswith("\t\t"):
            inside = line.strip() == "services = {"
            continue
        parts = line.split(None, 2) if inside else []
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        pid, status, label = int(parts[0]), parts[1], parts[2].strip()
        facts = {"state": "running" if pid else "not running"}
        if pid:  # (a running job's own print shows no last exit either)
            facts["pid"] = str(pid)
        elif status == "-":
            facts["last exit code"] = "(never exited)"
        elif status.startswith("-") and status[1:].isdigit():
            facts["last terminating signal"] = status[1:]
        elif status.isdigit():
            facts["last exit code"] = status
        jobs[label] = facts
    return jobs


def launchd_exit_code(value: str | None) -> int | None:
    """`0`, `1`, `78: EX_CONFIG` -> int; `(never exited)` or missing -> None."""
    head = (value or "").split(":", 1)[0].strip()
    try:
        return int(head)
    except ValueError:
        return None


def parse_print_disabled(text: str) -> dict[str, bool]:
    """`launchctl print-disabled gui/<uid>`: label -> disabled. macOS 14 and
    later print `"label" => disabled|enabled`, earlier ones `=> true|false`."""
    states: dict[str, bool] = {}
    inside = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith("= {"):
            inside = stripped.startswith("disabled services")
        elif stripped == "}":
            inside = False
        elif inside and stripped.startswith('"') and '" => ' in stripped:
            label, _, value = stripped[1:].partition('" => ')
            if value in ("disabled", "true", "enabled", "false"):
                states[label] = value in ("disabled", "true")
    return states


def privacy_protected(path: str, home: str) -> str | None:
    """The privacy-protected folder (macOS) that holds `path`, if any."""
    folders = [os.path.join(home, name) for name in PRIVACY_FOLDERS] + ["/Volumes"]
    return next((f for f in folders if path == f or path.startswith(f.rstrip("/") + "/")), None)


def launchd_count(value: str | None) -> int | None:
    """A plain number of `launchctl print` (pid, runs); None when absent or not a number."""
    text = (value or "").strip()
    return int(text) if text.isdigit() else None


def launchd_context_problem(system: System) -> str | None:
    """Why this process cannot reach the user's GUI session (and keychain), or None."""
    env = system.environ
    uid, euid = system.uid(), system.euid()
    if env.get("SUDO_USER"):
        return f"this runs under sudo (SUDO_USER={env['SUDO_USER']})"
    if uid != euid:
        return f"the real uid {uid} differs from the effective uid {euid} (su or a setuid wrapper)"
    if uid == 0:
        return "this runs as root, which has no GUI login session"
    if env.get("SSH_CONNECTION") or env.get("SSH_TTY") or env.get("SSH_CLIENT"):
        owner = system.console_owner_uid()
        if owner != uid:
            who = "nobody" if owner in (None, 0) else f"uid {owner}"
            return f"this is an SSH session and {who} (not you, uid {uid}) is logged in at the Mac's screen"
    return None


# The schedule is StartCalendarInterval, never StartInterval: launchd drops a
# StartInterval firing that falls while the Mac sleeps (launchd.plist(5)), so a
# 24h interval could skip whole days, while calendar firings missed during
# sleep are coalesced into one run at wake. A calendar can only name minutes,
# hours, days, weekdays and months, so it fires on a step that divides an hour
# and `run` skips until the interval is due, as with systemd and cron.
LAUNCHD_CALENDAR_KEYS = ("Minute", "Hour")  # what next-run reads (install writes Minute only)
LAUNCHD_INTERVAL_CATCH_UP = (
    "none: this plist still fires on StartInterval, which drops firings that fall while the Mac sleeps; "
    f"`{TOOL_NAME} install` moves it to calendar firings, which run at wake"
)


def launchd_step(interval_seconds: int) -> int:
    """The largest step that divides both the interval and an hour, i.e.
    cron's step capped at 1h: 5m -> 5m, 45m -> 15m, 90m -> 30m, 7h and 24h
    -> 1h. Firings fall on the same minutes every hour, and one falls exactly
    an interval after each run, so `run` skipping until due keeps the interval."""
    return min(cron_step(interval_seconds), 3600)


def launchd_calendar(service_id: str, step_seconds: int) -> list[dict[str, int]]:
    """StartCalendarInterval entries for a step dividing an hour: one
    `{Minute: m}` (every hour at :m) for each m = offset + k * step in the
    hour, the offset derived from the service id as cron's is (the same
    minutes cron would use), so services do not all start at :00. 5m gives
    12 entries, 15m gives 4, a 1h step one."""
    every = max(1, step_seconds // 60)
    return [{"Minute": minute} for minute in range(_cron_seed(service_id) % every, 60, every)]


def launchd_calendar_times(entries: object) -> list[tuple[set[int], set[int]]] | None:
    """(minutes, hours) of each StartCalendarInterval entry (a dict or a list
    of dicts, a missing key meaning every value, as launchd reads them); None
    for anything else (Day, Weekday, Month: not ours, not guessed)."""
    items = [entries] if isinstance(entries, dict) else entries
    if not isinstance(items, list) or not items:
        return None
    times = []
    for item in items:
        if not isinstance(item, dict) or set(item) - set(LAUNCHD_CALENDAR_KEYS):
            return None
        minute, hour = item.get("Minute"), item.get("Hour")
        for value, high in ((minute, 59), (hour, 23)):
            if value is not None and (type(value) is not int or not 0 <= value <= high):
                return None
        every_minute, every_hour = set(range(60)), set(range(24))
        times.append(({minute} if minute is not None else every_minute, {hour} if hour is not None else every_hour))
    return times


def launchd_next_ms(entries: object, after_ms: int) -> int | None:
    """The first minute strictly after `after_ms` at which launchd fires one
    of the calendar entries (local time, as launchd reads them); None for
    entries launchd_calendar_times does not read."""
    times = launchd_calendar_times(entries)
    return None if times is None else next_calendar_ms(times, after_ms)


def launchd_fires_by_interval(job: dict[str, Any] | None) -> bool:
    """A plist an older lore-service wrote: StartInterval, no calendar."""
    return job is not None and "StartInterval" in job and "StartCalendarInterval" not in job


def launchd_describe(entries: object) -> str:
    """`every 15 minutes, at :07, :22, :37, :52`, as cron's are described."""
    times = launchd_calendar_times(entries)
    if times is None:
        return "a calendar lore-service does not read"
    if any(len(hours) != 24 for _, hours in times):
        return "on a calendar of hours (not what install writes)"
    minutes = sorted({m for ms, _ in times for m in ms})
    return cron_describe(f"{','.join(map(str, minutes))} * * * *")


@register_backend
class LaunchdBackend(SchedulerBackend):
    """A LaunchAgent in the user's GUI domain, fired by StartCalendarInterval
    every schedule step (at most an hour), so runs missed in sleep happen at wake."""

    name = "launchd"
    token_stores = OS_TOKEN_STORES["darwin"]
    can_embed = True

    @classmethod
    def availability(cls, system: System) -> Check:
        return cls.os_tool_availability(system, "darwin", "launchctl", "/bin", "macOS LaunchAgents")

    def schedule_step(self, interval_seconds: int) -> int:
        return launchd_step(interval_seconds)

    # -- names
    def label(self, manifest: Manifest) -> str:
        return LAUNCHD_LABEL_PREFIX + manifest.service_id

    def domain(self) -> str:
        return f"gui/{self.system.uid()}"

    def target(self, manifest: Manifest) -> str:
        return f"{self.domain()}/{self.label(manifest)}"

    def plist_path(self, manifest: Manifest) -> str:
        # always the real ~/Library/LaunchAgents: launchd reloads agents from there at login
        home = self.system.environ.get("HOME") or os.path.expanduser("~")
        return os.path.join(home, "Library", "LaunchAgents", self.label(manifest) + ".plist")

    def file_paths(self, manifest: Manifest) -> list[str]:
        return [self.plist_path(manifest)]

    # -- the plist
    def job(self, manifest: Manifest, token: str | None) -> dict[str, Any]:
        crash_log = self.paths.crash_log(manifest.service_id)
        job: dict[str, Any] = {
            "Label": self.label(manifest),
            "ProgramArguments": list(manifest.program),  # argv array: no shell, no quoting
            # from the interval, not the manifest's step: an older manifest's step is drift
            "StartCalendarInterval": launchd_calendar(
                manifest.service_id, self.schedule_step(manifest.interval_seconds)
            ),
            "RunAtLoad": False,
            # no ProcessType Background: launchd throttles such jobs hard (runs several times
            # slower, stages past their budget); Nice and LowPriorityIO keep it polite instead
            "LowPriorityIO": True,
            "Nice": LAUNCHD_NICE,
            "WorkingDirectory": manifest.project_root,
            "StandardOutPath": crash_log,
            "StandardErrorPath": crash_log,
        }
        # launchd gives jobs PATH=/usr/bin:/bin:/usr/sbin:/sbin: a `#!/usr/bin/env` lore, or
        # one that calls git by name, would exit 127 (permanent) from every scheduled run
        env = {"PATH": self.scheduled_path(manifest)}
        if manifest.token_source == "embedded":
            env[manifest.token_env] = token or SECRET_PLACEHOLDER
        job["EnvironmentVariables"] = env
        return job

    def scheduled_path(self, manifest: Manifest) -> str:
        """lore's own folder, Homebrew's (Apple silicon, then Intel), then the system's."""
        lore = [os.path.dirname(manifest.lore_path)] if manifest.lore_path else []
        return ":".join(dict.fromkeys([*lore, *LAUNCHD_PATH]))

    @staticmethod
    def render(job: dict[str, Any]) -> str:
        import plistlib

        return plistlib.dumps(job, fmt=plistlib.FMT_XML, sort_keys=True).decode("utf-8")

    def plan(self, manifest: Manifest, cfg: ServiceConfig, embedded_token: str | None) -> Plan:
        self.refuse_unsafe_values(manifest, cfg)
        path, target = self.plist_path(manifest), self.target(manifest)
        embedded = manifest.token_source == "embedded"
        planned = PlannedFile(
            path,
            self.render(self.job(manifest, embedded_token)),
            0o600 if embedded else 0o644,
            redacted=self.render(self.job(manifest, SECRET_PLACEHOLDER)) if embedded else None,
        )
        warnings: list[str] = []
        if embedded:
            warnings.append(f"the embedded token is also shown by `launchctl print {target}` (its environment block)")
        warnings += [f"{why} (fix: {PRIVACY_FIX})" for why in self.privacy_problems(manifest, cfg)]
        return Plan(
            files=[planned],
            # install runs bootout only when the label is loaded, and skips the
            # reload when the plist is unchanged (as `git maintenance` does)
            commands=[
                ["launchctl", "bootout", target],
                ["launchctl", "enable", target],
                ["launchctl", "bootstrap", self.domain(), path],
            ],
            warnings=warnings,
        )

    # -- launchctl
    def _require_gui(self) -> None:
        problem = launchd_context_problem(self.system)
        if problem:
            raise SchedulerError(
                f"cannot reach your macOS login session: {problem}", LAUNCHD_GUI_HINT, code="no_gui_session"
            )

    def _launchctl_error(self, result: CommandResult, manifest: Manifest) -> SchedulerError:
        text = f"{result.stdout}\n{result.stderr}"
        message = f"`{' '.join(result.argv)}` failed ({result.returncode}): {result.summary()}"
        if result.returncode == 125 or "Domain does not support" in text or "Could not find domain" in text:
            return SchedulerError(
                message + f"; the GUI domain {self.domain()} is not available from this session",
                LAUNCHD_GUI_HINT,
                code="no_gui_domain",
            )
        if result.returncode == 5:
            return SchedulerError(
                message,
                f"launchd refused the job (already loaded, switched off in {LOGIN_ITEMS}, or an invalid plist): "
                "turn it on there, or run "
                f"`launchctl bootout {self.target(manifest)}` and `plutil -lint '{self.plist_path(manifest)}'`, "
                f"then `{TOOL_NAME} install` again",
                code="launchctl_bootstrap",
            )
        return SchedulerError(message, f"run `{TOOL_NAME} doctor` for the launchd checks", code="launchctl")

    def switched_off(self, manifest: Manifest) -> bool:
        """Whether the job is disabled for the user's GUI domain: on macOS 13 and
        later, what switching it off under Login Items does."""
        return self._disabled_labels().get(self.label(manifest), False)

    def _disabled_labels(self) -> dict[str, bool]:
        result = self.system.run(["launchctl", "print-disabled", self.domain()], timeout=30)
        return parse_print_disabled(result.stdout) if result.ok else {}

    def _loaded_jobs(self, manifest: Manifest) -> dict[str, dict[str, str]]:
        """Every job loaded in the GUI domain (its `launchctl print`), by label."""
        result = self.system.run(["launchctl", "print", self.domain()], timeout=30)
        if not result.ok:
            raise self._launchctl_error(result, manifest)
        return parse_launchd_services(result.stdout)

    def _print(self, manifest: Manifest) -> CommandResult | None:
        """`launchctl print` of the job; None when it is not loaded (exit 113)."""
        result = self.system.run(["launchctl", "print", self.target(manifest)], timeout=30)
        if result.ok:
            return result
        if result.returncode in LAUNCHCTL_NO_SUCH_SERVICE and "Could not find domain" not in result.stderr:
            return None
        raise self._launchctl_error(result, manifest)

    def _launchctl(self, manifest: Manifest, ran: list[list[str]], *args: str, tolerate: tuple[int, ...] = ()) -> int:
        argv = ["launchctl", *args]
        ran.append(argv)
        result = self.system.run(argv, timeout=60)
        if not result.ok and result.returncode not in tolerate:
            raise self._launchctl_error(result, manifest)
        return result.returncode

    def _bootout(self, manifest: Manifest, ran: list[list[str]]) -> None:
        """Unload the job and wait until launchd has really let go of it."""
        gone_or_going = (*LAUNCHCTL_NO_SUCH_SERVICE, LAUNCHCTL_IN_PROGRESS)
        self._launchctl(manifest, ran, "bootout", self.target(manifest), tolerate=gone_or_going)
        deadline = self.system.monotonic() + LAUNCHCTL_SETTLE_SECONDS
        while self._print(manifest) is not None:
            if self.system.monotonic() >= deadline:
                raise SchedulerError(
                    f"launchd still has {self.target(manifest)} loaded {LAUNCHCTL_SETTLE_SECONDS:.0f} s after bootout",
                    f"wait for its run to end (`launchctl print {self.target(manifest)}`), then run the command again",
                    code="launchctl",
                )
            self.system.sleep(0.25)

    def _bootstrap(self, manifest: Manifest, ran: list[list[str]], path: str) -> None:
        deadline = self.system.monotonic() + LAUNCHCTL_SETTLE_SECONDS
        while True:
            busy = LAUNCHCTL_BUSY if self.system.monotonic() < deadline else ()
            if self._launchctl(manifest, ran, "bootstrap", self.domain(), path, tolerate=busy) == 0:
                return
            self.system.sleep(0.5)

    def install(self, manifest: Manifest, cfg: ServiceConfig, embedded_token: str | None) -> Plan:
        self._require_gui()  # before launchctl or the keychain is touched
        plan = self.plan(manifest, cfg, embedded_token)
        planned, target = plan.files[0], self.target(manifest)
        if self.switched_off(manifest) and not self.force:  # the user's own choice: not ours to undo
            raise SchedulerError(
                f"{self.label(manifest)} is switched off in {LOGIN_ITEMS}",
                f"turn it on there, or run `{TOOL_NAME} install --force` to enable it again",
                code="login_item_disabled",
            )
        loaded = self._print(manifest) is not None
        unchanged = _read_bytes(planned.path) == planned.content.encode("utf-8")
        ran: list[list[str]] = []
        with RestoreOnFailure([planned.path]):
            atomic_write(planned.path, planned.content, planned.mode)
            if loaded and unchanged:
                self._launchctl(manifest, ran, "enable", target)  # already running this exact plist: no reload
            else:
                if loaded:
                    self._bootout(manifest, ran)
                # enable first: bootstrap of a label left disabled fails
                self._launchctl(manifest, ran, "enable", target)
                self._bootstrap(manifest, ran, planned.path)
        return Plan(files=plan.files, commands=ran, warnings=plan.warnings)

    def uninstall(self, manifest: Manifest) -> None:
        self._require_gui()
        self._bootout(manifest, [])
        remove_file(self.plist_path(manifest))

    def before_run(self, manifest: Manifest) -> None:
        trim_crash_log(self.paths.crash_log(manifest.service_id))

    # -- state
    def _installed_job(self, manifest: Manifest) -> tuple[dict[str, Any] | None, list[str]]:
        """The plist as it is on disk (None when missing or not a plist), and
        how it differs from what install writes."""
        import plistlib

        path = self.plist_path(manifest)
        raw = _read_bytes(path)
        if raw is None:
            return None, [f"{path} is missing"]
        try:
            actual = plistlib.loads(raw)
        except Exception:  # plistlib raises several types for garbage
            return None, [f"{path} is not a valid plist"]
        job = actual if isinstance(actual, dict) else None
        expected = self.job(manifest, SECRET_PLACEHOLDER)
        env = job.get("EnvironmentVariables") if job is not None else None
        embedded = manifest.token_source == "embedded"
        if job is not None and isinstance(env, dict) and embedded and manifest.token_env in env:
            job["EnvironmentVariables"] = {**env, manifest.token_env: SECRET_PLACEHOLDER}  # never compare secrets
        if actual == expected:
            return job, []
        if launchd_fires_by_interval(job):
            return job, [f"{path} fires on StartInterval, which drops runs while the Mac sleeps (an older install)"]
        return job, [f"{path} was edited (it differs from what install writes)"]

    def _calendar(self, manifest: Manifest, job: dict[str, Any] | None) -> tuple[str | None, str | None, str]:
        """(next run, catch-up, schedule in words) from the calendar launchd
        loaded: the next firing after now, or at/after next_due_at_ms while
        `run` would skip as not due."""
        if job is not None and launchd_fires_by_interval(job):
            return None, LAUNCHD_INTERVAL_CATCH_UP, f"every {job['StartInterval']} s (StartInterval)"
        entries = job.get("StartCalendarInterval") if job is not None else None
        next_ms = launchd_next_ms(entries, self.firing_after_ms(manifest))
        words = launchd_describe(entries)
        if manifest.schedule_step_seconds < manifest.interval_seconds:
            words += "; `run` skips until the interval has passed"
        return (iso_from_ms(next_ms) if next_ms is not None else None), None, words

    def state(self, manifest: Manifest) -> SchedulerState:
        self._require_gui()
        if self.switched_off(manifest):
            return self._view(manifest, True, None)
        printed = self._print(manifest)
        return self._view(manifest, False, None if printed is None else parse_launchctl_print(printed.stdout))

    def states(self, manifests: Sequence[Manifest]) -> dict[str, SchedulerState | LoreServiceError]:
        """Two questions for any number of jobs: `print-disabled` and the GUI
        domain's own `print`, whose services list gives each loaded job's pid
        and last exit status. (Its run count and the plist it was loaded from
        are in the job's own `print` only: `status` of one service shows them.)"""
        try:
            self._require_gui()
            disabled = self._disabled_labels()
            loaded = self._loaded_jobs(manifests[0]) if manifests else {}
        except LoreServiceError as exc:
            return {m.service_id: exc for m in manifests}
        return self.each_service(
            manifests, lambda m: self._view(m, disabled.get(self.label(m), False), loaded.get(self.label(m)))
        )

    def _view(self, manifest: Manifest, switched_off: bool, info: dict[str, str] | None) -> SchedulerState:
        """The job as launchd describes it (`info`: its `print` facts; None: not loaded)."""
        job, drift = self._installed_job(manifest)
        if switched_off:
            drift.append(f"{self.label(manifest)} is disabled in {LOGIN_ITEMS}")
            extra = {"running": False, "pid": None, "runs": None, "login_item_disabled": True}
            catch_up = LAUNCHD_INTERVAL_CATCH_UP if launchd_fires_by_interval(job) else None
            detail = f"disabled in {LOGIN_ITEMS}"
            return SchedulerState(True, False, detail, drift=drift, catch_up=catch_up, extra=extra)
        if info is None:
            drift.append(f"{self.label(manifest)} is not loaded in {self.domain()}")
            extra = {"running": False, "pid": None, "runs": None}
            return SchedulerState(False, False, f"not loaded in {self.domain()}", drift=drift, extra=extra)
        loaded_from = info.get("path")
        if loaded_from and os.path.realpath(loaded_from) != os.path.realpath(self.plist_path(manifest)):
            drift.append(f"launchd loaded {self.label(manifest)} from {loaded_from}, not {self.plist_path(manifest)}")
            job = None  # its calendar is in a file that is not ours: not guessed
        next_run, catch_up, schedule = self._calendar(manifest, job)
        job_state = info.get("state", "unknown")
        pid, runs = launchd_count(info.get("pid")), launchd_count(info.get("runs"))
        parts = [f"loaded in {self.domain()}", job_state + (f" (pid {pid})" if pid else "")]
        if runs is not None:
            parts.append(f"{runs} runs")
        if "last exit code" in info:
            parts.append(f"last exit code {info['last exit code']}")
        elif "last terminating signal" in info:
            parts.append(f"last ended by signal: {info['last terminating signal']}")
        if job is not None:
            parts.append(f"fires {schedule}")
        return SchedulerState(
            registered=True,
            active=True,
            detail=", ".join(parts),
            drift=drift,
            next_run_iso=next_run,
            last_result=launchd_exit_code(info.get("last exit code")),
            catch_up=catch_up,
            extra={"running": job_state == "running", "pid": pid, "runs": runs},
        )

    # -- checks
    def requirements(self, manifest: Manifest | None, cfg: ServiceConfig | None = None) -> list[Check]:
        problem = launchd_context_problem(self.system)
        if problem:  # stop before launchctl is touched
            return [Check("gui session", "fail", f"cannot reach your macOS login session: {problem}", LAUNCHD_GUI_HINT)]
        result = self.system.run(["launchctl", "print", self.domain()], timeout=30)
        if not result.ok:
            why = f"the GUI domain {self.domain()} is not available ({result.summary()})"
            return [Check("gui session", "fail", why, LAUNCHD_GUI_HINT)]
        return [Check("gui session", "ok", f"GUI domain {self.domain()} is reachable")]

    def _keychain_check(self) -> Check:
        try:
            backend = _keyring(self.system.platform).get_keyring()
        except LoreServiceError as exc:
            return Check("keychain", "fail", exc.message, exc.hint)
        except Exception as exc:
            return Check("keychain", "fail", f"keyring failed: {exc.__class__.__name__}: {exc}", "reinstall keyring")
        kind = f"{type(backend).__module__}.{type(backend).__name__}"
        if "macos" in kind.lower() or "os_x" in kind.lower():
            return Check("keychain", "ok", f"keyring uses the macOS Keychain ({kind})")
        if "fail" in kind.lower() or "null" in kind.lower():
            return Check("keychain", "fail", f"keyring has no usable backend ({kind})", "unset PYTHON_KEYRING_BACKEND")
        return Check(
            "keychain",
            "warn",
            f"keyring uses {kind}, not the macOS Keychain",
            "unset PYTHON_KEYRING_BACKEND / remove keyringrc.cfg so the login keychain is used",
        )

    def health(self, manifest: Manifest | None) -> list[Check]:
        checks = []
        if manifest is None or manifest.token_source == "keychain":
            checks.append(self._keychain_check())
        if manifest is not None:
            cfg = config_or_defaults(self.paths, manifest.service_id)
            problems = self.privacy_problems(manifest, cfg)
            checks += [Check("privacy", "fail", why, PRIVACY_FIX) for why in problems]
            if not problems:
                checks.append(Check("privacy", "ok", "nothing it uses is in a folder macOS keeps from agents"))
            checks.append(crash_log_check(self.paths.crash_log(manifest.service_id), "launchd's stdout/stderr"))
        return checks

    def privacy_problems(self, manifest: Manifest, cfg: ServiceConfig) -> list[str]:
        """Folders macOS protects (TCC): Terminal may read them, an agent gets
        EPERM with no dialog, so every scheduled run would fail."""
        home = self.system.environ.get("HOME") or os.path.expanduser("~")
        program = [arg for arg in manifest.program[:2] if arg.startswith("/")]  # interpreter and script
        used = [("the project", manifest.project_root)] + [("the program", arg) for arg in program]
        used += [("extra_write_paths", p) for p in cfg.extra_write_paths]
        problems = []
        for what, path in used:
            folder = privacy_protected(path, home)
            if folder:
                problems.append(f"{what} {path} is under {folder}, which macOS keeps from launchd agents")
        return problems


# ----------------------------------------------------------------------------
# 6d. Task Scheduler (Windows)
# ----------------------------------------------------------------------------


SCHTASKS_TASK_PREFIX = "LoreSync-"
TASK_NS = "http://schemas.microsoft.com/windows/2004/02/mit/task"
TASK_PRINCIPAL_ID = "Author"
TASK_PATH_MAX = 260  # the 1.3 schema caps Exec Command and WorkingDirectory
TASK_PRIORITY = 7  # below normal, like Git's maintenance task
SCHED_S_TASK_RUNNING = 267009  # 0x41301
SCHED_S_TASK_HAS_NOT_RUN = 267011  # 0x41303
# `/Query /V /FO CSV` columns; headers are localised, so unknown headers map by position
SCHTASKS_CSV_COLUMNS = (
    "HostName", "TaskName", "Next Run Time", "Status", "Logon Mode", "Last Run Time", "Last Result", "Author",
    "Task To Run", "Start In", "Comment", "Scheduled Task State", "Idle Time", "Power Management", "Run As User",
    "Delete Task If Not Rescheduled", "Stop Task If Runs X Hours and X Mins", "Schedule", "Schedule Type",
    "Start Time", "Start Date", "End Date", "Days", "Months", "Repeat: Every", "Repeat: Until: Time",
    "Repeat: Until: Duration", "Repeat: Stop If Still Running",
)  # fmt: skip
# windowed twins of console executables: no console window flashes on each run
WINDOWED_NAMES = {"python.exe": "pythonw.exe", "python3.exe": "pythonw.exe", "lore-service.exe": "lore-service-w.exe"}


def windows_quote_arg(arg: str) -> str:
    """One argv element quoted for CommandLineToArgvW / the MS C runtime.

    Backslashes are literal except before a quote: 2n+1 backslashes + `"` for a
    literal quote, and trailing backslashes doubled before the closing quote.
    `""` is never emitted inside quotes (CRT versions disagree on it).
    """
    if arg and not any(c in arg for c in ' \t\n\v"'):
        return arg
    out = ['"']
    backslashes = 0
    for ch in arg:
        if ch == "\\":
            backslashes += 1
            continue
        if ch == '"':
            out.append("\\" * (2 * backslashes + 1) + '"')
        else:
            out.append("\\" * backslashes + ch)
        backslashes = 0
    out.append("\\" * (2 * backslashes) + '"')
    return "".join(out)


def windows_join_args(args: Sequence[str]) -> str:
    return " ".join(windows_quote_arg(a) for a in args)


def windowed_program(program: str) -> str:
    """The no-console twin of an executable (python.exe -> pythonw.exe,
    lore-service.exe -> lore-service-w.exe); unchanged when there is none."""
    import ntpath

    base = ntpath.basename(program)
    twin = WINDOWED_NAMES.get(base.lower())
    return program if twin is None else program[: len(program) - len(base)] + twin  # keep the folder as written


def iso_duration(seconds: int) -> str:
    """Seconds as an xs:duration: 1800 -> PT30M, 5400 -> PT1H30M."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "") + (f"{secs}S" if secs else "")
    return "PT" + (text or "0S")


def task_xml_bytes(text: str) -> bytes:
    """schtasks /Create /XML takes UTF-16LE with a BOM (or ANSI); UTF-8 is rejected."""
    return b"\xff\xfe" + text.encode("utf-16-le")


def decode_task_xml(data: bytes | str) -> str:
    """Task XML from a file or a pipe, as text without its encoding declaration.

    Piped `/Query /XML` arrives in UTF-16 or in a code page depending on how it
    is captured, so sniff: a BOM or NUL bytes mean UTF-16LE.
    """
    if isinstance(data, bytes):
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            text = data.decode("utf-16")
        elif data[1:2] == b"\x00":
            text = data.decode("utf-16-le", "replace")
        else:
            text = data.decode("utf-8", "replace")
    else:
        text = data.replace("\x00", "")  # UTF-16 read as a single-byte code page
    text = text.lstrip("\ufeff\xff\xfe \r\n\t")  # BOM as UTF-16 or as a code page ("ÿþ")
    if text.startswith("<?xml"):
        text = text[text.find("?>") + 2 :]
    return text


def parse_schtasks_csv(text: str) -> list[dict[str, str]]:
    """Rows of `schtasks /Query /V /FO CSV` keyed by the English column names.

    The header repeats once per task folder (skipped), and it is localised:
    then columns are mapped by position in the 28-column layout.
    """
    import csv
    import io

    rows = [r for r in csv.reader(io.StringIO(text.lstrip("\ufeff"))) if any(c.strip() for c in r)]
    if not rows:
        return []
    header = rows[0]
    keys = header if "Last Result" in header or "TaskName" in header else list(SCHTASKS_CSV_COLUMNS)
    return [dict(zip(keys, row, strict=False)) for row in rows[1:] if row != header]


def parse_all_task_xml(text: str) -> dict[str, Any] | None:
    """`schtasks /Query /XML ONE`: every task's XML in one `<Tasks>` root, each
    after a comment with its path (`<!-- \\LoreSync-x -->`), as task name in
    the root folder -> Element; tasks in other folders are left out. None when
    the text is not that document."""
    import xml.etree.ElementTree as ET

    body = decode_task_xml(text)
    while "<?xml" in body:  # (without ONE, schtasks repeats the declaration per task)
        head, _, rest = body.partition("<?xml")
        body = head + rest[rest.find("?>") + 2 :]
    try:
        root = ET.fromstring(body, ET.XMLParser(target=ET.TreeBuilder(insert_comments=True)))
    except ET.ParseError:
        return None
    tasks: dict[str, Any] = {}
    named = ""
    for child in [root] if root.tag == f"{{{TASK_NS}}}Task" else list(root):
        if child.tag is ET.Comment:
            named = (child.text or "").strip()
        elif child.tag == f"{{{TASK_NS}}}Task":
            uri = child.find(f"{{{TASK_NS}}}RegistrationInfo/{{{TASK_NS}}}URI")
            path = named or (uri.text or "" if uri is not None else "")
            folder, _, name = path.strip().rpartition("\\")
            if name and not folder:
                tasks[name] = child
            named = ""
    return tasks


def parse_schtasks_time(text: str | None) -> str | None:
    """A schtasks date (local time) as UTC ISO, when its format is unambiguous.

    Dates are localised; en-US (with AM/PM), ISO-like and dotted day.month.year
    are read, anything else is None. 1999-11-30 is the never-run sentinel.
    """
    raw = (text or "").strip()
    slash = _slash_date_order(raw)
    if slash is None:
        return None  # ambiguous: refused rather than guessed
    for fmt in (slash, "%Y-%m-%d %H:%M:%S", "%d.%m.%Y %H:%M:%S"):
        try:
            parsed = time.strptime(raw, fmt)
        except ValueError:
            continue
        if (parsed.tm_year, parsed.tm_mon, parsed.tm_mday) == (1999, 11, 30):
            return None
        return iso_from_ms(int(time.mktime(parsed)) * 1000)
    return None


def _slash_date_order(raw: str) -> str | None:
    """The strptime format of an `a/b/yyyy h:mm:ss AM` date: month first as
    en-US writes it (never zero-padded), day first when the day shows (over
    12) or the month is zero-padded after an unpadded day (en-AU's 3/04/2026);
    None when nothing tells (both padded and at most 12)."""
    first, _, rest = raw.partition("/")
    second = rest.partition("/")[0]
    if not (first.isdigit() and second.isdigit()):
        return "%m/%d/%Y %I:%M:%S %p"  # not a slash date: the format simply will not match
    a, b = int(first), int(second)
    day_first = "%d/%m/%Y %I:%M:%S %p"
    if a > 12 or (len(first) == 1 and len(second) == 2 and second.startswith("0")):
        return day_first
    if b > 12 or a == b or (len(first) == 1 and len(second) == 1):
        return "%m/%d/%Y %I:%M:%S %p"
    return None


def iso_duration_seconds(text: str | None) -> int | None:
    """An xs:duration as Task Scheduler stores it (PT30M, PT24H, P1D, P1DT2H) in seconds; None if not one."""
    raw = (text or "").strip().upper()
    if not raw.startswith("P"):
        return None
    total, number, parts = 0, "", 0
    units = {"D": 86400, "H": 3600, "M": 60, "S": 1}
    in_time = False
    for ch in raw[1:]:
        if ch == "T":
            in_time = True
        elif ch.isdigit():
            number += ch
        elif ch in units and number and (in_time or ch == "D"):
            total, number, parts = total + int(number) * units[ch], "", parts + 1
        else:
            return None
    return None if number or not parts else total


def _int_or_none(text: str | None) -> int | None:
    try:
        return int((text or "").strip())
    except ValueError:
        return None


@register_backend
class SchtasksBackend(SchedulerBackend):
    """A Task Scheduler task run with the user's interactive token: no stored
    password, runs while the user is logged on, catches up after sleep."""

    name = "schtasks"
    time_limit = True  # ExecutionTimeLimit
    token_stores = OS_TOKEN_STORES["win32"]
    # a task has no environment block: an embedded token would sit in an argv every process can read
    embed_refusal = (
        "--token-source embedded is not offered with schtasks: the token would be visible in the process list "
        "while a run lasts"
    )

    @classmethod
    def availability(cls, system: System) -> Check:
        return cls.os_tool_availability(system, "win32", "schtasks", "%SystemRoot%\\System32", "Windows Task Scheduler")

    # -- names
    def task_name(self, manifest: Manifest) -> str:
        return SCHTASKS_TASK_PREFIX + manifest.service_id

    def xml_path(self, manifest: Manifest) -> str:
        # kept after /Create: it is what status compares the registered task to
        return os.path.join(self.paths.config_dir(manifest.service_id), "task.xml")

    def file_paths(self, manifest: Manifest) -> list[str]:
        return [self.xml_path(manifest)]

    def exec_parts(self, manifest: Manifest) -> tuple[str, str]:
        """(Command, Arguments) of the task's Exec action."""
        return windowed_program(manifest.program[0]), windows_join_args(manifest.program[1:])

    # -- the task XML
    def task_xml(self, manifest: Manifest, cfg: ServiceConfig) -> str:
        import xml.etree.ElementTree as ET

        def sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
            el = ET.SubElement(parent, tag, attrib)
            el.text = text
            return el

        created = manifest.created_at_iso
        start = created[:19] + "Z" if len(created) >= 19 and created[10:11] == "T" else "2024-01-01T00:00:00Z"
        command, arguments = self.exec_parts(manifest)
        # xmlns as a plain attribute: unqualified tags serialize without prefixes
        root = ET.Element("Task", {"version": "1.3", "xmlns": TASK_NS})
        # Microsoft's own order (RegistrationInfo, Triggers, Principals, Settings, Actions)
        reg = sub(root, "RegistrationInfo")
        sub(reg, "Author", TOOL_NAME)
        sub(reg, "Description", f"lore sync for {manifest.project_root} (lore-service {manifest.service_id})")
        sub(reg, "URI", "\\" + self.task_name(manifest))
        trigger = sub(sub(root, "Triggers"), "TimeTrigger")
        sub(trigger, "Enabled", "true")  # schema order: Enabled before StartBoundary (Windows writes it after)
        sub(trigger, "StartBoundary", start)  # UTC: a local boundary could lie hours in the future
        repetition = sub(trigger, "Repetition")
        sub(repetition, "Interval", iso_duration(manifest.schedule_step_seconds))
        sub(repetition, "StopAtDurationEnd", "false")
        principal = sub(sub(root, "Principals"), "Principal", id=TASK_PRINCIPAL_ID)
        sub(principal, "LogonType", "InteractiveToken")  # runs while logged on; no stored password
        sub(principal, "RunLevel", "LeastPrivilege")
        settings = sub(root, "Settings")
        for tag, value in (
            ("MultipleInstancesPolicy", "IgnoreNew"),
            ("DisallowStartIfOnBatteries", "false"),
            ("StopIfGoingOnBatteries", "false"),
            ("AllowHardTerminate", "true"),
            ("StartWhenAvailable", "true"),  # catch up a run missed during sleep
            ("RunOnlyIfNetworkAvailable", "false"),  # the run's own backoff handles offline
            ("AllowStartOnDemand", "true"),
            ("Enabled", "true"),
            ("Hidden", "true"),
            ("RunOnlyIfIdle", "false"),
            ("WakeToRun", "false"),
            ("ExecutionTimeLimit", iso_duration(scheduler_timeout(cfg))),
            ("Priority", str(TASK_PRIORITY)),
        ):
            sub(settings, tag, value)
        action = sub(sub(root, "Actions", Context=TASK_PRINCIPAL_ID), "Exec")
        sub(action, "Command", f'"{command}"')  # quoted, as git's task is: a path may hold spaces
        if arguments:
            sub(action, "Arguments", arguments)
        if len(manifest.project_root) <= TASK_PATH_MAX:  # the run sets the stages' cwd itself anyway
            sub(action, "WorkingDirectory", manifest.project_root)
        ET.indent(root, "  ")
        body = ET.tostring(root, encoding="unicode")
        return '<?xml version="1.0" encoding="UTF-16"?>\n' + body + "\n"

    def _too_long(self, manifest: Manifest) -> Check | None:
        command = self.exec_parts(manifest)[0]
        if len(command) <= TASK_PATH_MAX:
            return None
        return Check(
            "task command",
            "fail",
            f"the task's program path is {len(command)} characters; Task Scheduler allows {TASK_PATH_MAX}",
            "install lore-service (its Python) in a shorter folder, e.g. C:\\lore-service, and install again",
        )

    def plan(self, manifest: Manifest, cfg: ServiceConfig, embedded_token: str | None) -> Plan:
        self.refuse_unsafe_values(manifest, cfg)
        command, arguments = self.exec_parts(manifest)
        warnings: list[str] = []
        if command == manifest.program[0]:
            warnings.append(f"{command} has no windowed (no-console) twin: a console window may flash on each run")
        if any("%" in part for part in (command, arguments, manifest.project_root)):
            warnings.append("a path contains '%': Task Scheduler expands %NAME% in the task's command line")
        path = self.xml_path(manifest)
        return Plan(
            files=[PlannedFile(path, self.task_xml(manifest, cfg), 0o600)],
            commands=[["schtasks", "/Create", "/TN", self.task_name(manifest), "/XML", path, "/F"]],
            warnings=warnings,
        )

    # -- schtasks
    def _access_denied(self, result: CommandResult) -> bool:
        """By HRESULT, or by Windows's own localised wording: never by English text alone."""
        text = f"{result.stdout}\n{result.stderr}".lower()
        wording = self.system.access_denied_text().lower().rstrip(".")
        return "0x80070005" in text or (bool(wording) and wording in text)

    def _schtasks_error(self, result: CommandResult) -> SchedulerError:
        message = f"`{' '.join(result.argv)}` failed ({result.returncode}): {result.summary()}"
        if self._access_denied(result):
            return SchedulerError(
                message,
                "Task Scheduler refused: run the command as the same user from a normal (non-elevated) prompt; "
                "if the task was first created by an administrator, delete it from an elevated prompt "
                "(`schtasks /Delete /TN <name> /F`) and install again",
                code="schtasks_access_denied",
            )
        return SchedulerError(message, f"run `{TOOL_NAME} doctor` for the Task Scheduler checks", code="schtasks")

    def entry_changed(self, manifest: Manifest, plan: Plan) -> bool:
        # the file on disk is UTF-16 (task_xml_bytes): compare what it encodes; then
        # the task itself, which may have been deleted, disabled or edited in the app
        planned = plan.files[0]
        if _read_bytes(planned.path) != task_xml_bytes(planned.content):
            return True
        registered = self._registered_xml(manifest)
        return registered is None or bool(self._registered_drift(manifest, registered))

    def install(self, manifest: Manifest, cfg: ServiceConfig, embedded_token: str | None) -> Plan:
        plan = self.plan(manifest, cfg, embedded_token)
        too_long = self._too_long(manifest)
        if too_long:
            raise SchedulerError(too_long.message, too_long.hint, code="command_too_long")
        # unchanged: register again only a task that went missing or was changed in the app
        if not self.entry_changed(manifest, plan):
            return Plan(files=plan.files, commands=[], warnings=plan.warnings)
        planned = plan.files[0]
        with RestoreOnFailure([planned.path]):
            atomic_write(planned.path, task_xml_bytes(planned.content), planned.mode)
            for argv in plan.commands:
                result = self.system.run(argv, timeout=60, console=True)
                if not result.ok:
                    raise self._schtasks_error(result)
        return plan

    def uninstall(self, manifest: Manifest) -> None:
        name = self.task_name(manifest)
        result = self.system.run(["schtasks", "/Delete", "/TN", name, "/F"], timeout=60, console=True)
        # messages are localised: a failed delete is fine only if the task is really gone
        if not result.ok and self.system.run(["schtasks", "/Query", "/TN", name], timeout=60, console=True).ok:
            raise self._schtasks_error(result)
        remove_file(self.xml_path(manifest))

    def _registered_xml(self, manifest: Manifest) -> Any:
        """The task as Task Scheduler stores it (an Element), or None."""
        import xml.etree.ElementTree as ET

        argv = ["schtasks", "/Query", "/TN", self.task_name(manifest), "/XML"]
        result = self.system.ask(argv, timeout=60, console=True)
        if not result.ok:
            return None
        try:
            return ET.fromstring(decode_task_xml(result.stdout))
        except ET.ParseError:
            return None

    @staticmethod
    def _xml_text(root: Any, path: str) -> str | None:
        """Text of a descendant of <Task>, e.g. "Actions/Exec/Command"; None if absent."""
        el = root.find("/".join(f"{{{TASK_NS}}}{part}" for part in path.split("/")))
        return None if el is None else (el.text or "")

    def _enabled(self, registered: Any) -> bool:
        return (self._xml_text(registered, "Settings/Enabled") or "true").strip() != "false"

    def _registered_drift(self, manifest: Manifest, registered: Any) -> list[str]:
        """How the task Task Scheduler holds differs from ours (edited or
        disabled in the Task Scheduler app): `install` registers it again."""
        drift = []
        command, arguments = self.exec_parts(manifest)
        got_command = (self._xml_text(registered, "Actions/Exec/Command") or "").strip('"')  # quoted or not
        got_arguments = self._xml_text(registered, "Actions/Exec/Arguments") or ""
        if (got_command, got_arguments) != (command, arguments):
            drift.append(f"the registered task runs {got_command} {got_arguments}, not {command} {arguments}")
        interval = self._xml_text(registered, "Triggers/TimeTrigger/Repetition/Interval")
        want = iso_duration(manifest.schedule_step_seconds)
        if iso_duration_seconds(interval) != manifest.schedule_step_seconds:  # PT24H may come back as P1D
            drift.append(f"the registered task repeats every {interval}, not every {want}")
        if not self._enabled(registered):
            drift.append(f"task {self.task_name(manifest)} is disabled")
        return drift

    def _file_drift(self, manifest: Manifest) -> list[str]:
        path = self.xml_path(manifest)
        raw = _read_bytes(path)
        if raw is None:
            return [f"{path} is missing"]
        cfg = config_or_defaults(self.paths, manifest.service_id)  # the XML is rendered from it
        if decode_task_xml(raw) != decode_task_xml(self.task_xml(manifest, cfg)):
            return [f"{path} was edited (it differs from what install writes)"]
        return []

    def state(self, manifest: Manifest) -> SchedulerState:
        name = self.task_name(manifest)
        result = self.system.ask(["schtasks", "/Query", "/TN", name, "/V", "/FO", "CSV"], timeout=60, console=True)
        if not result.ok:
            if self._access_denied(result):
                raise self._schtasks_error(result)
            return self._unregistered_view(manifest, result.summary())
        rows = parse_schtasks_csv(result.stdout)
        row = next((r for r in rows if r.get("TaskName", "").rsplit("\\", 1)[-1] == name), rows[0] if rows else {})
        return self._view(manifest, row, self._registered_xml(manifest))

    def states(self, manifests: Sequence[Manifest]) -> dict[str, SchedulerState | LoreServiceError]:
        """Two questions for any number of tasks: the verbose CSV of every task
        and the XML of every task (`/XML ONE`). Should Task Scheduler refuse the
        whole list, or its XML not parse, each task is asked on its own (for
        its XML only, in the second case), as `status` of one does."""
        result = self.system.run(["schtasks", "/Query", "/V", "/FO", "CSV"], timeout=120, console=True)
        if not result.ok:
            return super().states(manifests)
        # ours live in the root folder: "\\LoreSync-<id>" (a header row repeats per folder)
        rows = {r.get("TaskName", ""): r for r in parse_schtasks_csv(result.stdout)}
        registered = self._all_registered_xml()

        def view(manifest: Manifest) -> SchedulerState:
            name = self.task_name(manifest)
            row = rows.get("\\" + name)
            if row is None:
                return self._unregistered_view(manifest, "Task Scheduler lists no such task")
            stored = registered.get(name) if registered is not None else self._registered_xml(manifest)
            return self._view(manifest, row, stored)

        return self.each_service(manifests, view)

    def _all_registered_xml(self) -> dict[str, Any] | None:
        """Every task Task Scheduler stores (task name in the root folder ->
        Element); None when `/XML ONE` does not answer with what it should."""
        result = self.system.run(["schtasks", "/Query", "/XML", "ONE"], timeout=120, console=True)
        return parse_all_task_xml(result.stdout) if result.ok else None

    def _unregistered_view(self, manifest: Manifest, why: str) -> SchedulerState:
        name = self.task_name(manifest)
        drift = [*self._file_drift(manifest), f"task {name} is not registered"]
        detail = f"task {name} is not registered ({why})"
        return SchedulerState(False, False, detail, drift=drift, extra={"running": False})

    def _view(self, manifest: Manifest, row: dict[str, str], registered: Any) -> SchedulerState:
        """The task as its `/Query /V` row and its stored XML (None: unreadable) say."""
        name = self.task_name(manifest)
        drift = self._file_drift(manifest)
        code = _int_or_none(row.get("Last Result"))
        running, never = code == SCHED_S_TASK_RUNNING, code == SCHED_S_TASK_HAS_NOT_RUN
        if registered is not None:
            drift += self._registered_drift(manifest, registered)
        status_text = row.get("Status", "")
        if running:
            detail = f"task {name} is running"
        elif never:
            detail = f"task {name} is registered ({status_text}) and has not run yet"
        else:
            detail = f"task {name} is registered ({status_text}), last result {code}"
        next_text = row.get("Next Run Time", "")
        if next_text and next_text != "N/A" and not parse_schtasks_time(next_text):
            detail += f", next run {next_text}"
        return SchedulerState(
            registered=True,
            active=registered is None or self._enabled(registered),
            detail=detail,
            drift=drift,
            next_run_iso=parse_schtasks_time(next_text),
            last_trigger_iso=parse_schtasks_time(row.get("Last Run Time")),
            last_result=None if never or running else code,
            extra={"running": running},
        )

    # -- checks
    def requirements(self, manifest: Manifest | None, cfg: ServiceConfig | None = None) -> list[Check]:
        if manifest is None:
            return []
        too_long = self._too_long(manifest)
        command = self.exec_parts(manifest)[0]
        if command == manifest.program[0]:
            windowed = Check(
                "windowed program",
                "warn",
                f"{command} opens a console window on each run",
                "use a Python that has pythonw.exe, or the lore-service-w.exe build",
            )
        elif not os.path.exists(command):
            windowed = Check(
                "windowed program",
                "fail",
                f"{command} (the no-console twin of {manifest.program[0]}) does not exist",
                "reinstall Python / lore-service so that it is present",
            )
        else:
            windowed = Check("windowed program", "ok", f"the task runs {command} (no console window)")
        return [too_long, windowed] if too_long else [windowed]

    def health(self, manifest: Manifest | None) -> list[Check]:
        if manifest is None:
            return []
        registered = self._registered_xml(manifest)
        if registered is None:
            why = f"task {self.task_name(manifest)} is not registered"
            return [Check("task", "fail", why, f"`{TOOL_NAME} install`")]
        logon = self._xml_text(registered, "Principals/Principal/LogonType") or "InteractiveToken"
        task = (
            Check("task", "ok", f"task {self.task_name(manifest)} is registered ({logon})")
            if logon == "InteractiveToken"
            else Check(
                "task",
                "warn",
                f"the task uses LogonType {logon} (it needs a stored password)",
                f"`{TOOL_NAME} install` re-registers it with your interactive token",
            )
        )
        battery = [
            tag
            for tag in ("DisallowStartIfOnBatteries", "StopIfGoingOnBatteries")
            if (self._xml_text(registered, f"Settings/{tag}") or "").strip() == "true"
        ]
        power = (
            Check(
                "battery",
                "warn",
                f"the task does not run on battery ({', '.join(battery)})",
                f"`{TOOL_NAME} install` resets these to false",
            )
            if battery
            else Check("battery", "ok", "the task runs on battery power too")
        )
        return [task, power]


# ----------------------------------------------------------------------------
# 6e. Kubernetes: a CronJob instead of a scheduler entry (`export`)
# ----------------------------------------------------------------------------
# Past one machine, the scheduler is a cluster's: `export --format kubernetes`
# prints a CronJob that runs `lore-service run` (backend none semantics) with
# its home on a PersistentVolumeClaim, so lock, backoff, breaker and history
# persist between jobs, and the token comes from a Secret. An init container
# runs `install --backend none --token-source environment` each time: it
# creates the service on an empty volume and changes nothing afterwards.
# Retries stay lore-service's (backoffLimit 0, concurrencyPolicy Forbid).

K8S_RUN_AS = 65532  # a non-root uid and gid, as distroless images use
K8S_NAME_MAX = 52  # a CronJob's name leaves room for the Job and Pod suffixes
K8S_RESOURCES = {"cpu-request": "100m", "cpu-limit": "1", "memory-request": "256Mi", "memory-limit": "1Gi"}
K8S_QUANTITY_SUFFIXES = ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "m", "k", "M", "G", "T", "P", "E")


@record
class KubernetesExport:
    """What `export --format kubernetes` was asked for, every default resolved."""

    service_id: str
    project_root: str  # on this machine (an annotation only: the pod's project is the volume)
    interval_seconds: int
    profile: str
    token_env: str
    image: str
    namespace: str | None = None
    storage_class: str | None = None
    storage_size: str = "5Gi"
    secret_name: str | None = None
    mount_path: str = "/data"
    program: str = TOOL_NAME
    lore: str = "/usr/local/bin/lore"
    resources: dict[str, str] = field(default_factory=lambda: dict(K8S_RESOURCES))
    status_job: bool = False

    def home(self) -> str:
        return posix_join(self.mount_path, ".lore-service")

    def secret(self) -> str:
        return self.secret_name or k8s_name(self.service_id, "-token", 253)


def posix_join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name  # a pod's paths, whatever OS exports them


def k8s_name(sid: str, suffix: str = "", limit: int = K8S_NAME_MAX) -> str:
    """`lore-<sid><suffix>` as a DNS label, shortened with a hash of the id when too long."""
    import hashlib

    name = f"lore-{sid}".rstrip("-") + suffix
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(sid.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 6
    return f"lore-{sid[:keep].rstrip('-')}-{digest}{suffix}"


def check_quantity(text: str, what: str, suffixes: Sequence[str] = K8S_QUANTITY_SUFFIXES) -> str:
    """A Kubernetes quantity (100m, 1, 256Mi, 5Gi): refused here rather than by the cluster."""
    number = next((text[: -len(s)] for s in suffixes if text.endswith(s) and len(text) > len(s)), text)
    whole, _, frac = number.partition(".")
    if not (whole.isascii() and whole.isdigit() and (not frac or (frac.isascii() and frac.isdigit()))):
        raise UsageError(
            f"{what} {quoted(text)} is not a Kubernetes quantity",
            "e.g. 100m or 1 for CPU, 256Mi or 1Gi for memory and storage",
            code="bad_quantity",
        )
    return text


def check_dns_label(text: str, what: str) -> str:
    ok = 0 < len(text) <= 63 and text.isascii() and text[0].isalnum() and text[-1].isalnum()
    if not ok or not all(c.islower() or c.isdigit() or c == "-" for c in text):
        raise UsageError(
            f"{what} {quoted(text)} is not a valid Kubernetes name",
            "use 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit",
            code="bad_name",
        )
    return text


def kubernetes_objects(spec: KubernetesExport) -> list[dict[str, Any]]:
    """The PersistentVolumeClaim and CronJob (and the one-off status Job when asked for)."""
    sid = spec.service_id
    labels = {
        "app.kubernetes.io/name": TOOL_NAME,
        "app.kubernetes.io/instance": sid,
        "app.kubernetes.io/component": "sync",
        "app.kubernetes.io/managed-by": TOOL_NAME,
    }
    meta: dict[str, Any] = {"labels": labels, "annotations": {"lore-service/project": spec.project_root}}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": spec.storage_size}},
    }
    if spec.storage_class:
        claim["storageClassName"] = spec.storage_class
    volume = {"name": k8s_name(sid, "-data", 253), **meta}
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": volume, "spec": claim},
        _cron_job(spec, meta),
    ]
    if spec.status_job:  # `status` of the service, as a Job: a CronJob's pods are gone between runs
        pod = _pod(spec, [("status", [spec.program, "status", "--service-id", sid])], init=[])
        template = {"metadata": {"labels": labels}, "spec": pod}
        job_spec = {"backoffLimit": 0, "ttlSecondsAfterFinished": 3600, "template": template}
        status = {"name": k8s_name(sid, "-status"), **meta}
        objects.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": status, "spec": job_spec})
    return objects


def _cron_job(spec: KubernetesExport, meta: dict[str, Any]) -> dict[str, Any]:
    step = cron_step(spec.interval_seconds)
    install = [
        spec.program, "install", "--backend", "none", "--name", spec.service_id, "--project", spec.mount_path,
        "--interval", format_interval(spec.interval_seconds), "--profile", spec.profile,
        "--token-source", "environment", "--token-env", spec.token_env, "--lore", spec.lore,
    ]  # fmt: skip
    run = [spec.program, "run", "--service-id", spec.service_id]
    pod = _pod(spec, [("sync", run)], init=[("install", install)])
    job = {
        "backoffLimit": 0,  # lore-service's own backoff and breaker decide about retries
        # the run's own budget ends first, so it records its own timeout
        "activeDeadlineSeconds": DEFAULT_RUN_BUDGET + 60,
        "template": {"metadata": {"labels": meta["labels"]}, "spec": pod},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": k8s_name(spec.service_id), **meta},
        "spec": {
            "schedule": cron_expression(spec.service_id, step),  # as the cron backend would fire it
            "timeZone": "Etc/UTC",
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": max(60, min(600, step // 2)),
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"metadata": {"labels": meta["labels"]}, "spec": job},
        },
    }


def _pod(
    spec: KubernetesExport, main: list[tuple[str, list[str]]], init: list[tuple[str, list[str]]]
) -> dict[str, Any]:
    """A pod that passes the Pod Security "restricted" profile: non-root, no
    privilege escalation, no capabilities, the runtime's seccomp profile, and a
    read-only root with only the data volume and /tmp writable."""
    env = [
        {"name": "LORE_SERVICE_HOME", "value": spec.home()},
        {"name": "HOME", "value": posix_join(spec.mount_path, ".home")},  # lore's own files, on the volume
        {"name": "LORE_SERVICE_LOG_STDOUT", "value": "1"},  # `kubectl logs` shows the run
        {"name": spec.token_env, "valueFrom": {"secretKeyRef": {"name": spec.secret(), "key": spec.token_env}}},
    ]
    r = spec.resources
    resources = {
        "requests": {"cpu": r["cpu-request"], "memory": r["memory-request"]},
        "limits": {"cpu": r["cpu-limit"], "memory": r["memory-limit"]},
    }
    security = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }

    def container(name: str, argv: list[str]) -> dict[str, Any]:
        return {
            "name": name,
            "image": spec.image,
            "command": argv,
            "workingDir": spec.mount_path,
            "env": env,
            "resources": resources,
            "securityContext": security,
            "volumeMounts": [{"name": "data", "mountPath": spec.mount_path}, {"name": "tmp", "mountPath": "/tmp"}],
        }

    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": K8S_RUN_AS,
            "runAsGroup": K8S_RUN_AS,
            "fsGroup": K8S_RUN_AS,
            # only an empty volume is chowned: lore-service's own folders stay 0700 (section 3.2 of the spec)
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container(name, argv) for name, argv in main],
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": k8s_name(spec.service_id, "-data", 253)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if init:
        pod["initContainers"] = [container(name, argv) for name, argv in init]
    return pod


def kubernetes_document(spec: KubernetesExport, objects: list[dict[str, Any]]) -> str:
    """What `kubectl apply -f -` takes: comment lines, then one List as JSON
    (valid YAML too, so no YAML library is needed on either side)."""
    ns = f" -n {spec.namespace}" if spec.namespace else ""
    lines = [
        f"# lore-service {__version__}: sync of {spec.project_root} ({spec.service_id}) as a Kubernetes CronJob,",
        f"# every {format_interval(spec.interval_seconds)}, image {spec.image}. First the token's Secret, then apply:",
        f"#   {kubernetes_secret_command(spec)}",
        f"#   kubectl apply{ns} -f <this file>",
        f"# watch: kubectl get cronjob{ns} {k8s_name(spec.service_id)}; kubectl logs{ns} job/<job name>",
    ]
    document = {"apiVersion": "v1", "kind": "List", "items": objects}
    return "\n".join(lines) + "\n" + json.dumps(document, indent=2) + "\n"


def kubernetes_secret_command(spec: KubernetesExport) -> str:
    ns = f" -n {spec.namespace}" if spec.namespace else ""
    return f'kubectl create secret generic {spec.secret()}{ns} --from-literal={spec.token_env}="${spec.token_env}"'


def kubernetes_checks(text: str, source: str) -> list[Check]:
    """doctor --kubernetes FILE: an exported manifest checked without a cluster."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    try:
        document = json.loads(body)
        jobs = [o for o in document.get("items", [document]) if o.get("kind") == "CronJob"]
        pod = jobs[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        run = next(c for c in pod["containers"] if "run" in c.get("command", []))
    except (ValueError, KeyError, IndexError, StopIteration, AttributeError, TypeError):
        why = f"{source} is not a CronJob exported by `{TOOL_NAME} export --format kubernetes` (JSON or its List)"
        return [Check("manifest", "fail", why, f"`{TOOL_NAME} export --format kubernetes --image IMAGE > FILE`")]
    checks = [Check("manifest", "ok", f"{source}: CronJob {jobs[0].get('metadata', {}).get('name')}")]
    image = str(run.get("image") or "")
    checks.append(
        Check("image", "ok", f"image {image}")
        if image and image.upper() != "IMAGE"
        else Check("image", "fail", "no container image is named", "export again with --image REGISTRY/IMAGE:TAG")
    )
    checks.append(_token_reference_check(pod))
    checks.append(_schedule_check(jobs[0], pod))
    checks.append(_home_mount_check(run))
    return checks


def _token_reference_check(pod: dict[str, Any]) -> Check:
    env = [e for c in pod.get("initContainers", []) + pod["containers"] for e in c.get("env", [])]
    inline = [e["name"] for e in env if "TOKEN" in str(e.get("name", "")).upper() and "value" in e]
    secret = [e for e in env if (e.get("valueFrom") or {}).get("secretKeyRef")]
    if inline:
        why = f"{inline[0]} is written into the manifest"
        return Check("token", "fail", why, "take it from a Secret (secretKeyRef)")
    if not secret:
        return Check("token", "fail", "no Secret is referenced for the token", "export again: it adds a secretKeyRef")
    ref = secret[0]["valueFrom"]["secretKeyRef"]
    return Check("token", "ok", f"{secret[0]['name']} comes from Secret {ref.get('name')} (key {ref.get('key')})")


def _schedule_check(job: dict[str, Any], pod: dict[str, Any]) -> Check:
    commands: list[list[str]] = [c.get("command", []) for c in pod.get("initContainers", [])]
    install = next((argv for argv in commands if "install" in argv), [])
    try:
        sid = install[install.index("--name") + 1]
        interval = parse_interval(install[install.index("--interval") + 1])
    except (ValueError, IndexError, UsageError):
        return Check("schedule", "fail", "the install step names no service or interval", "export again")
    want, got = cron_expression(sid, cron_step(interval)), job["spec"].get("schedule")
    if got != want:
        why = f"schedule {got!r} does not fire every {format_interval(interval)} as {want!r} does"
        return Check("schedule", "fail", why, "export again after changing --interval")
    return Check("schedule", "ok", f"`{got}` ({cron_describe(got)}, UTC) for every {format_interval(interval)}")


def _home_mount_check(run: dict[str, Any]) -> Check:
    home = next((e.get("value") for e in run.get("env", []) if e.get("name") == "LORE_SERVICE_HOME"), None)
    mounts = [m.get("mountPath", "") for m in run.get("volumeMounts", [])]
    inside = [m for m in mounts if home and (home == m or home.startswith(m.rstrip("/") + "/")) and m != "/tmp"]
    if not inside:
        why = f"LORE_SERVICE_HOME ({home}) is on no mounted volume: status and the breaker would be lost after each job"
        return Check("home volume", "fail", why, "export again: the home goes on the data volume")
    return Check("home volume", "ok", f"LORE_SERVICE_HOME {home} is on the volume mounted at {inside[0]}")


# ============================================================================
# 7. Doctor: checks with ok / warn / fail and the step that fixes each
# ============================================================================


# Folders whose content goes away by itself: temporary folders, PyInstaller's
# one-file extraction folder (_MEIxxxx), test and build sandboxes, the browser's
# download folder. Matched case-insensitively, with "/" for any separator.
DISPOSABLE_MARKERS = (
    "/tmp/",
    "/var/tmp/",
    "/dev/shm/",
    "/var/folders/",  # macOS per-user $TMPDIR
    "/appdata/local/temp/",  # Windows %TEMP%
    "/windows/temp/",
    "/_mei",
    "/.tox/",
    "/.nox/",
    "/pip-build-env",
    "/pip-req-build",
    "/.cache/pre-commit/",
    "/downloads/",
)


# A folder holding one of these is a project checkout; a virtualenv directly
# inside one is the project's development venv.
CHECKOUT_MARKERS = (".git", ".hg", "pyproject.toml", "setup.py", "setup.cfg", "tox.ini")


def _mode_check(name: str, path: str, want: int, uid: int | None) -> Check:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Check(name, "fail", f"{path} is missing", f"re-run `{TOOL_NAME} install`")
    if uid is not None and st.st_mode & 0o077:  # (no uid: Windows, where modes mean nothing)
        return Check(
            name, "warn", f"{path} is readable by others (mode {st.st_mode & 0o777:o})", f"chmod {want:o} '{path}'"
        )
    if uid is not None and st.st_uid != uid:
        return Check(name, "warn", f"{path} belongs to uid {st.st_uid}, not you", f"chown $(id -u) '{path}'")
    return Check(name, "ok", f"{path} is private")


def _disposable(path: str) -> str | None:
    """Why the scheduler may lose this path, or None."""
    import tempfile

    flat = path.replace("\\", "/").lower()
    marker = next((m for m in DISPOSABLE_MARKERS if m in flat), None)
    if marker:
        return f"is in a temporary, sandbox or download folder ({marker.strip('/')}) that is emptied without asking"
    tmp = os.path.realpath(tempfile.gettempdir())
    if os.path.realpath(path).startswith(tmp + os.sep) and tmp != os.sep:
        return f"is in the temporary folder {tmp}"
    return None


def _venv_problem(interpreter: str) -> Check | None:
    """The interpreter of a source install: is its virtualenv one that gets deleted?

    A venv is judged by where it sits, not by being a venv: one directly inside
    a project checkout (its parent holds .git, .hg, pyproject.toml, setup.py,
    setup.cfg or tox.ini) is that project's development venv, which `rm -rf
    .venv`, `git clean -fdx`, a re-clone or a tool recreating it remove; a venv
    elsewhere (pipx's, or one made on purpose under ~/.local or /opt) is taken
    as kept. A venv whose base interpreter (pyvenv.cfg `home`) is gone fails."""
    root = os.path.dirname(os.path.dirname(interpreter))  # <venv>/bin/python, <venv>\Scripts\python.exe
    cfg = read_text(os.path.join(root, "pyvenv.cfg"))
    if cfg is None:
        return None
    for line in cfg.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "home" and value.strip() and not os.path.isdir(value.strip()):
            return Check(
                "program",
                "fail",
                f"{interpreter} belongs to the virtualenv {root}, whose base Python {value.strip()} is gone",
                f"recreate the virtualenv (or install lore-service elsewhere), then re-run `{TOOL_NAME} install`",
            )
    checkout = os.path.dirname(root)
    found = [m for m in CHECKOUT_MARKERS if os.path.exists(os.path.join(checkout, m))]
    if not found:
        return None
    return Check(
        "program",
        "warn",
        f"the scheduler runs {interpreter}, from the virtualenv {root} inside the project checkout {checkout} "
        f"(it holds {found[0]}): removing that venv (`rm -rf`, `git clean -fdx`) or moving the checkout stops the sync",
        f"install lore-service where it stays (the standalone binary, or `pipx install`) and re-run "
        f"`{TOOL_NAME} install` with it; or keep {root} in place",
    )


def missing_program_paths(program: Sequence[str]) -> list[str]:
    """The files of the scheduled argv that are gone: the executable, and the
    script or .pyz a Python runs (the argv's other words are not paths)."""
    return [p for p in program[:2] if os.path.isabs(p) and not os.path.exists(p)]


def program_checks(program: Sequence[str]) -> list[Check]:
    """Is the argv the scheduler runs still there, and not in a folder that vanishes?

    program is [frozen-exe, ...], [python, script.py | app.pyz, ...]. Frozen
    builds and .pyz files are pinned by install (section 9f); from source the
    interpreter's virtualenv is judged as well (_venv_problem)."""
    bundle = running_bundle()
    if bundle.kind != "source" and list(program) == bundle_command(bundle):  # readiness: this very build
        return [Check("program", "ok", f"install copies {bundle.executable} to lore-service's data folder, bin/")]
    checks: list[Check] = []
    gone = missing_program_paths(program)
    for path in [p for p in program[:2] if os.path.isabs(p)]:
        reason = None if path in gone else _disposable(path)
        if path in gone:
            checks.append(Check("program", "fail", f"{path} no longer exists", f"re-run `{TOOL_NAME} install`"))
        elif reason:
            checks.append(
                Check(
                    "program",
                    "warn",
                    f"{path} {reason}; the scheduler would then fail to start the sync",
                    f"install lore-service somewhere permanent and re-run `{TOOL_NAME} install`",
                )
            )
    source = len(program) > 1 and program[1].endswith((".py", ".pyz"))
    if not checks and source and os.path.isabs(program[0]):
        problem = _venv_problem(program[0])
        if problem:
            checks.append(problem)
    if not checks:
        checks.append(Check("program", "ok", f"the scheduler runs {program[0]}"))
    return checks


def core_checks(paths: Paths, system: System, manifest: Manifest) -> list[Check]:
    """What every service needs whatever its backend: files, config, status,
    project, token, stage programs and the scheduled program."""
    sid = manifest.service_id
    uid = system.uid() if system.platform != "win32" else None
    checks = [Check("manifest", "ok", f"{paths.manifest(sid)} is valid (schema {manifest.schema_version})")]
    for label, folder in (("config dir", paths.config_dir(sid)), ("state dir", paths.state_dir(sid))):
        checks.append(
            _mode_check(label, folder, 0o700, uid)
            if os.path.isdir(folder) or label == "config dir"
            else Check(label, "ok", f"{folder} will be created by the first run")
        )
    checks.append(_mode_check("manifest file", paths.manifest(sid), 0o600, uid))
    cfg: ServiceConfig | None = None
    try:
        cfg = load_config(paths, sid)
        checks.append(Check("config", "ok", f"{paths.config(sid)} is valid (profile {cfg.profile})"))
    except LoreServiceError as exc:
        checks.append(Check("config", "fail", exc.message, exc.hint))
    checks += _status_checks(paths, sid)
    if not os.path.isdir(manifest.project_root):
        checks.append(
            Check(
                "project",
                "fail",
                f"project folder {manifest.project_root} is missing; runs are skipped until it is back",
                "mount the drive that holds it or move the folder back; if it moved for good, "
                f"`{TOOL_NAME} uninstall --name {sid}` and install again from its new place",
            )
        )
    else:
        checks.append(Check("project", "ok", f"project {manifest.project_root}"))
    if manifest.token_source == "env-file":
        checks.append(_mode_check("token file", paths.env_file(sid), 0o600, uid))
    checks.append(_token_check(paths, system, manifest))
    if cfg is not None:
        checks += _stage_checks(system, cfg, paths.config(sid))
        # probes of the machine (an inhibitor, a socket): one that raises is its own failing check
        checks += _guarded("conditions", lambda: condition_checks(system, cfg))
    return checks + program_checks(manifest.program) + macos_program_checks(system, manifest.program)


def _status_checks(paths: Paths, sid: str) -> list[Check]:
    try:
        status = load_status(paths, sid)
    except LoreServiceError as exc:
        return [Check("status", "fail", exc.message, exc.hint)]
    checks = [Check("status", "ok", "status.json is readable" if status.updated_at_iso else "no runs yet")]
    if status.paused:
        why = f"paused ({status.paused.kind}): {status.paused.reason}"
        checks.append(Check("paused", "warn", why, status.paused.hint))
    return checks


def _token_check(paths: Paths, system: System, manifest: Manifest) -> Check:
    try:
        found = read_secret(paths, manifest, {} if manifest.token_source != "embedded" else system.environ)
    except LoreServiceError as exc:
        return Check("token", "fail", exc.message, exc.hint)
    if manifest.token_source == "environment":
        where = f"{manifest.token_env} in the run's own environment"
        if system.environ.get(manifest.token_env):
            return Check("token", "ok", f"token read from {where}; set here too (not shown)")
        return Check("token", "warn", f"token read from {where}; not set here", f"give `run` {manifest.token_env}")
    if found:
        return Check("token", "ok", f"token found in {manifest.token_source} (not shown)")
    if manifest.token_source == "embedded":
        return Check("token", "ok", "token is embedded in the scheduler entry (not shown)")
    hint = f"set {manifest.token_env} and re-run `{TOOL_NAME} install`"
    return Check("token", "fail", f"no token in {manifest.token_source}", hint)


def _stage_checks(system: System, cfg: ServiceConfig, config_path: str) -> list[Check]:
    """Each active stage's program is an executable file, named by an absolute path."""
    checks = []
    for stage in cfg.active_stages():
        exe = stage.command[0]
        resolved = exe if os.path.isabs(exe) else system.which(exe)
        if not resolved or not (os.path.isfile(resolved) and os.access(resolved, os.X_OK)):
            checks.append(
                Check(
                    f"stage {stage.name}",
                    "fail",
                    f"{exe} is not an executable file",
                    f"`{TOOL_NAME} install --lore /path/to/lore`, or edit {config_path}",
                )
            )
        elif resolved != exe:  # found on doctor's PATH, which need not be the scheduler's (cron: /usr/bin:/bin)
            checks.append(
                Check(
                    f"stage {stage.name}",
                    "warn",
                    f"{exe} is a bare name: found here as {resolved}, but scheduled runs search their own PATH",
                    f"write the absolute path {resolved} in {config_path}",
                )
            )
    return checks or [Check("lore", "ok", f"stage commands resolve ({cfg.active_stages()[0].command[0]})")]


def condition_checks(system: System, cfg: ServiceConfig) -> list[Check]:
    """What the run's conditions (section 4) see on this machine now: the
    GitLab host, the power source, a metered connection, the sleep inhibitor.
    A condition is not a fault: only what the user can act on warns."""
    return [check(system, cfg) for check in (_reach_check, _power_check, _metered_check, _sleep_check)]


def _reach_check(system: System, cfg: ServiceConfig) -> Check:
    name = "gitlab reachable"
    if cfg.gitlab_url == GITLAB_URL_OFF:
        return Check(name, "ok", 'not checked (gitlab_url = "none"): runs are never skipped as offline')
    target = offline_target(cfg, system.environ)
    if target is None:
        return Check(
            name,
            "warn",
            "no GitLab host known (no gitlab_url, and no git remote origin to take it from): runs are not "
            "checked for being offline, so offline runs fail, back off and may pause the service",
            f"`{TOOL_NAME} install --gitlab-url https://<your GitLab host>`",
        )
    host, port, what = target
    problem = system.reachable(host, port, REACH_TIMEOUT_SECONDS)
    where = f"{what}{host_port(host, port)}"
    if problem is None:
        return Check(name, "ok", f"{where} answers (gitlab_url {cfg.gitlab_url})")
    return Check(
        name,
        "warn",
        f"{where} unreachable ({problem}): runs are skipped as offline until it answers",
        "check the network (or VPN); if lore reaches GitLab another way, "
        'set gitlab_url = "none" (or the right URL) in service.toml',
    )


CONDITION_EFFECTS = {"run": "runs go on as usual", "critical-only": "docs and embeddings wait", "skip": "runs wait"}


def _power_check(system: System, cfg: ServiceConfig) -> Check:
    power, how = system.power_source()
    policy = f'on_battery = "{cfg.on_battery}"'
    if power == "battery":
        return Check("power", "ok", f"on battery ({how}): {CONDITION_EFFECTS[cfg.on_battery]} ({policy})")
    seen = "on AC power" if power == "ac" else "unknown, taken as AC power"
    return Check("power", "ok", f"{seen} ({how}); on battery: {CONDITION_EFFECTS[cfg.on_battery]} ({policy})")


def _metered_check(system: System, cfg: ServiceConfig) -> Check:
    metered, how = system.metered()
    policy = f'on_metered = "{cfg.on_metered}"'
    if metered:
        return Check("metered", "ok", f"metered connection ({how}): {CONDITION_EFFECTS[cfg.on_metered]} ({policy})")
    seen = "not metered" if metered is False else "unknown, taken as not metered"
    return Check("metered", "ok", f"{seen} ({how}); when metered: {CONDITION_EFFECTS[cfg.on_metered]} ({policy})")


def _sleep_check(system: System, cfg: ServiceConfig) -> Check:
    """Tried for real: the inhibitor is taken and let go at once."""
    name = "sleep inhibitor"
    if not cfg.inhibit_sleep:
        return Check(name, "ok", "off (inhibit_sleep = false): the machine may sleep during a sync")
    hold = system.inhibit_sleep(f"{TOOL_NAME} doctor: checking the sleep inhibitor")
    hold.release()
    if hold.held:
        return Check(name, "ok", f"{hold.how} keeps the machine awake while the stages run")
    return Check(
        name,
        "warn",
        f"unavailable ({hold.problem}): runs go on without it, and the machine may sleep during a sync",
        "on a machine that never sleeps (a server, a container), set inhibit_sleep = false in service.toml; "
        "on Linux, logind must answer (`systemd-inhibit --list`)",
    )


def freshness_check(report: ServiceReport, now_ms: int) -> Check:
    """Stale is a failure: the sync stopped, whatever the last run said."""
    fresh = report.fresh
    if not fresh.stale:
        return Check("freshness", "ok", f"synced within {format_interval(fresh.stale_after_seconds)} (stale_after)")
    why = f"stale: {stale_summary(fresh, report.manifest, now_ms)}; cause: {stale_cause(report)}"
    return Check("freshness", "fail", why, f"`{TOOL_NAME} trigger` syncs now")


def drift_checks(report: ServiceReport) -> list[Check]:
    """Each way the scheduler entry differs from what install wrote is a failure."""
    if report.scheduler_error is not None:
        return [Check("scheduler entry", "fail", report.scheduler_error.message, report.scheduler_error.hint)]
    drift = report.scheduler.drift if report.scheduler is not None else []
    return [Check("scheduler entry", "fail", problem, f"`{TOOL_NAME} install` rewrites it") for problem in drift]


def scheduled_token_check(system: System, manifest: Manifest) -> list[Check]:
    """On macOS the Keychain answers each program by itself: ask the very
    program the agent runs to read the token (`token`, non-interactive, with
    the run's timeout) and report what it got."""
    if system.platform != "darwin" or manifest.token_source != "keychain":
        return []
    argv = [*program_prefix(manifest), "--json", "token", "--service-id", manifest.service_id]
    name, program = "token (as scheduled)", argv[0]
    result = system.run(argv, timeout=SECRET_READ_TIMEOUT + 15)
    try:
        doc = json.loads(result.stdout)
        error = doc.get("error") or {}
    except (ValueError, AttributeError):
        why = f"could not ask {program} to read the token ({result.summary()})"
        return [Check(name, "warn", why, f"run `{' '.join(argv)}` to see what it says")]
    if doc.get("ok"):
        return [Check(name, "ok", f"{program} reads the token from the Keychain without a prompt")]
    return [Check(name, "fail", f"{program}: {error.get('message', 'no token')}", error.get("hint", ""))]


def notify_checks(system: System, paths: Paths, manifest: Manifest) -> list[Check]:
    """Where alerts go (section 4b): whether the scheduled run reaches a desktop
    session (as its last scheduled run found; before one, as doctor's own
    process does), and the webhook and Healthchecks hosts (never their URLs)."""
    notify = load_config(paths, manifest.service_id).notify
    checks = [_desktop_check(system, load_status(paths, manifest.service_id).desktop_session, notify.desktop)]
    if notify.webhook:
        checks.append(Check("notify webhook", "ok", f"events are POSTed to {shown_url(notify.webhook)}"))
    if notify.healthchecks_url:
        shown = shown_url(notify.healthchecks_url)
        checks.append(Check("notify healthchecks", "ok", f"each run pings {shown} (start, then success or fail)"))
    return checks


def _desktop_check(system: System, seen: bool | None, wanted: bool | None) -> Check:
    name = "notify desktop"
    if wanted is False:
        return Check(name, "ok", "off (desktop = false in service.toml)")
    where = "the last scheduled run" if seen is not None else "this shell (no scheduled run yet; it may differ)"
    reachable = seen if seen is not None else system.desktop_session() is not None
    tool = None
    if system.platform.startswith("linux") and not (system.which("gdbus") or system.which("notify-send")):
        tool = "neither gdbus nor notify-send is installed"
    if reachable and tool:
        return Check(name, "warn", f"a desktop session is reachable from {where}, but {tool}", "install libglib2.0-bin")
    if reachable:
        return Check(name, "ok", f"on: a desktop session is reachable from {where}")
    if wanted:
        return Check(
            name,
            "warn",
            f"desktop = true, but no desktop session is reachable from {where}",
            "log in at the desktop (on Linux the run needs DBUS_SESSION_BUS_ADDRESS or $XDG_RUNTIME_DIR/bus), "
            "or set desktop = false under [notify] in service.toml",
        )
    return Check(name, "ok", f"off: no desktop session is reachable from {where} (desktop = true forces it)")


def scheduled_path_check(backend: SchedulerBackend, manifest: Manifest) -> Check:
    """The PATH a scheduled run gets, which need not be the shell's: a lore
    that is a `#!/usr/bin/env` script, or runs git by name, needs its folders."""
    path = backend.scheduled_path(manifest)
    if path is None:
        return Check("scheduled PATH", "ok", f"scheduled runs get their caller's PATH ({backend.name})")
    lore = os.path.dirname(manifest.lore_path) if manifest.lore_path else None
    if lore and lore not in path.split(os.pathsep):
        return Check(
            "scheduled PATH",
            "warn",
            f"scheduled runs get PATH={path}, without lore's folder {lore}",
            f"if lore runs programs from {lore} by name, give it their absolute paths or install them in a folder "
            "on that PATH",
        )
    return Check("scheduled PATH", "ok", f"scheduled runs get PATH={path}")


def run_limit_check(system: System, paths: Paths, manifest: Manifest | None) -> Check:
    """The host-wide run limit (settings.toml), who holds its slots now, and
    how long a run waits for one (for this service's scheduler, if any)."""
    settings = load_settings(paths)
    limit = settings.max_concurrent_runs
    users = slots_in_use(system, paths, limit)
    named = ", ".join(u for u in users if u)
    source = settings.path or f"the default: there is no {paths.settings()}"
    wait = settings.busy_wait_seconds
    if manifest is not None:
        wait = slot_wait_seconds(settings, config_or_defaults(paths, manifest.service_id), manifest, "scheduled")
    return Check(
        "run limit",
        "ok",
        f"at most {limit} run(s) of all services at once ({source}); {len(users)} in use now"
        + (f" by {named}" if named else "")
        + f"; a scheduled run waits up to {human_duration(wait)} for a free slot, "
        f"trigger up to {human_duration(settings.trigger_busy_wait_seconds)}",
    )


def readiness_checks(system: System, paths: Paths, project: str) -> list[Check]:
    """doctor with no service installed: can this machine take an install, and
    what would the run's conditions see (the host from the folder's git remote)?"""
    checks: list[Check] = []
    chosen, reason, tried = choose_backend(system)
    if chosen:
        checks.append(Check("backend", "ok", f"install would use {chosen}: {reason}"))
        checks.extend(get_backend(chosen, system, paths).diagnose(None))
    else:
        checks.append(
            Check(
                "backend",
                "fail",
                reason,
                "start a systemd user manager or install cron, or use `--backend none` "
                "and call `lore-service run` yourself",
            )
        )
    for entry in tried:
        checks.append(Check("backend candidate", "warn", entry, "see the message; auto passed it over"))
    lore = system.which("lore")
    checks.append(
        Check("lore", "ok", f"lore is {lore}")
        if lore
        else Check("lore", "fail", "`lore` is not on PATH", "install gitlore, or pass --lore /path/to/lore")
    )
    checks.append(
        Check("token", "ok", f"{DEFAULT_TOKEN_ENV} is set (not shown)")
        if system.environ.get(DEFAULT_TOKEN_ENV)
        else Check(
            "token",
            "warn",
            f"{DEFAULT_TOKEN_ENV} is not set",
            f"export {DEFAULT_TOKEN_ENV}=... before install, or use --token-stdin",
        )
    )
    checks.extend(_guarded("run limit", lambda: [run_limit_check(system, paths, None)]))
    checks.extend(program_checks(self_command()))
    return checks + condition_checks(system, ServiceConfig(gitlab_url=derived_gitlab_url(system, project)))


# ============================================================================
# 8. CLI: argument parsing, commands, output, main()
# ============================================================================


import argparse  # noqa: E402  (only the CLI needs it; kept next to its users)


class _ParserExit(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class _Formatter(argparse.HelpFormatter):
    """HelpFormatter without its shutil import (argparse builds one per
    add_argument), which would cost every command ~2 ms of start-up."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        if width is None:
            try:
                width = int(os.environ.get("COLUMNS", "")) - 2
            except ValueError:
                try:
                    width = os.get_terminal_size().columns - 2
                except OSError:
                    width = 78
        super().__init__(prog, indent_increment, max_help_position, max(width, 40))


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and calling sys.exit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        import re

        # argparse quotes what it refuses ("invalid choice: '...'"): never a token
        message = re.sub(r"'([^']*)'", lambda m: quoted(m.group(1)), message)
        raise UsageError(message, f"see `{self.prog} --help`", code="usage")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        if message:
            sys.stderr.write(message)
        raise _ParserExit(status)


COMMAND_HELP = {
    "install": "register the sync for a project with the OS scheduler",
    "uninstall": "remove the scheduler entry, manifest, config and token",
    "status": "show state, last run and next run",
    "list": "list installed services",
    "run": "run the sync under the policy (what the scheduler calls)",
    "trigger": "run one attempt now, ignoring the backoff wait",
    "pause": "stop scheduled runs until resume",
    "resume": "clear a pause, the failure count and the retry time",
    "logs": "print the service log",
    "history": "list the last runs: start, trigger, duration, outcome, stages",
    "doctor": "check everything the service needs, with the fix for each problem",
    "export": "print the service as a Kubernetes CronJob (for `kubectl apply -f -`)",
    "token": "check that the token can be read as a scheduled run reads it (--store: store a new one from stdin)",
}


def _add_command_options(name: str, p: _Parser) -> None:
    if name == "install":
        p.add_argument("--project", metavar="DIR", help="project root (default: the current folder)")
        p.add_argument("--name", metavar="NAME", help="service id (default: <folder>-<hash of path>)")
        p.add_argument("--interval", metavar="30m", help="5m..24h, in m or h (default 30m)")
        p.add_argument("--profile", choices=tuple(PROFILES), help="fast|balanced|full (default balanced)")
        p.add_argument("--backend", choices=("auto", *BACKENDS), help="scheduler (default auto)")
        p.add_argument("--token-source", choices=TOKEN_SOURCES_CLI, help="where the token is kept (default auto)")
        p.add_argument("--token-env", metavar="VAR", help=f"variable holding the token (default {DEFAULT_TOKEN_ENV})")
        p.add_argument("--token-stdin", action="store_true", help="read the token from standard input")
        p.add_argument("--lore", metavar="PATH", help="the lore program (default: found on PATH)")
        p.add_argument(
            "--gitlab-url",
            metavar="URL",
            help="the GitLab a run checks it can reach, else it is skipped as offline "
            "(default: from the git remote origin; none: no check)",
        )
        p.add_argument("--dry-run", action="store_true", help="print what would be written and run; change nothing")
        p.add_argument("--force", action="store_true", help="also re-enable an entry switched off in the OS settings")
        p.add_argument(
            "--notify-desktop",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="desktop notifications of alerts (default: on where a desktop session is reachable)",
        )
        p.add_argument("--notify-webhook", metavar="URL", help='POST alert events as JSON to URL ("" removes it)')
        p.add_argument("--healthchecks-url", metavar="URL", help='ping a Healthchecks check each run ("" removes it)')
    elif name == "uninstall":
        p.add_argument("--purge", action="store_true", help="also delete status and logs")
    elif name == "status":
        p.add_argument("--all", action="store_true", help="every installed service")
        p.add_argument("--check", action="store_true", help="print nothing and exit 0 when all is fresh and unpaused")
    elif name == "pause":
        p.add_argument("--reason", default="paused by user")
    elif name == "logs":
        p.add_argument("--tail", type=_count, default=50, metavar="N", help="last N lines (default 50)")
        p.add_argument("--follow", action="store_true", help="keep printing new lines (Ctrl-C stops)")
    elif name == "history":
        what = f"the last N runs (default {HISTORY_LIMIT}: all that status.json keeps)"
        p.add_argument("--limit", type=_positive_count, default=HISTORY_LIMIT, metavar="N", help=what)
    elif name == "doctor":
        p.add_argument("--kubernetes", metavar="FILE", help="check a manifest `export` printed (- for stdin)")
    elif name == "token":
        p.add_argument("--store", action="store_true", help="store the token given on standard input")
    elif name == "export":
        _add_export_options(p)


def _add_export_options(p: _Parser) -> None:
    p.add_argument("--format", choices=("kubernetes",), default="kubernetes", help="kubernetes (the default)")
    p.add_argument("--image", metavar="IMAGE", required=True, help="a container image holding lore and lore-service")
    p.add_argument("--project", metavar="DIR", help="an installed service's project (default: the current folder)")
    p.add_argument("--name", "--service-id", dest="name", metavar="NAME", help="the service id")
    p.add_argument("--interval", metavar="30m", help="5m..24h (default: the installed service's, else 30m)")
    p.add_argument("--profile", choices=tuple(PROFILES), help="fast|balanced|full")
    p.add_argument("--token-env", metavar="VAR", help=f"the token's variable and Secret key ({DEFAULT_TOKEN_ENV})")
    p.add_argument("--namespace", metavar="NS", help="the namespace of every object (default: kubectl's)")
    p.add_argument("--storage-class", metavar="CLASS", help="of the volume claim (default: the cluster's)")
    p.add_argument("--storage-size", metavar="SIZE", default="5Gi", help="of the volume claim (default 5Gi)")
    p.add_argument("--secret-name", metavar="NAME", help="the Secret holding the token (default lore-<id>-token)")
    p.add_argument("--mount-path", metavar="PATH", default="/data", help="where the volume is mounted (default /data)")
    p.add_argument("--program", metavar="PATH", default=TOOL_NAME, help="lore-service in the image (default: on PATH)")
    p.add_argument("--lore", metavar="PATH", default="/usr/local/bin/lore", help="lore in the image")
    for key, default in K8S_RESOURCES.items():
        p.add_argument(f"--{key}", metavar="Q", default=default, help=f"(default {default})")
    p.add_argument("--status-job", action="store_true", help="also print a one-off Job that runs `status`")


def build_parser(only: str | None = None) -> _Parser:
    """The full parser, or (`only`) one with just that command: building all
    eleven parsers costs a `status` about 2 ms of its start-up."""
    common = _Parser(add_help=False)
    # SUPPRESS: an option given before the command is not reset by the subparser
    common.add_argument(
        "--home",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="keep all lore-service files under DIR (also LORE_SERVICE_HOME)",
    )
    target = _Parser(add_help=False)
    target.add_argument(
        "--name", "--service-id", dest="name", metavar="NAME", default=argparse.SUPPRESS, help="the service id"
    )
    target.add_argument(
        "--project",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="find the service by project folder (default: the current folder)",
    )

    parser = _Parser(
        prog=TOOL_NAME,
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()),
        parents=[common],
    )
    parser.add_argument("--version", action="store_true", help="print version, build and platform")
    parser.add_argument("--json", "--robot", action="store_true", help="one JSON document on stdout")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_text in COMMAND_HELP.items():
        if only is not None and name != only:
            continue
        parents = [common] if name in ("install", "list", "export") else [common, target]
        _add_command_options(name, sub.add_parser(name, help=help_text, description=help_text, parents=parents))
    return parser


COMMANDS = tuple(COMMAND_HELP)


def _count(text: str) -> int:
    """A --tail count: ASCII digits only (int() would also take other scripts' digits)."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"invalid count {quoted(text)}: use 0 or more ASCII digits")
    return int(text)


def _positive_count(text: str) -> int:
    """A --limit: 1 or more, in ASCII digits."""
    if not (text.isascii() and text.isdigit() and len(text) <= 9 and int(text) > 0):
        raise argparse.ArgumentTypeError(f"invalid count {quoted(text)}: use a whole number from 1 up, in ASCII digits")
    return int(text)


def parse_arguments(argv: list[str], guess: str) -> argparse.Namespace:
    """Parse with the guessed command's parser alone; if the guess was wrong
    (the word was an option's value), the full parser gives the real answer."""
    args: argparse.Namespace | None = None
    if guess:
        try:
            args = build_parser(only=guess).parse_args(argv)
        except UsageError:
            pass
    args = args or build_parser().parse_args(argv)
    # an empty value is never "not given": `--name ""` must not mean this folder's
    # service (--interval and --token-env refuse it with their own codes)
    given = ["home", "lore", "name", "project", "reason", "image", "namespace", "storage_class", "secret_name"]
    given += ["program", "kubernetes", "gitlab_url"]
    empty = sorted(k for k in given if getattr(args, k, None) == "")
    if empty:
        option = {"name": "name/--service-id"}.get(empty[0], empty[0].replace("_", "-"))
        raise UsageError(f"--{option} cannot be empty", "give a value, or leave the option out", code="empty_value")
    return args


class Context:
    """What every command gets: the System, the paths, robot mode, and the
    stream people read (`out`) with what its terminal can show (`console`)."""

    def __init__(
        self, system: System, paths: Paths, robot: bool, out: Any = None, console: Console | None = None
    ) -> None:
        self.system = system
        self.paths = paths
        self.robot = robot
        self.out = out if out is not None else sys.stdout
        self.console = console or Console()


@record
class Outcome:
    """A command's result: data for --json, text for people (and the same
    text with its colours, `painted`, for a terminal that takes them)."""

    data: dict[str, Any]
    text: str = ""
    painted: Painted | None = None


def painted_outcome(data: dict[str, Any], painted: Painted) -> Outcome:
    return Outcome(data, painted.plain, painted)


def find_service(ctx: Context, args: argparse.Namespace) -> Manifest:
    """By --name/--service-id, else by the project folder's realpath."""
    name = getattr(args, "name", None)
    if name:
        manifest = load_manifest(ctx.paths, validate_service_id(name))
        if manifest is None:
            raise NotInstalledError(
                f"no service named {quoted(name)} is installed", f"`{TOOL_NAME} list` shows what is installed"
            )
        return manifest
    project = canonical_project(getattr(args, "project", None) or os.getcwd())
    matches: list[Manifest] = []
    broken: StateFileError | None = None
    for sid in ctx.paths.installed_ids():
        try:
            manifest = load_manifest(ctx.paths, sid)
        except StateFileError as exc:
            broken = exc
            continue
        if manifest is not None and manifest.project_root == project:
            matches.append(manifest)
    if len(matches) > 1:
        raise UsageError(
            f"{len(matches)} services are installed for {project}: " + ", ".join(m.service_id for m in matches),
            "pick one with --name",
            code="ambiguous",
        )
    if matches:
        return matches[0]
    if broken is not None:  # a corrupt manifest is never read as "not installed"
        raise broken
    raise NotInstalledError(
        f"no service is installed for {project}",
        f"`{TOOL_NAME} install --project '{project}'`, or --name NAME (see `{TOOL_NAME} list`)",
    )


def cmd_install(ctx: Context, args: argparse.Namespace) -> Outcome:
    request = resolve_install(ctx.system, ctx.paths, args)
    # a hidden prompt only for a person installing for real, with no stored token to carry over
    carried = request.existing is not None and request.existing.token_source not in UNSTORED_TOKEN_SOURCES
    interactive = not (ctx.robot or request.dry_run or carried)
    token = obtain_token(ctx.system, args, request.config.token_env, interactive)
    plan = plan_install(ctx.system, ctx.paths, request, token)
    data: dict[str, Any] = {**plan.summary(), "dry_run": request.dry_run}
    data["notify"] = request.config.notify.shown()
    if request.dry_run:
        shown = plan.core_files + plan.scheduler.files
        data["files"] = [{"path": f.path, "mode": f"{f.mode:04o}", "content": f.shown()} for f in shown]
        data["commands"], data["changed"] = plan.scheduler.commands, False
    else:
        changed, applied = apply_install(ctx.system, ctx.paths, plan)
        data["files"] = [f.path for f in plan.core_files + applied.files]
        data["commands"], data["changed"] = applied.commands, changed
    data["warnings"], data["missing"] = plan.warnings, plan.missing
    return Outcome(data, _render_install(data))


def notify_text(shown: dict[str, Any]) -> str:
    """`desktop (where reachable); webhook https://example.com; healthchecks https://hc-ping.com`."""
    desktop = {True: "desktop", False: "no desktop", None: "desktop (where reachable)"}[shown["desktop"]]
    parts = [desktop]
    parts += [f"webhook {shown['webhook']}"] if shown["webhook"] else []
    parts += [f"healthchecks {shown['healthchecks_url']}"] if shown["healthchecks_url"] else []
    return "; ".join(parts)


def _render_install(d: dict[str, Any]) -> str:
    head = "would install" if d["dry_run"] else ("installed" if d["changed"] else "already installed (no change)")
    lines = [
        f"{head} {d['service_id']} for {d['project_root']}",
        f"  schedule  every {format_interval(d['interval_seconds'])} via {d['backend']} ({d['backend_reason']})",
        f"  profile   {d['profile']}; token from {d['token_source']} ({d['token_env']})",
        "  runs      " + " ".join(_shell_quote(a) for a in d["program"]),
        f"  alerts    {notify_text(d['notify'])}",
    ]
    for f in d.get("files", []):
        if isinstance(f, dict):
            lines.append(f"\n--- file {f['path']} (mode {f['mode']})")
            lines.append(f["content"].rstrip("\n"))
        else:
            lines.append(f"  file      {f}")
    if d.get("commands"):
        lines.append("\n--- commands" if d["dry_run"] else "  ran:")
        lines.extend("  $ " + " ".join(_shell_quote(a) for a in c) for c in d["commands"])
    lines.extend(f"warning: {w}" for w in d["warnings"])
    lines.extend(f"missing: {m}" for m in d.get("missing", []))
    return "\n".join(lines)


def _shell_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


# -- uninstall, pause, resume ---------------------------------------------------------


def locked_service(ctx: Context, args: argparse.Namespace) -> tuple[Manifest, FileLock]:
    """The service, read again once this command has its admin turn (another
    command may have changed or removed it meanwhile), and the held turn."""
    sid = find_service(ctx, args).service_id
    lock = admin_lock(ctx.system, ctx.paths, sid)
    try:
        manifest = load_manifest(ctx.paths, sid)
    except BaseException:
        lock.release()
        raise
    if manifest is None:
        lock.release()
        raise NotInstalledError(f"{sid} was uninstalled while this command waited", f"`{TOOL_NAME} list`")
    return manifest, lock


def cmd_uninstall(ctx: Context, args: argparse.Namespace) -> Outcome:
    manifest, lock = locked_service(ctx, args)
    sid, purge = manifest.service_id, bool(args.purge)
    try:
        done = uninstall_service(ctx.system, ctx.paths, manifest, purge)
    finally:
        lock.release()
    data = {"service_id": sid, "removed": done.removed, "kept": done.kept, "purged": purge, "warnings": done.warnings}
    text = f"uninstalled {sid}" + (f"; kept {', '.join(done.kept)} (use --purge to delete)" if done.kept else "")
    text += "".join(f"\nwarning: {w}" for w in done.warnings)
    return Outcome(data, text)


def cmd_pause(ctx: Context, args: argparse.Namespace) -> Outcome:
    manifest, lock = locked_service(ctx, args)
    now = ctx.system.now_ms()
    reason = args.reason.strip() or "paused by user"

    def change(s: Status) -> None:
        s.paused = Pause("manual", reason, iso_from_ms(now), f"`{TOOL_NAME} resume` to start again")

    try:
        status = update_status(ctx.paths, manifest.service_id, ctx.system, change)
    finally:
        lock.release()
    return Outcome(
        {"service_id": manifest.service_id, "paused": status.paused.to_dict() if status.paused else None},
        f"paused {manifest.service_id}: {reason}",
    )


def cmd_resume(ctx: Context, args: argparse.Namespace) -> Outcome:
    manifest, lock = locked_service(ctx, args)
    before: list[Pause | None] = []

    def change(s: Status) -> None:
        before.append(s.paused)
        s.paused, s.consecutive_failures, s.next_retry_at_ms = None, 0, None

    try:
        update_status(ctx.paths, manifest.service_id, ctx.system, change)
    finally:
        lock.release()
    was = before[0]
    text = f"resumed {manifest.service_id}" + (f" (was paused: {was.kind})" if was else " (it was not paused)")
    return Outcome({"service_id": manifest.service_id, "was_paused": was.to_dict() if was else None}, text)


def _render_run(record: RunRecord, status: Status, stages: bool = True) -> str:
    """The run's summary; `stages`: with a line per stage (unless the live view printed them)."""
    lines = [f"run {record.run_id}: {record.outcome} in {human_duration(record.duration_ms / 1000)}"]
    for r in record.stage_results if stages else ():
        lines.append(f"  {r.stage:<11}{r.outcome:<9}{human_duration(r.duration_ms / 1000):>7}  {r.message}")
    if status.paused:
        lines.append(f"paused ({status.paused.kind}): {status.paused.reason}\n  fix: {status.paused.hint}")
    elif status.next_retry_at_ms:
        lines.append(f"retry not before {local_time(status.next_retry_at_ms)}")
    return "\n".join(lines)


def cmd_run(ctx: Context, args: argparse.Namespace) -> Outcome:
    return _run_command(ctx, args, "scheduled")


def cmd_trigger(ctx: Context, args: argparse.Namespace) -> Outcome:
    return _run_command(ctx, args, "manual")


def _say(text: str) -> None:
    """A line for the person at the terminal while a command waits (stderr: never in --json output)."""
    sys.stderr.write(terminal_safe(text) + "\n")
    sys.stderr.flush()


def _run_command(ctx: Context, args: argparse.Namespace, trigger: str) -> Outcome:
    manifest = find_service(ctx, args)
    notify = _say if trigger == "manual" else None  # a scheduled run's waiting is in its log
    progress = live_progress(ctx) if trigger == "manual" else None
    try:
        result = run_service(ctx.system, ctx.paths, manifest, trigger, notify, progress)
    finally:
        if progress is not None:
            progress.close()
    record, status, sid = result.record, result.status, result.service_id
    if record is None or status is None or record.outcome == "skipped":
        run = record.to_dict() if record else None
        data = {"service_id": sid, "skipped": True, "skip_reason": result.skip_reason, "run": run}
        text = "" if result.quiet else f"skipped {sid}: {result.skip_reason}"
        if record is not None and trigger == "manual":  # a person asked for a sync that did not happen
            hint = f"the run is recorded as skipped; trigger again when it no longer holds (`{TOOL_NAME} doctor`)"
            raise LoreServiceError(f"not synced: {result.skip_reason}", hint, code="skipped").with_result(data, text)
        return Outcome(data, text)
    data = {
        "service_id": sid,
        "skipped": False,
        "skip_reason": None,
        "run": record.to_dict(),
        "state": assess(status, manifest, ctx.system.now_ms(), False)[1],  # as `status` would say now
        "consecutive_failures": status.consecutive_failures,
        "next_retry_at_ms": status.next_retry_at_ms,
        "paused": status.paused.to_dict() if status.paused else None,
    }
    text = _render_run(record, status, stages=progress is None or not progress.shown)
    if record.outcome == "failed":
        hint = (
            status.paused.hint
            if status.paused
            else f"will retry after {iso_from_ms(status.next_retry_at_ms or 0)}; see `{TOOL_NAME} logs`"
        )
        failed = [r for r in record.stage_results if r.outcome in ("failed", "timeout")]
        if not failed:  # no stage could start: the token could not be had (error class secret_store)
            why = record.stage_results[0].message.removeprefix("skipped: ") if record.stage_results else "no token"
            raise LoreServiceError(why, hint, code="run_failed").with_result(data, text)
        bad = next((r for r in failed if r.critical), failed[0])  # an optional one: the run was stopped
        what = "critical stage" if bad.critical else "stage"
        error = LoreServiceError(f"{what} {bad.stage} {bad.outcome}: {bad.message}", hint, code="run_failed")
        raise error.with_result(data, text)
    return Outcome(data, text)


# -- status, list ------------------------------------------------------------------


if TYPE_CHECKING:
    from typing import TypeAlias

    SchedulerView: TypeAlias = "SchedulerState | LoreServiceError"  # a scheduler's view, or why there is none


@record
class ServiceReport:
    """One service as `status` shows it: status.json, the state derived from
    it, and the scheduler's own view (or why that could not be had)."""

    manifest: Manifest
    status: Status
    state: str
    log_path: str
    status_path: str
    fresh: Freshness
    scheduler: SchedulerState | None = None
    scheduler_error: LoreServiceError | None = None

    def to_dict(self) -> dict[str, Any]:
        m, st = self.manifest, self.status
        return {
            "service_id": m.service_id,
            "project_root": m.project_root,
            "state": self.state,
            "stale": self.fresh.stale,
            "stale_since_ms": self.fresh.stale_since_ms,
            "last_success_at_ms": self.fresh.last_success_at_ms,
            "stale_after_seconds": self.fresh.stale_after_seconds,
            "backend": m.backend,
            "backend_reason": m.backend_reason,
            "interval_seconds": m.interval_seconds,
            "profile": m.profile,
            "token_source": m.token_source,
            "last_run": st.last_run.to_dict() if st.last_run else None,
            "last_skip": st.last_skip.to_dict() if st.last_skip else None,
            "consecutive_failures": st.consecutive_failures,
            "next_retry_at_ms": st.next_retry_at_ms,
            "next_retry_at_iso": iso_from_ms(st.next_retry_at_ms) if st.next_retry_at_ms else None,
            "next_due_at_ms": st.next_due_at_ms,
            "paused": st.paused.to_dict() if st.paused else None,
            "history": [r.to_dict() for r in st.history],
            "updated_at_iso": st.updated_at_iso or None,
            "log_path": self.log_path,
            "status_path": self.status_path,
            "scheduler": (
                self.scheduler.to_dict()
                if self.scheduler is not None
                else {"error": (self.scheduler_error or SchedulerError("no scheduler view")).payload()}
            ),
        }


def service_report(ctx: Context, manifest: Manifest, view: SchedulerView | None = None) -> ServiceReport:
    """One service's report; `view` is its scheduler's answer when already
    asked (`status --all` asks each backend once for all of its services)."""
    sid, paths = manifest.service_id, ctx.paths
    status = load_status(paths, sid)
    fresh, state = assess(status, manifest, ctx.system.now_ms(), lock_is_held(paths.run_lock(sid), ctx.system))
    report = ServiceReport(manifest, status, state, paths.log(sid), paths.status(sid), fresh)
    if view is None:
        view = scheduler_views(ctx, [manifest], batch=False)[sid]
    if isinstance(view, LoreServiceError):
        report.scheduler_error = view
    else:
        report.scheduler = view
    return report


def scheduler_views(ctx: Context, manifests: Sequence[Manifest], batch: bool = True) -> dict[str, SchedulerView]:
    """Each service's scheduler view, or the error in its place. With batch,
    each backend is asked once for all of its services (states()), so the
    questions asked do not grow with their number; else one by one (state())."""
    groups: dict[str, list[Manifest]] = {}
    for manifest in manifests:
        groups.setdefault(manifest.backend, []).append(manifest)
    views: dict[str, SchedulerView] = {}
    for name, group in groups.items():
        if name not in BACKENDS:
            unknown = SchedulerError(f"unknown backend {name}", "upgrade lore-service", code="unknown_backend")
            views.update((m.service_id, unknown) for m in group)
            continue
        backend = get_backend(name, ctx.system, ctx.paths)
        views.update(backend.states(group) if batch else backend.each_service(group, backend.state))
    return views


def _when(iso: str | None, now_ms: int) -> str:
    """`2026-11-28 01:26 (in 12m)` in local time, for people."""
    ms = ms_from_iso(iso or "")
    if ms is None:
        return iso or "?"
    delta = (ms - now_ms) / 1000
    relative = f"in {human_duration(delta)}" if delta >= 0 else f"{human_duration(delta)} ago"
    return f"{local_time(ms)} ({relative})"


def _render_status(report: ServiceReport, now_ms: int, console: Console) -> Painted:
    """The status screen; the state word in its colour, the history strip in its marks."""
    m, st, sched = report.manifest, report.status, report.scheduler
    lines = [f"  project     {m.project_root}"]
    lines.append(
        f"  schedule    every {format_interval(m.interval_seconds)} via {m.backend}"
        f" ({m.backend_reason}), profile {m.profile}"
    )
    if report.scheduler_error is not None:
        error = report.scheduler_error
        lines.append(f"  scheduler   error: {error.message}\n              fix: {error.hint}")
    elif sched is not None:
        if sched.next_run_iso:
            lines.append(f"  next run    {_when(sched.next_run_iso, now_ms)}")
        if sched.detail:
            lines.append(f"  scheduler   {sched.detail}")
        if sched.catch_up:
            lines.append(f"  catch-up    {sched.catch_up}")
        for problem in sched.drift:
            lines.append(f"  DRIFT       {problem}\n              fix: `{TOOL_NAME} install` rewrites the entry")
    if report.fresh.stale:
        lines += _render_stale(report, now_ms)
    lines += _render_last_run(st, now_ms)
    text = Painted(f"{m.service_id}: ").add(report.state.upper(), STATE_COLORS.get(report.state, ""))
    text.add("\n" + "\n".join(lines) + "\n")
    if st.history:
        text.add("  history     ").extend(history_strip(st.history, console)).add("  newest last\n")
    pause, lines = st.paused, []
    if pause:
        lines.append(f"  PAUSED      {pause.kind} since {_when(pause.since_iso, now_ms)}: {pause.reason}")
        lines.append(f"              fix: {pause.hint}")
    lines.append(f"  log         {report.log_path}")
    return text.add("\n".join(lines))


def history_strip(history: list[RunRecord], console: Console) -> Painted:
    """One mark per run in status.json's history, newest last. A coalesced
    entry (repeats > 1: the same skip at several ticks in a row) is one
    mark, as the history keeps it: `history` gives the count."""
    strip = Painted()
    for run in reversed(history):
        strip.add(mark(run.outcome, console), OUTCOME_COLORS.get(run.outcome, ""))
    return strip


def stale_summary(fresh: Freshness, manifest: Manifest, now_ms: int) -> str:
    """`no successful sync for 8h (expected every 30m)`."""
    base = fresh.last_success_at_ms
    since = f"for {human_duration((now_ms - base) / 1000)}" if base is not None else "since install"
    return f"no successful sync {since} (expected every {format_interval(manifest.interval_seconds)})"


def _render_stale(report: ServiceReport, now_ms: int) -> list[str]:
    """STALE, for how long, the likeliest cause the scheduler itself gives, and the fix."""
    lines = [f"  STALE       {stale_summary(report.fresh, report.manifest, now_ms)}"]
    lines.append(f"              cause: {stale_cause(report)}")
    lines.append(f"              fix: `{TOOL_NAME} doctor` names what to repair; `{TOOL_NAME} trigger` syncs now")
    return lines


def stale_cause(report: ServiceReport) -> str:
    """The likeliest reason the runs stopped, first match (spec §7): the
    scheduler cannot be read, a scheduled program that is gone, what the
    scheduler says is wrong with its entry, an entry that is not active, the
    condition that skips the runs, the runs' own failure, a start that failed before the run could
    record anything, lingering off; else sleep."""
    sched = report.scheduler
    if report.scheduler_error is not None:
        return report.scheduler_error.message
    gone = missing_program_paths(report.manifest.program)
    if gone:  # the pinned binary (or the source file) deleted: every firing fails to start
        return f"the scheduled program {gone[0]} is missing"
    if sched is not None and sched.drift:
        return sched.drift[0]
    if sched is not None and sched.active is False:
        return f"the scheduler entry is not active ({sched.detail})"
    skip, success = report.status.last_skip, report.status.last_success_at_ms or 0
    if skip is not None and skip.condition and (ms_from_iso(skip.finished_at_iso) or 0) > success:
        return f"the runs are skipped: {skip.reason} ({skip.repeats} in a row)"
    last = report.status.last_run
    if last is not None and last.outcome == "failed":
        return f"the runs fail: {run_problem(last)}"
    return _quiet_scheduler_cause(sched, report.status)


def _quiet_scheduler_cause(sched: SchedulerState | None, status: Status) -> str:
    """When no run recorded a problem: a failed start the scheduler saw after
    the newest thing a run recorded, then lingering, then sleep."""
    asleep = "the machine was asleep or off at the scheduled times"
    if sched is not None and _unrecorded_start_failure(sched, status):
        code = sched.extra.get("last_exit_status")
        result = f"{sched.last_result}" + (f", exit status {code}" if code is not None else "")
        return f"the scheduler's last start of the run failed ({result}) before it recorded anything"
    if sched is not None and sched.extra.get("linger") is False:
        return f"the timer fires only while you are logged in (lingering is off), or {asleep}"
    return f"no run has happened in time: {asleep}?"


# Task Scheduler's own status codes (SCHED_S_*: ready, running, disabled, not
# yet run, terminated, queued, ...) sit in 0x41300..0x413FF: not a program's exit
TASK_STATUS_CODES = range(0x41300, 0x41400)
# a run records its outcome a moment before the scheduler sees it exit
START_RECORD_MARGIN_MS = 60_000


def _unrecorded_start_failure(sched: SchedulerState, status: Status) -> bool:
    """The scheduler's last result is a failure, and it came after everything
    a run recorded (so no run can have said why: 203/EXEC, a missing binary)."""
    result = sched.last_result
    if result in (None, 0, "success") or (isinstance(result, int) and result in TASK_STATUS_CODES):
        return False
    when = ms_from_iso(sched.extra.get("last_finished_iso") or sched.last_trigger_iso or "")
    if when is None:  # (launchd keeps no time of its last exit: too old to tell)
        return False
    records = [r for r in (status.last_run, status.last_skip) if r is not None]
    recorded = max([ms_from_iso(r.finished_at_iso) or 0 for r in records] + [status.last_success_at_ms or 0])
    return when > recorded + START_RECORD_MARGIN_MS


def _stage_outcome(stage: StageResult) -> str:
    """`docs success`; a stage a condition held back says which (`docs skipped (on battery)`)."""
    why = stage.message.removeprefix("skipped: ")
    held = stage.outcome == "skipped" and why in (ON_BATTERY_REASON, METERED_REASON)
    return f"{stage.stage} skipped ({why})" if held else f"{stage.stage} {stage.outcome}"


def _render_last_run(st: Status, now_ms: int) -> list[str]:
    run = st.last_run
    if run is None:
        lines = ["  last run    none yet"]
    else:
        stages = ", ".join(_stage_outcome(s) for s in run.stage_results)
        lines = [
            f"  last run    {_when(run.started_at_iso, now_ms)}, {run.trigger}: {run.outcome} in "
            f"{human_duration(run.duration_ms / 1000)}",
            f"              {stages}",
        ]
    skip = st.last_skip
    if skip is not None and (run is None or skip.started_at_ms >= run.started_at_ms):
        times = f" ({skip.repeats} in a row)" if skip.repeats > 1 else ""
        lines.append(f"  last skip   {_when(skip.finished_at_iso, now_ms)}: {skip.reason}{times}")
    if st.consecutive_failures:
        lines.append(f"  failures    {st.consecutive_failures} in a row")
    retry = st.next_retry_at_ms
    if retry and retry > now_ms:
        lines.append(f"  next retry  {local_time(retry)} (in {human_duration((retry - now_ms) / 1000)})")
    elif st.consecutive_failures and not st.paused:
        lines.append("  next retry  at the next scheduled run (the backoff wait is over)")
    return lines


def cmd_status(ctx: Context, args: argparse.Namespace) -> Outcome:
    ctx.paths.read_statuses = {}  # status writes nothing: the report and the scheduler view share each file
    if args.check:
        return status_check(ctx, args)
    now = ctx.system.now_ms()
    if args.all:
        return status_all(ctx, now)
    try:
        manifest = find_service(ctx, args)
    except NotInstalledError as exc:
        exc.data = {"state": "not_installed"}
        raise
    report = service_report(ctx, manifest)
    return painted_outcome(report.to_dict(), _render_status(report, now, ctx.console))


def status_all(ctx: Context, now: int) -> Outcome:
    """`status --all`: every service, each backend asked once for all of its
    services; one that cannot be read gets its own error row."""
    rows: list[dict[str, Any]] = []
    texts: list[Painted] = []
    errors: list[LoreServiceError] = []
    loaded: list[tuple[str, Manifest | LoreServiceError]] = []
    for sid in ctx.paths.installed_ids():
        try:
            manifest = load_manifest(ctx.paths, sid)
        except LoreServiceError as exc:
            loaded.append((sid, exc))
            continue
        if manifest is not None:
            loaded.append((sid, manifest))
    views = scheduler_views(ctx, [m for _, m in loaded if not isinstance(m, LoreServiceError)])
    for sid, item in loaded:
        report = item if isinstance(item, LoreServiceError) else _report_or_error(ctx, item, views[sid])
        if isinstance(report, LoreServiceError):
            errors.append(report)
            rows.append({"service_id": sid, "error": report.payload()})
            texts.append(Painted(f"{sid}: ").add("ERROR", RED).add(f" {report.message}\n  fix: {report.hint}"))
        else:
            rows.append(report.to_dict())
            texts.append(_render_status(report, now, ctx.console))
    every = Painted()
    for i, text in enumerate(texts):
        every.add("\n\n" if i else "").extend(text)
    return _every_service(rows, errors, every if texts else Painted("no services installed"))


def _report_or_error(ctx: Context, manifest: Manifest, view: SchedulerView) -> ServiceReport | LoreServiceError:
    try:
        return service_report(ctx, manifest, view)
    except LoreServiceError as exc:
        return exc


def status_check(ctx: Context, args: argparse.Namespace) -> Outcome:
    """`status --check [--all]`: silent and exit 0 when every service is fresh
    and not paused; otherwise one line per problem (stderr) and exit 1. For
    shell prompts, login scripts and monitoring."""
    now = ctx.system.now_ms()
    rows: list[dict[str, Any]] = []
    sids = ctx.paths.installed_ids() if args.all else [find_service(ctx, args).service_id]
    for sid in sids:
        try:
            manifest = load_manifest(ctx.paths, sid)
            if manifest is None:
                continue
            status = load_status(ctx.paths, sid)
        except LoreServiceError as exc:
            rows.append({"service_id": sid, "ok": False, "problems": [f"{sid}: unreadable: {exc.message}"]})
            continue
        fresh, problems = freshness(status, manifest, now), []
        if status.paused:
            problems.append(f"{sid}: PAUSED ({status.paused.kind}): {status.paused.reason}; fix: {status.paused.hint}")
        if fresh.stale:
            summary = stale_summary(fresh, manifest, now)
            problems.append(f"{sid}: STALE: {summary}; fix: `{TOOL_NAME} doctor --name {sid}`")
        rows.append({"service_id": sid, "ok": not problems, "problems": problems})
    problems = [p for row in rows for p in row["problems"]]
    if problems:
        error = LoreServiceError("\n".join(problems), "", code="unhealthy")
        raise error.with_result({"services": rows})
    return Outcome({"services": rows}, "")


def _every_service(rows: list[dict[str, Any]], errors: list[LoreServiceError], shown: str | Painted) -> Outcome:
    """`status --all` and `list`: every readable service is shown, and one
    that cannot be read still makes the command fail with its exit code."""
    painted = shown if isinstance(shown, Painted) else Painted(shown)
    text = painted.plain
    if not errors:
        return painted_outcome({"services": rows}, painted)
    first = errors[0]
    error = LoreServiceError(
        f"{len(errors)} of {len(rows)} services cannot be read: {first.message}",
        first.hint,
        code=first.code,
        exit_code=max(e.exit_code for e in errors),
    )
    raise error.with_result({"services": rows}, text)


def cmd_list(ctx: Context, args: argparse.Namespace) -> Outcome:
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    errors: list[LoreServiceError] = []
    now = ctx.system.now_ms()
    for sid in ctx.paths.installed_ids():
        try:
            manifest = load_manifest(ctx.paths, sid)
            if manifest is None:
                continue
            status = load_status(ctx.paths, sid)
            state = assess(status, manifest, now, lock_is_held(ctx.paths.run_lock(sid), ctx.system))[1]
        except LoreServiceError as exc:
            errors.append(exc)
            rows.append({"service_id": sid, "state": "error", "error": exc.payload()})
            lines.append(f"{sid:<{SERVICE_ID_MAX}}  {'error':<9} {exc.message}")
            continue
        m = manifest
        rows.append(
            {
                "service_id": sid,
                "project_root": m.project_root,
                "backend": m.backend,
                "interval_seconds": m.interval_seconds,
                "profile": m.profile,
                "state": state,
            }
        )
        every = format_interval(m.interval_seconds)
        lines.append(f"{sid:<{SERVICE_ID_MAX}}  {state:<9} {m.backend:<8} {every:>4}  {m.project_root}")
    return _every_service(rows, errors, "\n".join(lines) or "no services installed")


def cmd_history(ctx: Context, args: argparse.Namespace) -> Outcome:
    """The last runs status.json keeps (HISTORY_LIMIT), newest last on screen
    and newest first in --json, as status.json has them."""
    manifest = find_service(ctx, args)
    runs = load_status(ctx.paths, manifest.service_id).history[: args.limit]
    data = {
        "service_id": manifest.service_id,
        "limit": args.limit,
        "history_limit": HISTORY_LIMIT,
        "runs": [run.to_dict() for run in runs],
    }
    if not runs:
        return Outcome(data, f"{manifest.service_id}: no runs yet")
    text = Painted(f"{'started':<19}  {'trigger':<9}  {'took':>6}  {'outcome':<8}  stages\n")
    for i, run in enumerate(reversed(runs)):
        text.add("\n" if i else "").extend(_history_row(run, ctx.console))
    return painted_outcome(data, text)


def _history_row(run: RunRecord, console: Console) -> Painted:
    """`2026-11-28 01:36:47  scheduled    3.2s  success   issues ✔ mrs ✔ docs -`;
    a skipped run says why instead, and how many ticks in a row it held."""
    started = run.started_at_ms or ms_from_iso(run.started_at_iso) or 0
    took = "-" if run.outcome == "skipped" else human_duration(run.duration_ms / 1000)
    row = Painted(f"{local_time(started):<19}  {run.trigger:<9}  {took:>6}  ")
    row.add(run.outcome, OUTCOME_COLORS.get(run.outcome, "")).add(" " * max(2, 10 - len(run.outcome)))
    if run.outcome == "skipped":
        row.add(run.reason or run.condition or "skipped")
        if run.repeats > 1:  # coalesced: finished_at is the newest of them
            last = ms_from_iso(run.finished_at_iso) or started
            row.add(f" ({run.repeats} in a row, the last at {local_time(last)})")
        return row
    for i, stage in enumerate(run.stage_results):
        row.add(f"{' ' if i else ''}{stage.stage} ")
        if stage.outcome == "timeout":  # a mark would say failed: the word says what happened
            row.add("timeout", RED)
        elif stage.outcome == "skipped":
            row.add("-", DIM)
        else:
            row.add(mark(stage.outcome, console), OUTCOME_COLORS.get(stage.outcome, ""))
    return row


def cmd_logs(ctx: Context, args: argparse.Namespace) -> Outcome:
    manifest = find_service(ctx, args)
    if args.follow and ctx.robot:
        raise UsageError(
            "--follow streams text and cannot be one JSON document", "drop --json, or use --tail N", code="usage"
        )
    path = ctx.paths.log(manifest.service_id)
    # where the tail ends is where --follow begins: a line written in between is printed once
    try:
        st = os.stat(path)
        start: tuple[int, int, int] | None = (st.st_dev, st.st_ino, st.st_size)
    except OSError:
        start = None
    lines = tail_lines(path, args.tail, end=start[2] if start else None)
    if args.follow:
        ctx.system.stop_on_ctrl_c()
        out = sys.stdout
        try:  # Ctrl-C is how --follow ends, wherever it lands: exit 0
            for line in lines:
                out.write(terminal_safe(line) + "\n")
            out.flush()
            for line in follow_lines(path, ctx.system, start=start):
                out.write(terminal_safe(line) + "\n")
                out.flush()
        except KeyboardInterrupt:
            pass
        return Outcome({}, "")
    return Outcome(
        {"service_id": manifest.service_id, "path": path, "lines": lines},
        "\n".join(lines) if lines else f"(no log lines yet in {path})",
    )


def cmd_doctor(ctx: Context, args: argparse.Namespace) -> Outcome:
    if getattr(args, "kubernetes", None):
        source = args.kubernetes
        text = ctx.system.read_stdin() if source == "-" else read_text(source)
        if text is None:
            raise UsageError(f"cannot read {source}", "give the file `export --format kubernetes` wrote", code="usage")
        return _doctor_report(kubernetes_checks(text, source), f"the Kubernetes manifest {source}", None)
    ctx.paths.read_statuses = {}  # doctor writes no status either: each check reads the file once
    ctx.system.answers = {}  # and asks the scheduler each question once, for its checks and its report
    try:
        return _doctor_service(ctx, args)
    finally:
        ctx.system.answers = None  # (whoever uses this System next asks afresh)


def _doctor_service(ctx: Context, args: argparse.Namespace) -> Outcome:
    """The checks of the folder's (or --name's) service, or of an install's readiness."""
    manifest: Manifest | None = None
    broken: StateFileError | None = None
    try:
        manifest = find_service(ctx, args)
    except NotInstalledError:
        if getattr(args, "name", None):
            raise
    except StateFileError as exc:
        broken = exc
    if broken is not None:
        checks = [Check("manifest", "fail", broken.message, broken.hint)]
        subject = "a service whose manifest cannot be read"
    elif manifest is None:
        project = canonical_project(getattr(args, "project", None) or os.getcwd())
        checks = readiness_checks(ctx.system, ctx.paths, project)
        subject = "this machine (no service installed here)"
    else:
        service = manifest
        checks = [Check("backend", "ok", f"{manifest.backend}: {manifest.backend_reason}")]
        checks += _guarded("files", lambda: core_checks(ctx.paths, ctx.system, service))
        checks += _guarded("run limit", lambda: [run_limit_check(ctx.system, ctx.paths, service)])
        if manifest.backend in BACKENDS:
            backend = get_backend(manifest.backend, ctx.system, ctx.paths)
            checks += _guarded(backend.name, lambda: backend.diagnose(service))
            checks += _guarded("scheduled PATH", lambda: [scheduled_path_check(backend, service)])
            # the scheduler is asked once, for freshness's cause and for the drift
            report = _guarded_report(ctx, service)
            if isinstance(report, Check):
                checks.append(report)
            else:
                checks.append(freshness_check(report, ctx.system.now_ms()))
            checks += _guarded("token (as scheduled)", lambda: scheduled_token_check(ctx.system, service))
            checks += _guarded("notify", lambda: notify_checks(ctx.system, ctx.paths, service))
            if not isinstance(report, Check):
                checks += drift_checks(report)
            else:  # status.json cannot be read (its own check says so): the entry is still judged
                fix = f"`{TOOL_NAME} install` rewrites it"
                drift = lambda: [Check("scheduler entry", "fail", p, fix) for p in backend.state(service).drift]  # noqa: E731
                checks += _guarded("scheduler entry", drift)
        else:
            checks.append(Check("backend", "fail", f"unknown backend {manifest.backend}", "upgrade lore-service"))
        subject = manifest.service_id
    return _doctor_report(checks, subject, manifest)


def _doctor_report(checks: list[Check], subject: str, manifest: Manifest | None) -> Outcome:
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines = [f"doctor: {subject}"]
    for c in checks:
        lines.append(f"  {c.status:<5} {c.name}: {c.message}")
        if c.status != "ok" and c.hint:
            lines.append(f"        fix: {c.hint}")
    lines.append(f"{failed} failing, {warned} warning, {len(checks) - failed - warned} ok")
    data = {
        "subject": subject,
        "service_id": manifest.service_id if manifest else None,
        "checks": [c.to_dict() for c in checks],
        "failed": failed,
        "warned": warned,
    }
    if failed:
        first = next(c for c in checks if c.status == "fail")
        message = f"{failed} check(s) failing, first: {first.name}: {first.message}"
        raise LoreServiceError(message, first.hint, code="checks_failed").with_result(data, "\n".join(lines))
    return Outcome(data, "\n".join(lines))


def cmd_token(ctx: Context, args: argparse.Namespace) -> Outcome:
    """Read the token as a scheduled run does (the store only, with its
    timeout, never printed); --store puts a new one there, from stdin. doctor
    and install run this through the scheduled program itself, which is the
    one macOS's Keychain must trust."""
    manifest = find_service(ctx, args)
    sid, source = manifest.service_id, manifest.token_source
    if args.store:
        args.token_stdin = True
        token = obtain_token(ctx.system, args, manifest.token_env, interactive=False)
        store_secret(ctx.paths, manifest, token or "")
        return Outcome({"service_id": sid, "token_source": source, "stored": True}, f"stored the token in {source}")
    ctx.system.make_undumpable()
    found = bool(read_secret(ctx.paths, manifest, {}))
    data = {"service_id": sid, "token_source": source, "found": found}
    if not found:
        error = LoreServiceError(f"no token in {source}", f"`{TOOL_NAME} install` stores one", code="no_token")
        raise error.with_result(data)
    return Outcome(data, f"the token in {source} can be read (not shown)")


def program_prefix(manifest: Manifest) -> list[str]:
    """The scheduled argv up to its command: the program (and --home) the scheduler starts."""
    program = manifest.program
    return program[: program.index("run")] if "run" in program else list(program)


def cmd_export(ctx: Context, args: argparse.Namespace) -> Outcome:
    spec = resolve_export(ctx, args)
    objects = kubernetes_objects(spec)
    data = {
        "format": "kubernetes",
        "service_id": spec.service_id,
        "secret_command": kubernetes_secret_command(spec),
        "manifest": {"apiVersion": "v1", "kind": "List", "items": objects},
    }
    return Outcome(data, kubernetes_document(spec, objects).rstrip("\n"))


def resolve_export(ctx: Context, args: argparse.Namespace) -> KubernetesExport:
    """An installed service's options (found by --name or --project), each
    overridable by the flags install takes; or a service not installed here."""
    manifest: Manifest | None = None
    try:
        manifest = find_service(ctx, args)
    except NotInstalledError:
        pass
    if manifest is not None:
        sid, project = manifest.service_id, manifest.project_root
    else:
        project = check_path_text(canonical_project(args.project or os.getcwd()), "project folder")
        sid = validate_service_id(args.name) if args.name else derive_service_id(project)
    interval = parse_interval(args.interval) if args.interval else (manifest.interval_seconds if manifest else None)
    for value, what in ((args.image, "--image"), (args.program, "--program"), (args.lore, "--lore")):
        check_path_text(value, what)
    mount = check_path_text(args.mount_path, "--mount-path")
    if not mount.startswith("/") or mount.rstrip("/") in ("", "/tmp"):
        raise UsageError(f"--mount-path {mount!r} must be an absolute folder other than / and /tmp", "", code="usage")
    if args.namespace:
        check_dns_label(args.namespace, "--namespace")
    if args.secret_name:
        check_dns_label(args.secret_name, "--secret-name")
    resources = {key: check_quantity(getattr(args, key.replace("-", "_")), f"--{key}") for key in K8S_RESOURCES}
    return KubernetesExport(
        service_id=sid,
        project_root=project,
        interval_seconds=interval or DEFAULT_INTERVAL,
        profile=args.profile or (manifest.profile if manifest else DEFAULT_PROFILE),
        token_env=validate_env_name(args.token_env or (manifest.token_env if manifest else DEFAULT_TOKEN_ENV)),
        image=args.image,
        namespace=args.namespace,
        storage_class=args.storage_class,
        storage_size=check_quantity(args.storage_size, "--storage-size"),
        secret_name=args.secret_name,
        mount_path=mount.rstrip("/"),
        program=args.program,
        lore=args.lore,
        resources=resources,
        status_job=bool(args.status_job),
    )


def _guarded_report(ctx: Context, manifest: Manifest) -> ServiceReport | Check:
    """The service as `status` sees it, or the failing check that says why it cannot be had."""
    try:
        return service_report(ctx, manifest)
    except LoreServiceError as exc:
        return Check("freshness", "fail", exc.message, exc.hint)


def _guarded(name: str, checks: Callable[[], list[Check]]) -> list[Check]:
    """A group of doctor's checks; one that cannot even be made is a failing
    check, so doctor lists everything instead of stopping at the first error."""
    try:
        return checks()
    except LoreServiceError as exc:
        return [Check(name, "fail", exc.message, exc.hint)]
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return [Check(name, "fail", f"{exc.strerror or exc}{where}", "check the owner and permissions of that path")]


HANDLERS: dict[str, Callable[[Context, argparse.Namespace], Outcome]] = {
    "install": cmd_install,
    "uninstall": cmd_uninstall,
    "status": cmd_status,
    "list": cmd_list,
    "run": cmd_run,
    "trigger": cmd_trigger,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "logs": cmd_logs,
    "history": cmd_history,
    "doctor": cmd_doctor,
    "export": cmd_export,
    "token": cmd_token,
}


# -- the terminal: what it can show, colours, outcome marks, live progress ------------


@record
class Console:
    """What the stream people read can show, decided once per command from
    the stream and the environment (both through System, so tests choose).
    Escape codes (colour) only at a terminal, and never under NO_COLOR or
    TERM=dumb; a TERM=dumb terminal gets no carriage-return redraws either.
    The symbols (MARKS, the spinner) only where stdout's encoding can write
    them and the locale is not C/POSIX (Python writes UTF-8 under the C
    locale, but the terminal does not show it); ASCII stand-ins otherwise."""

    tty: bool = False
    color: bool = False
    unicode: bool = False
    dumb: bool = False


# SGR colours
GREEN, YELLOW, RED, CYAN, DIM = "32", "33", "31", "36", "2"
STATE_COLORS = {
    "healthy": GREEN,
    "degraded": YELLOW,
    "backoff": YELLOW,
    "stale": YELLOW,
    "paused": RED,
    "error": RED,
    "running": CYAN,
}
OUTCOME_COLORS = {"success": GREEN, "degraded": YELLOW, "failed": RED, "timeout": RED, "skipped": DIM}
# a run's or a stage's outcome as one character: (symbol, ASCII stand-in)
MARKS = {
    "success": ("\u2714", "+"),  # ✔
    "degraded": ("\u25d0", "~"),  # ◐
    "failed": ("\u2718", "x"),  # ✘
    "timeout": ("\u2718", "x"),
    "skipped": ("\u25cb", "-"),  # ○
}
SPINNERS = ("\u280b\u2819\u2839\u2838\u283c\u2834\u2826\u2827\u2807\u280f", "|/-\\")  # braille dots, or ASCII
_SYMBOLS = "".join(symbol for symbol, _ in MARKS.values()) + SPINNERS[0]


def console_of(system: System, stream: Any) -> Console:
    env = system.environ
    tty = system.isatty(stream)
    dumb = env.get("TERM", "") == "dumb"
    color = tty and not dumb and not env.get("NO_COLOR") and system.enable_colors(stream)
    return Console(tty, color, _shows_symbols(system, stream), dumb)


def _shows_symbols(system: System, stream: Any) -> bool:
    try:
        _SYMBOLS.encode(getattr(stream, "encoding", None) or "ascii")
    except (LookupError, UnicodeError):
        return False
    env = system.environ
    # the locale as a C program on this terminal sees it (Windows has no such variables)
    locale = env.get("LC_ALL") or env.get("LC_CTYPE") or env.get("LANG") or ("" if system.platform == "win32" else "C")
    return locale not in ("C", "POSIX")


def mark(outcome: str, console: Console) -> str:
    symbol, ascii_mark = MARKS.get(outcome, ("?", "?"))
    return symbol if console.unicode else ascii_mark


class Painted:
    """Text for people with some pieces in colour. Each piece is made
    terminal-safe on its own and the colours are only ever ours, so no escape
    sequence of a stage, a path or a pause reason reaches the terminal;
    `plain` is the same text without colour (for a pipe, NO_COLOR,
    TERM=dumb)."""

    def __init__(self, text: str = "", color: str = "") -> None:
        self.pieces: list[tuple[str, str]] = []
        self.add(text, color)

    def add(self, text: str, color: str = "") -> Painted:
        if text:
            self.pieces.append((text, color))
        return self

    def extend(self, other: Painted) -> Painted:
        self.pieces += other.pieces
        return self

    @property
    def plain(self) -> str:
        return "".join(text for text, _ in self.pieces)

    def render(self, color: bool) -> str:
        return "".join(
            f"\x1b[{c}m{terminal_safe(text)}\x1b[0m" if color and c else terminal_safe(text) for text, c in self.pieces
        )


def fit_width(text: str, columns: int) -> tuple[str, int]:
    """The longest start of `text` that fills at most `columns` terminal
    columns (East Asian wide characters take two, combining marks none),
    and the columns it fills."""
    import unicodedata

    used = 0
    for i, ch in enumerate(text):
        width = 0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
        if used + width > columns:
            return text[:i], used
        used += width
    return text, used


class LiveProgress(RunObserver):
    """`trigger` at a terminal: the running stage on one line redrawn in place
    (spinner, name, elapsed time and its latest output line, redacted by the
    run, made terminal-safe and cut to the terminal's width), then one line
    per finished stage (mark, name, duration, outcome). The pump threads only
    note the latest line; one ticker thread redraws ten times a second, and
    every write holds the lock, so lines never interleave. The redraw is a
    carriage return and spaces, not an escape code, so it works under
    NO_COLOR too; at a TERM=dumb terminal there are plain lines instead. A
    terminal that goes away (EIO, a closed pipe) only silences it: the run
    goes on and is recorded."""

    TICK_SECONDS = 0.1

    def __init__(self, system: System, stream: Any, console: Console) -> None:
        import threading

        self.system, self.stream, self.console = system, stream, console
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.ticker: threading.Thread | None = None
        self.stage: str | None = None
        self.begun = 0.0
        self.latest = ""
        self.frame = 0
        self.drawn = 0  # columns the live line fills now
        self.ticks = 0
        self.broken = False
        self.shown = False  # a finished line was printed: the run's summary need not list the stages again

    def stage_started(self, stage: str) -> None:
        import threading

        with self.lock:
            self.stage, self.begun, self.latest, self.frame = stage, self.system.monotonic(), "", 0
            if self.console.dumb:
                self._write(f"{stage} ...\n")
            else:
                self._draw()
        if self.ticker is None and not self.console.dumb:
            self.ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self.ticker.start()

    def stage_output(self, stage: str, line: str) -> None:
        with self.lock:
            if stage == self.stage:
                self.latest = line

    def stage_finished(self, result: StageResult) -> None:
        with self.lock:
            self.stage = None
            self._clear()
            took = human_duration(result.duration_ms / 1000)
            line = Painted(mark(result.outcome, self.console), OUTCOME_COLORS.get(result.outcome, ""))
            line.add(f" {result.stage:<11}{took:>6}  ").add(result.outcome, OUTCOME_COLORS.get(result.outcome, ""))
            line.add("" if result.outcome == "success" else f": {result.message}")
            self._write(line.render(self.console.color) + "\n")
            self.shown = True

    def close(self) -> None:
        self.done.set()
        if self.ticker is not None:
            self.ticker.join(timeout=5)
        with self.lock:
            self._clear()

    def _tick(self) -> None:
        while not self.done.wait(self.TICK_SECONDS):
            with self.lock:
                self.ticks += 1
                if self.stage is not None:
                    self.frame += 1
                    self._draw()

    def _draw(self) -> None:
        """The live line, from the start of the row."""
        width = max(20, (self.system.terminal_columns(self.stream) or 80) - 1)  # the last column would wrap
        spinner = SPINNERS[0 if self.console.unicode else 1]
        elapsed = human_duration(self.system.monotonic() - self.begun)
        head = f"{spinner[self.frame % len(spinner)]} {self.stage:<11}{elapsed:>6}  "
        head, used = fit_width(head, width)
        latest, more = fit_width(terminal_safe(self.latest.replace("\t", " ")), width - used)
        line = Painted(head[:1], CYAN).add(head[1:]).add(latest, DIM)
        # spaces wipe the rest of the last frame, up to the width: past it they would wrap
        self._write("\r" + line.render(self.console.color) + " " * max(0, min(self.drawn, width) - used - more))
        self.drawn = used + more

    def _clear(self) -> None:
        if self.drawn:
            self._write("\r" + " " * self.drawn + "\r")
            self.drawn = 0

    def _write(self, text: str) -> None:
        if self.broken:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.broken = True


def live_progress(ctx: Context) -> LiveProgress | None:
    """A view of the run for a person at a terminal; none for robots, pipes,
    files, or a container whose log lines already go to stdout."""
    if ctx.robot or not ctx.console.tty or ctx.system.environ.get("LORE_SERVICE_LOG_STDOUT") == "1":
        return None
    return LiveProgress(ctx.system, ctx.out, ctx.console)


# -- output and main ---------------------------------------------------------------


def build_stamp() -> dict[str, str | None]:
    """The git commit and build date build.py baked into a release (its generated
    lore_service_build module, bundled next to this one); from source both are
    None: a checkout's commit is not what is running once files are edited."""
    try:
        import lore_service_build as stamp
    except ImportError:
        return {"commit": None, "build_date": None}
    return {"commit": getattr(stamp, "COMMIT", None), "build_date": getattr(stamp, "BUILD_DATE", None)}


def version_info(system: System) -> dict[str, Any]:
    import platform

    bundle = running_bundle()
    return {
        "version": __version__,
        **build_stamp(),
        "frozen": bundle.kind in ("onedir", "onefile"),
        "layout": bundle.kind,  # onedir | onefile (PyInstaller), zipapp, source
        "python": platform.python_version(),
        "platform": f"{system.platform}-{platform.machine()}",
        "executable": bundle_command(bundle)[0],
    }


def _emit(
    robot: bool, command: str, outcome: Outcome | None, error: LoreServiceError | None, console: Console | None = None
) -> None:
    if robot:
        if error is None:
            doc: dict[str, Any] = {"ok": True, "command": command, "data": outcome.data if outcome else {}}
        else:
            doc = {
                "ok": False,
                "command": command,
                "error": error.payload(),
            }
            if error.data is not None:
                doc["data"] = error.data
        # \u escapes: one document that survives any stdout encoding (cp1252 pipes)
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    # human output may quote stage output, a pause reason or a path: no escape
    # sequence in them may reach the terminal (JSON escapes them on its own)
    if outcome is not None and outcome.text:
        if outcome.painted is not None and console is not None and console.color:
            sys.stdout.write(outcome.painted.render(True) + "\n")
        else:
            sys.stdout.write(terminal_safe(outcome.text) + "\n")
    if error is not None:
        if error.text:
            sys.stdout.write(terminal_safe(error.text) + "\n")
        sys.stderr.write(f"error: {terminal_safe(error.message)}\n")
        if error.hint:
            sys.stderr.write(f"hint: {terminal_safe(error.hint)}\n")


# C0 controls but tab and newline, DEL and the C1 controls (CSI, OSC, ... as
# one character) are shown as \xNN escapes, never sent to the terminal
_TERMINAL_UNSAFE = {c: f"\\x{c:02x}" for c in (*range(9), *range(11, 32), *range(127, 160))}


def terminal_safe(text: str) -> str:
    return text.translate(_TERMINAL_UNSAFE)


def _console_less_sink(system: System) -> Any:
    """`<log root>/console-less.log` (kept under 1 MiB), or nowhere if it cannot be had."""
    try:
        paths = Paths(system)
        path = os.path.join(paths.log_root, "console-less.log")
        ensure_dir(paths.log_root)
        trim_crash_log(path)
        fd = open_trusted(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "console-less log")
        if fd is not None:
            return os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace")
    except (LoreServiceError, OSError):
        pass
    return open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115  (lives as long as the process)


def _help_text(argv: list[str]) -> str:
    """What --help prints, captured (robot mode answers it in the envelope)."""
    import contextlib
    import io

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        try:
            build_parser().parse_args(argv)
        except _ParserExit:
            pass
    return captured.getvalue()


def main(argv: Sequence[str] | None = None, system: System | None = None) -> int:
    """Entry point: parse, dispatch, print; the only place errors become exit codes."""
    # pythonw.exe / lore-service-w.exe (what Task Scheduler starts) have no
    # console: their streams are None, so what they would print (an error
    # before the service log opens) goes to a small file next to the logs
    if sys.stdout is None or sys.stderr is None:
        sink = _console_less_sink(system or System())
        sys.stdout, sys.stderr = sys.stdout or sink, sys.stderr or sink
    for stream in (sys.stdout, sys.stderr):  # a path with é on an ASCII terminal is not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args_in = list(sys.argv[1:] if argv is None else argv)
    cut = args_in.index("--") if "--" in args_in else len(args_in)
    robot = any(a in ("--json", "--robot") for a in args_in[:cut])
    args_in = [a for i, a in enumerate(args_in) if i >= cut or a not in ("--json", "--robot")]
    # best guess until argparse has spoken (a usage error still names its command)
    command = next((a for a in args_in[:cut] if a in COMMANDS), "")
    try:
        try:
            if robot and any(a in ("-h", "--help") for a in args_in[:cut]):
                _emit(robot, command or "help", Outcome({"help": _help_text(args_in)}), None)
                return EXIT_OK
            args = parse_arguments(args_in, command)
        except _ParserExit as exc:  # --help
            return exc.status
        command = args.command or command
        if args.version:
            info = version_info(system or System())
            built = f"; commit {info['commit']}, built {info['build_date']}" if info["commit"] else ""
            text = (
                f"{TOOL_NAME} {info['version']} ({'frozen' if info['frozen'] else 'source'}, "
                f"Python {info['python']}, {info['platform']}{built})"
            )
            _emit(robot, "version", Outcome(info, text), None)
            return EXIT_OK
        if not args.command:
            raise UsageError("no command given", f"`{TOOL_NAME} --help` lists the commands")
        system = system or System()
        ctx = Context(system, Paths(system, getattr(args, "home", None)), robot, sys.stdout)
        ctx.console = Console() if robot else console_of(system, ctx.out)
        outcome = HANDLERS[args.command](ctx, args)
        _emit(robot, command, outcome, None, ctx.console)
        return EXIT_OK
    except LoreServiceError as exc:
        _emit(robot, command, None, exc)
        return exc.exit_code
    except KeyboardInterrupt:
        _emit(robot, command, None, LoreServiceError("interrupted", "run the command again", code="interrupted"))
        return EXIT_FAILED
    except RunStopped as exc:  # defensive: the stages catch and record every stop themselves
        _emit(robot, command, None, LoreServiceError(f"stopped by signal {exc.signum}", "", code="stopped"))
        return EXIT_FAILED
    except BrokenPipeError:  # the reader went away (`logs --follow | head`): nothing left to say
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no noise at interpreter exit
        except (OSError, ValueError):
            pass
        return EXIT_OK
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        err = LoreServiceError(
            f"{exc.strerror or exc}{where}", "check permissions and free disk space", code="os_error"
        )
        _emit(robot, command, None, err)
        return EXIT_FAILED
    except Exception as exc:  # the promise: never a traceback for any input
        if (system.environ if system else os.environ).get("LORE_SERVICE_DEBUG"):
            raise
        err = LoreServiceError(
            f"internal error: {exc.__class__.__name__}: {exc}",
            "please report this; LORE_SERVICE_DEBUG=1 shows the traceback",
            code="internal",
        )
        _emit(robot, command, None, err)
        return EXIT_FAILED


# ============================================================================
# 9. Platform appendix: the System seam, files, paths, locks, logs, secrets, pinning
# ============================================================================


# ----------------------------------------------------------------------------
# 9a. System: every OS interaction goes through one injectable object
# ----------------------------------------------------------------------------


@record
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def summary(self) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return text[-1] if text else f"exit status {self.returncode}"


class System:
    """Clock, randomness, environment and processes.

    Tests subclass this (or swap single methods) instead of patching the
    standard library; production code never calls subprocess, time or random
    directly.
    """

    # Facts of the OS this process really runs on, for mechanics a test cannot
    # fake (file locks, fsync of folders, executable names). What lore-service
    # renders and says follows `platform` instead, which tests do fake.
    windows: ClassVar[bool] = sys.platform == "win32"
    exe_suffix: ClassVar[str] = ".exe" if sys.platform == "win32" else ""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        # a frozen build must not hand its bundle's library path to lore or systemctl
        self.environ: dict[str, str] = frozen_child_environ(dict(os.environ)) if environ is None else environ
        self._rng: Any = None
        # where Linux's power supplies are read (class/power_supply); tests and a
        # diagnosis point it at a tree of their own (LORE_SERVICE_SYSFS)
        self.sysfs_root = self.environ.get("LORE_SERVICE_SYSFS") or "/sys"
        self.linger_dir = "/var/lib/systemd/linger"  # where logind records who lingers (a file per user)
        self.answers: dict[str, CommandResult] | None = None  # ask()'s memo, while a command turns it on

    def lingering(self, user: str) -> bool | None:
        """Whether logind keeps the user's manager running while logged out, as
        its records say (read, not asked: status reads it for every service);
        None where there are no such records (no logind)."""
        if not os.path.isdir(self.linger_dir):
            return None
        return os.path.exists(os.path.join(self.linger_dir, user))

    # -- platform and identity
    @property
    def platform(self) -> str:
        return sys.platform

    def uid(self) -> int:
        return os.getuid() if hasattr(os, "getuid") else 0

    def euid(self) -> int:
        return os.geteuid() if hasattr(os, "geteuid") else 0

    def console_owner_uid(self) -> int | None:
        """Owner of /dev/console (on macOS: who is logged in at the screen)."""
        try:
            return os.stat("/dev/console").st_uid
        except OSError:
            return None

    def username(self) -> str:
        for key in ("USER", "LOGNAME", "USERNAME"):
            if self.environ.get(key):
                return self.environ[key]
        try:
            import pwd

            return pwd.getpwuid(self.uid()).pw_name
        except (ImportError, KeyError):
            return "unknown"

    # -- time and randomness
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def uniform(self, low: float, high: float) -> float:
        if self._rng is None:
            import random

            self._rng = random.SystemRandom()
        return self._rng.uniform(low, high)

    # -- programs
    def which(self, name: str) -> str | None:
        import shutil

        return shutil.which(name, path=self.environ.get("PATH", os.defpath))

    def ask(
        self, argv: Sequence[str], *, timeout: float = 60.0, keep_newlines: bool = False, console: bool = False
    ) -> CommandResult:
        """run() of a question that changes nothing (`crontab -l`, `pgrep`,
        `schtasks /Query`). While a command has set `answers` (doctor, whose
        checks and report ask the same things) each is asked once."""
        if self.answers is None:
            return self.run(argv, timeout=timeout, keep_newlines=keep_newlines, console=console)
        key = repr((list(argv), keep_newlines, console))
        if key not in self.answers:
            self.answers[key] = self.run(argv, timeout=timeout, keep_newlines=keep_newlines, console=console)
        return self.answers[key]

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
        keep_newlines: bool = False,
        console: bool = False,
    ) -> CommandResult:
        """Run a short command (scheduler tools) and capture its output as
        UTF-8 text (console: a Windows console tool's output, which may be
        UTF-16 or in the OEM code page; see decode_console) (bad bytes become U+FFFD: localised tool output must not
        crash a status). Line ends are normalised to \\n unless keep_newlines
        (a crontab's \\r bytes are the user's, and must survive a rewrite)."""
        import subprocess

        argv = list(argv)
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":  # the no-console build's children must not flash a console either
            kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW
        try:
            proc = subprocess.run(
                argv,
                input=None if input is None else input.encode("utf-8"),
                capture_output=True,
                env=self.environ if env is None else env,
                timeout=timeout,
                stdin=None if input is not None else subprocess.DEVNULL,
                **kwargs,
            )
        except FileNotFoundError:
            return CommandResult(argv, 127, "", f"{argv[0]}: command not found")
        except PermissionError as exc:
            return CommandResult(argv, 126, "", f"{argv[0]}: {exc.strerror}")
        except subprocess.TimeoutExpired:
            return CommandResult(argv, 124, "", f"{argv[0]}: timed out after {timeout:g}s")
        codepage = self.oem_codepage() if console else None
        out, err = decode_console(proc.stdout, codepage), decode_console(proc.stderr, codepage)
        if not keep_newlines:  # as text mode would
            out = out.replace("\r\n", "\n").replace("\r", "\n")
            err = err.replace("\r\n", "\n").replace("\r", "\n")
        return CommandResult(argv, proc.returncode, out, err)

    def spawn(self, argv: Sequence[str], *, cwd: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a stage in its own process group, output merged into one pipe."""
        import subprocess

        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":  # (not os.name: type checkers narrow on sys.platform)
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            **kwargs,
        )

    def kill_group(self, proc: subprocess.Popen[bytes], *, hard: bool) -> None:
        """Signal the stage's whole process group, grandchildren included."""
        self.kill_group_id(proc.pid, hard=hard)

    def kill_group_id(self, pgid: int, *, hard: bool) -> None:
        if self.windows:
            self.run(["taskkill", "/T", "/F", "/PID", str(pgid)], timeout=30)
            return
        import signal

        try:
            os.killpg(pgid, signal.SIGKILL if hard else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def oem_codepage(self) -> str | None:
        """The console's OEM code page (cp850, cp437, ...) a Windows tool writes in; None elsewhere."""
        if sys.platform != "win32":
            return None
        import ctypes

        return f"cp{ctypes.windll.kernel32.GetOEMCP()}"

    def access_denied_text(self) -> str:
        """Windows's own wording of ERROR_ACCESS_DENIED in the user's language
        (what schtasks prints), so it is recognised in any locale."""
        if sys.platform != "win32":
            return "Access is denied."
        import ctypes

        return ctypes.FormatError(5).strip()

    def can_write(self, folder: str) -> bool:
        """Whether this process may create files in a folder, or in its parent
        when it does not exist yet (False on a read-only mount, e.g. outside
        a systemd sandbox's ReadWritePaths=)."""
        return os.access(folder if os.path.isdir(folder) else os.path.dirname(folder), os.W_OK)

    def can_list(self, folder: str) -> bool:
        """Whether this process may read a folder (macOS privacy protection answers EPERM)."""
        try:
            os.listdir(folder)
        except OSError:
            return False
        return True

    @staticmethod
    def lock_fd(fd: int, blocking: bool) -> bool:
        """An exclusive lock on an open file that dies with the process (flock; msvcrt on Windows)."""
        if sys.platform == "win32":  # (not `windows`: type checkers narrow on sys.platform only)
            import msvcrt

            mode = msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK
            try:
                msvcrt.locking(fd, mode, 1)
                return True
            except OSError:
                return False
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False

    def terminate(self, pid: int) -> None:
        """Ask a process to stop as a scheduler would (SIGTERM; taskkill on Windows)."""
        if self.windows:
            self.run(["taskkill", "/PID", str(pid)], timeout=30)
            return
        import signal

        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def pid_alive(pid: int) -> bool:
        """Whether a process exists (on Windows always True: os.kill(pid, 0)
        there would end the process, so callers fall back to other evidence)."""
        if System.windows:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # exists, but not ours to signal
            return True
        return True

    def read_proc_environ(self, pid: int) -> list[bytes] | None:
        """A process's environment (Linux /proc), or None when it cannot be read."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                return fh.read().split(b"\0")
        except OSError:
            return None

    def on_stop_signals(self, handler: Callable[[int, Any], None]) -> Callable[[], None]:
        """Send SIGTERM (a scheduler's stop), SIGINT (Ctrl-C) and SIGHUP (the
        terminal went away) to `handler` until the returned function is
        called. Main thread only, as Python's signal handlers; Windows
        schedulers end a task without a signal to catch."""
        import signal
        import threading

        if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
            return lambda: None
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = [(signum, signal.signal(signum, handler)) for signum in signals]

        def restore() -> None:
            for signum, old in previous:
                signal.signal(signum, old)

        return restore

    def stop_on_ctrl_c(self) -> None:
        """SIGINT raises KeyboardInterrupt even when this process inherited it
        ignored (as a background job of a script does): `logs --follow` ends on it."""
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def make_undumpable(self) -> None:
        """No core dump (and, on Linux, no ptrace or /proc reads by other
        processes of the user) of a process that holds the token."""
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (ImportError, ValueError, OSError):
            pass  # Windows has no core dumps to speak of
        if sys.platform.startswith("linux"):
            import ctypes

            PR_SET_DUMPABLE = 4
            try:
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
            except (OSError, AttributeError):
                pass

    # -- alerts (section 4b): where a notification can go, and the network
    def desktop_session(self) -> str | None:
        """How this process reaches the user's desktop, or None: on Linux the
        session bus address (DBUS_SESSION_BUS_ADDRESS, else $XDG_RUNTIME_DIR/bus
        when that socket exists), on macOS "gui" when this user is at the
        console, on Windows "desktop" (a task runs in its user's session)."""
        if self.platform.startswith("linux"):
            address = self.environ.get("DBUS_SESSION_BUS_ADDRESS", "")
            runtime = self.environ.get("XDG_RUNTIME_DIR", "")
            if not address and runtime and os.path.exists(os.path.join(runtime, "bus")):
                address = "unix:path=" + os.path.join(runtime, "bus")
            return address or None
        if self.platform == "darwin":
            return "gui" if self.console_owner_uid() == self.uid() else None
        return "desktop" if self.platform == "win32" else None

    def hostname(self) -> str:
        import socket

        return socket.gethostname()

    def http_post(self, url: str, body: bytes, content_type: str, timeout: float) -> str | None:
        """POST body to url, straight (no proxy, no redirect to follow); None
        when the server answers 2xx, else why not. The reason never holds
        the URL, which carries a secret."""
        import http.client
        import urllib.parse

        parts = urllib.parse.urlsplit(url)
        kind = http.client.HTTPSConnection if parts.scheme.lower() == "https" else http.client.HTTPConnection
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn = kind(parts.hostname or "", parts.port, timeout=timeout)
        try:
            headers = {"Content-Type": content_type, "User-Agent": f"{TOOL_NAME}/{__version__}"}
            conn.request("POST", path, body=body, headers=headers)
            answer = conn.getresponse()
            answer.read(4096)
            return None if 200 <= answer.status < 300 else f"HTTP {answer.status} {answer.reason}".strip()
        except TimeoutError:
            return f"no answer within {timeout:g} s"
        except (OSError, http.client.HTTPException) as exc:
            return getattr(exc, "strerror", None) or type(exc).__name__
        finally:
            conn.close()

    # -- conditions of the machine: what section 4's check_conditions and doctor ask
    def power_source(self) -> tuple[str, str]:
        """("ac" | "battery" | "unknown", where the answer came from); unknown counts as AC.
        Linux reads the kernel's power supplies, macOS asks pmset, Windows GetSystemPowerStatus."""
        if self.platform.startswith("linux"):
            return power_from_sysfs(os.path.join(self.sysfs_root, "class", "power_supply"))
        if self.platform == "darwin":
            result = self.run(["pmset", "-g", "ps"], timeout=5)
            return power_from_pmset(result.stdout) if result.ok else ("unknown", f"pmset: {result.summary()}")
        if self.platform == "win32":
            raw = self.windows_power_status()
            return power_from_power_status(raw) if raw else ("unknown", "GetSystemPowerStatus gave no answer")
        return "unknown", f"no power source query on {self.platform}"

    def windows_power_status(self) -> bytes | None:
        """GetSystemPowerStatus's SYSTEM_POWER_STATUS as its 12 raw bytes (None elsewhere or when it fails)."""
        if sys.platform != "win32":
            return None
        import ctypes

        buffer = ctypes.create_string_buffer(12)
        if not ctypes.windll.kernel32.GetSystemPowerStatus(buffer):
            return None
        return buffer.raw

    def metered(self) -> tuple[bool | None, str]:
        """(whether the connection is metered, None when the OS does not say; where
        the answer came from); unknown counts as unmetered. NetworkManager on Linux,
        the connection cost API on Windows."""
        if self.platform.startswith("linux"):
            if self.which("nmcli") is None:
                return None, "no NetworkManager: nmcli not found"
            result = self.run(NMCLI_METERED, timeout=5)
            return metered_from_nmcli(result.stdout) if result.ok else (None, f"nmcli: {result.summary()}")
        if self.platform == "win32":  # Windows PowerShell, not pwsh: only it loads WinRT types
            result = self.run(WINDOWS_COST_COMMAND, timeout=20, console=True)
            return metered_from_cost_type(result.stdout) if result.ok else (None, f"powershell: {result.summary()}")
        return None, f"{self.platform} does not say whether a connection is metered"

    def reachable(self, host: str, port: int, timeout: float) -> str | None:
        """None when a TCP connection to host:port opens within `timeout` seconds,
        the name lookup included; else what failed, in words."""
        import socket
        import threading

        deadline = time.monotonic() + timeout
        found: list[Any] = []

        def resolve() -> None:
            try:
                found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
            except (OSError, UnicodeError) as exc:
                found.append(exc)

        # getaddrinfo has no timeout of its own (a resolver may retry for 10 s and more)
        worker = threading.Thread(target=resolve, daemon=True)
        worker.start()
        worker.join(timeout)
        if not found:
            return f"cannot resolve {host}: no answer within {timeout:g} s"
        if isinstance(found[0], BaseException):
            return f"cannot resolve {host}: {_os_reason(found[0])}"
        problem = "no address"
        for family, kind, proto, _name, address in found[0]:
            left = deadline - time.monotonic()
            if left <= 0:
                problem = f"no answer within {timeout:g} s"
                break
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(left)
                try:
                    sock.connect(address)
                    return None
                except OSError as exc:
                    problem = _os_reason(exc)
        return f"cannot connect to {host_port(host, port)}: {problem}"

    def inhibit_sleep(self, why: str) -> SleepHold:
        """Hold off system sleep until the hold is released (or this process
        ends, however it ends): logind through systemd-inhibit on Linux,
        caffeinate on macOS, SetThreadExecutionState on Windows."""
        if self.platform == "win32":
            flags = ES_CONTINUOUS | ES_SYSTEM_REQUIRED
            if not self.set_thread_execution_state(flags):
                return SleepHold("SetThreadExecutionState", "SetThreadExecutionState is not available here")

            def back_to_normal() -> None:
                self.set_thread_execution_state(ES_CONTINUOUS)

            return SleepHold("SetThreadExecutionState", release=back_to_normal)
        argv = sleep_inhibitor_argv(self.platform, os.getpid(), why)
        if argv is None:
            return SleepHold("nothing", f"no sleep inhibitor on {self.platform}")
        exe = self.which(argv[0])
        if exe is None:
            return SleepHold(argv[0], f"{argv[0]} not found")
        return self._hold_with([exe, *argv[1:]], argv[0])

    def _hold_with(self, argv: list[str], name: str) -> SleepHold:
        """Start the inhibitor in a session of its own (a Ctrl-C or a stage's
        group kill does not reach it); systemd-inhibit says "held" once logind
        granted the lock, or ends saying why not."""
        import subprocess

        pipe = subprocess.PIPE
        try:
            helper = subprocess.Popen(
                argv, stdin=pipe, stdout=pipe, stderr=pipe, env=self.environ, start_new_session=True
            )
        except OSError as exc:
            return SleepHold(name, f"cannot start {name}: {exc.strerror}")
        try:
            problem = self._await_held(helper, name, INHIBIT_ANSWER_SECONDS) if name == "systemd-inhibit" else None
        except OSError as exc:  # reading its answer failed: end it, or it would keep the machine awake
            problem = f"{name}: {_os_reason(exc)}"
        hold = SleepHold(name, problem, release=lambda: self._end_helper(helper))
        if problem:
            hold.release()
        return hold

    @staticmethod
    def _await_held(helper: subprocess.Popen[bytes], name: str, timeout: float) -> str | None:
        """None once the inhibitor printed "held"; else why it did not (its own last
        error line, or no answer in time: logind may be hung)."""
        import select
        import subprocess

        assert helper.stdout is not None
        fd, got, deadline = helper.stdout.fileno(), b"", time.monotonic() + timeout
        while b"\n" not in got:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return f"{name} did not answer within {timeout:g} s"
            chunk = os.read(fd, 256)
            if not chunk:
                break
            got += chunk
        if got.split(b"\n")[0].strip() == b"held":
            return None
        try:
            _out, err = helper.communicate(timeout=1)
        except subprocess.TimeoutExpired:
            return f"{name} said {got.decode('utf-8', 'replace').strip()!r} instead of taking the lock"
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return f"{name}: {lines[-1]}" if lines else f"{name} exited with status {helper.returncode}"

    def _end_helper(self, helper: subprocess.Popen[bytes]) -> None:
        """End the inhibitor and the command it runs: their input ends, then SIGTERM to their group."""
        import subprocess

        if helper.stdin is not None:
            helper.stdin.close()
        # only a helper not yet reaped is signalled: until then its pid, and so its
        # group's id, cannot belong to another process
        if helper.poll() is None:
            self.kill_group_id(helper.pid, hard=False)
        try:
            helper.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill_group_id(helper.pid, hard=True)
            helper.wait()
        for stream in (helper.stdout, helper.stderr):
            if stream is not None:
                stream.close()

    def set_thread_execution_state(self, flags: int) -> int:
        """Windows's SetThreadExecutionState (0: failed, or not Windows)."""
        if sys.platform != "win32":
            return 0
        import ctypes

        kernel32 = ctypes.windll.kernel32
        kernel32.SetThreadExecutionState.restype = ctypes.c_uint
        return int(kernel32.SetThreadExecutionState(ctypes.c_uint(flags)))

    # -- terminal
    def stdin_isatty(self) -> bool:
        return sys.stdin is not None and sys.stdin.isatty()

    def isatty(self, stream: Any) -> bool:
        try:
            return bool(stream.isatty())
        except (AttributeError, OSError, ValueError):  # a closed or fd-less stream
            return False

    def enable_colors(self, stream: Any) -> bool:
        """Whether the terminal `stream` writes to takes SGR colour codes. A
        Windows console does only once asked to (virtual terminal processing,
        Windows 10 and later); every Unix terminal but TERM=dumb does."""
        if not self.windows:
            return True
        try:
            import ctypes
            import msvcrt

            kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined,unused-ignore]
            handle = msvcrt.get_osfhandle(stream.fileno())  # type: ignore[attr-defined,unused-ignore]
            mode = ctypes.c_uint32()
            if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
                return False
            return bool(kernel32.SetConsoleMode(handle, mode.value | 0x0004))  # ENABLE_VIRTUAL_TERMINAL_PROCESSING
        except (AttributeError, OSError, ValueError, ImportError):
            return False

    def terminal_columns(self, stream: Any) -> int | None:
        """The width of the terminal `stream` writes to, asked anew each time
        (a window may be resized mid-run); else COLUMNS; else None."""
        try:
            return os.get_terminal_size(stream.fileno()).columns or None
        except (AttributeError, OSError, ValueError):
            pass
        columns = self.environ.get("COLUMNS", "")
        return int(columns) if columns.isascii() and columns.isdigit() and len(columns) <= 4 and int(columns) else None

    def read_stdin(self) -> str:
        return sys.stdin.read() if sys.stdin is not None else ""

    def prompt_secret(self, prompt: str) -> str:
        import getpass

        return getpass.getpass(prompt)


# What the machine's conditions look like to each OS (System.power_source,
# metered, inhibit_sleep): the commands asked, and parsers of their answers.

NMCLI_METERED = [
    "nmcli", "-t", "-f", "GENERAL.DEVICE,GENERAL.TYPE,GENERAL.STATE,GENERAL.METERED,IP4.GATEWAY,IP6.GATEWAY",
    "device", "show",
]  # fmt: skip
WINDOWS_COST_COMMAND = [
    "powershell.exe", "-NoProfile", "-NonInteractive", "-Command",
    "$null = [Windows.Networking.Connectivity.NetworkInformation,Windows.Networking.Connectivity,"
    "ContentType=WindowsRuntime]; $p = [Windows.Networking.Connectivity.NetworkInformation]::"
    "GetInternetConnectionProfile(); if ($p) { $p.GetConnectionCost().NetworkCostType.ToString() }",
]  # fmt: skip
ES_CONTINUOUS = 0x80000000
ES_SYSTEM_REQUIRED = 0x00000001


class SleepHold:
    """A hold on system sleep while the stages run: held, or why not (`problem`).
    release() ends it; a second release does nothing."""

    def __init__(self, how: str, problem: str | None = None, release: Callable[[], None] | None = None) -> None:
        self.how = how
        self.problem = problem
        self._release = release

    @property
    def held(self) -> bool:
        return self.problem is None

    def release(self) -> None:
        done, self._release = self._release, None
        if done is not None:
            done()


# logind grants an inhibitor in milliseconds; this much covers a slow start of
# systemd-inhibit on a loaded machine, and only a hung logind costs it in full
INHIBIT_ANSWER_SECONDS = 5.0


def sleep_inhibitor_argv(platform: str, pid: int, why: str) -> list[str] | None:
    """The command that holds off sleep for as long as it runs, or None where a
    command does not (Windows: a call, SetThreadExecutionState)."""
    if platform.startswith("linux"):
        # systemd-inhibit takes logind's lock, then runs its command: `sh` says
        # "held", and `cat` waits on a pipe only the run holds open, so the lock
        # ends with the run however it ends (on a SIGKILL the pipe closes too)
        return [
            "systemd-inhibit", "--what=sleep", f"--who={TOOL_NAME}", f"--why={why}", "--mode=block",
            "sh", "-c", "echo held && exec cat >/dev/null",
        ]  # fmt: skip
    if platform == "darwin":  # -i: no idle sleep; -w: ends by itself when the run's process does
        return ["caffeinate", "-i", "-w", str(pid)]
    return None


def _os_reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def power_from_sysfs(folder: str) -> tuple[str, str]:
    """Linux (the kernel's class/power_supply): AC when a Mains or USB supply is
    online; battery when none is and a battery of the system is discharging;
    else unknown. A device's own battery (a wireless mouse: scope Device) says
    nothing about the machine's power."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return "unknown", f"{folder} cannot be read"

    def attr(name: str, key: str) -> str:
        return (read_text(os.path.join(folder, name, key)) or "").strip()

    discharging = None
    for name in names:
        kind = attr(name, "type")
        if kind in ("Mains", "USB") and attr(name, "online") == "1":
            return "ac", f"{os.path.join(folder, name)} is online"
        if kind == "Battery" and attr(name, "scope") != "Device" and attr(name, "status") == "Discharging":
            discharging = discharging or name
    if discharging:
        return "battery", f"{os.path.join(folder, discharging)} is discharging"
    return "unknown", f"no supply online and no battery discharging in {folder}"


def power_from_pmset(text: str) -> tuple[str, str]:
    """macOS `pmset -g ps`: its first line, "Now drawing from 'AC Power'" (or
    'Battery Power', or 'UPS Power': a UPS's battery is a battery too)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    source = first.partition("'")[2].rpartition("'")[0]
    if source == "AC Power":
        return "ac", "pmset: drawing from AC Power"
    if source in ("Battery Power", "UPS Power"):
        return "battery", f"pmset: drawing from {source}"
    return "unknown", f"pmset said {first!r}" if first else "pmset said nothing"


def power_from_power_status(raw: bytes) -> tuple[str, str]:
    """Windows SYSTEM_POWER_STATUS (ACLineStatus, BatteryFlag, BatteryLifePercent,
    SystemStatusFlag: bytes; BatteryLifeTime, BatteryFullLifeTime: DWORDs)."""
    import struct

    if len(raw) < 12:
        return "unknown", "GetSystemPowerStatus gave a short answer"
    line, flag, percent, _saver, _life, _full = struct.unpack("<BBBBII", raw[:12])
    if line == 1:
        return "ac", "GetSystemPowerStatus: on AC power"
    if line == 0 and flag not in (128, 255):  # 128: no system battery, 255: unknown
        charge = f" ({percent}%)" if percent <= 100 else ""
        return "battery", f"GetSystemPowerStatus: on battery{charge}"
    return "unknown", f"GetSystemPowerStatus: AC line status {line}, battery flag {flag}"


def metered_from_nmcli(text: str) -> tuple[bool | None, str]:
    """NetworkManager (NMCLI_METERED's output): the connected devices that carry
    a default route (else all connected ones); metered when each of them is
    ("yes", or "yes (guessed)" as NetworkManager advises), since the traffic
    then cannot avoid a metered link."""
    devices: list[dict[str, str]] = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "GENERAL.DEVICE":
            devices.append({"name": value})
        elif devices:
            devices[-1][key] = value.strip()
    connected = [
        d for d in devices if d.get("GENERAL.STATE", "").startswith("100") and d.get("GENERAL.TYPE") != "loopback"
    ]
    gateway = ("IP4.GATEWAY", "IP6.GATEWAY")  # empty (or "--") without a default route
    routed = [d for d in connected if any(d.get(k, "") not in ("", "--") for k in gateway)] or connected
    if not routed:
        return None, "NetworkManager: no connected device"
    names = ", ".join(d["name"] for d in routed)
    if all(d.get("GENERAL.METERED", "").startswith("yes") for d in routed):
        return True, f"NetworkManager: {names} metered"
    return False, f"NetworkManager: {names} not metered"


def metered_from_cost_type(text: str) -> tuple[bool | None, str]:
    """Windows: the internet connection profile's NetworkCostType (Unrestricted,
    Fixed, Variable, Unknown); nothing when there is no internet connection."""
    word = text.strip()
    if word in ("Fixed", "Variable"):
        return True, f"Windows connection cost: {word}"
    if word == "Unrestricted":
        return False, "Windows connection cost: Unrestricted"
    return None, f"Windows connection cost: {word or 'no internet connection profile'}"


# ----------------------------------------------------------------------------
# 9b. Files and time: atomic writes, state reads, timestamps
# ----------------------------------------------------------------------------


def ensure_dir(path: str) -> None:
    """Create a folder and its missing parents, each private (0700).

    os.makedirs applies the mode to the last folder only."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if parent != path:
        ensure_dir(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def _fsync_dir(path: str) -> None:
    if System.windows:  # folders cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes | str, mode: int = 0o600) -> None:
    """Temp file in the same folder, fsync, rename over, fsync the folder."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    ensure_dir(folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    remove_file(tmp)  # our own pid's: a leftover of an earlier process that had it
    # O_EXCL and O_NOFOLLOW: a file or link planted under that name is never written through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed or widened O_CREAT
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)
    _sweep_stale_temps(folder, os.path.basename(path))


STALE_TEMP_SECONDS = 3600  # no write takes this long: an older temp file is a killed writer's


SECRET_FILES = ("token.env",)  # a temp copy of these must not outlive its writer


def _sweep_stale_temps(folder: str, name: str | None = None) -> None:
    """A writer killed mid-write leaves its `.<name>.<pid>.tmp` behind. The
    next write of the same file removes it once it is clearly stale; a copy
    of the token goes at any write in the folder as soon as its writer is
    gone; uninstall (name None) removes them all."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        base, dot, pid = entry.name[1:-4].rpartition(".")
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp") and dot):
            continue
        try:
            orphaned_secret = base in SECRET_FILES and not (pid.isdigit() and System.pid_alive(int(pid)))
            if name is None or orphaned_secret:
                gone = True
            else:
                gone = base == name and entry.stat(follow_symlinks=False).st_mtime < cutoff
            if gone:
                os.unlink(entry.path)
        except OSError:
            pass  # gone already, or not ours to remove


def decode_console(data: bytes, codepage: str | None = None) -> str:
    """A command's output: UTF-16 when it says so (a BOM, or NUL bytes of
    ASCII text), UTF-8 when it is valid, else the OEM code page given (a
    schtasks without a BOM), never an exception."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", "replace")
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", "replace")
    if data[1:2] == b"\x00":
        return data.decode("utf-16-le", "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode(codepage or "utf-8", "replace")


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError):
        return None


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _file_mode(path: str) -> int:
    """Permission bits of an existing file (0600 if there is none: the safe default)."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return 0o600


def file_differs(path: str, content: str) -> bool:
    """Whether writing content would change the file (re-install changes nothing)."""
    return read_text(path) != content


def remove_file(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


STATE_FILE_MAX_BYTES = 16 * 1024 * 1024  # status.json with 20 runs is a few KiB; larger is not ours


# open flags of every file lore-service reads or writes in its tree: a symlink
# in its place is an error, never followed; a FIFO never blocks the open
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
SAFE_OPEN = NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def untrusted(st: os.stat_result) -> str | None:
    """Why a file or folder of lore-service's tree cannot be trusted: someone
    else owns it, or someone else may write to it. None when it is ours
    (always on Windows, whose ACLs this does not judge)."""
    if System.windows:
        return None
    euid = os.geteuid()
    if st.st_uid != euid:
        return f"belongs to uid {st.st_uid}, not to you (uid {euid})"
    if st.st_mode & 0o022:
        who = "group and others" if st.st_mode & 0o002 else "its group"
        return f"can be written by {who} (mode {st.st_mode & 0o7777:o})"
    return None


def untrusted_error(path: str, why: str, what: str = "") -> StateFileError:
    return StateFileError(
        f"{what} {path} {why}" if what else f"{path} {why}",
        f"lore-service only uses files only you can change: `chmod go-w '{path}'` if it is yours, otherwise "
        "move the service's folders (or --home) under your own home",
        code="untrusted_path",
    )


def open_trusted(path: str, flags: int, what: str, mode: int = 0o600) -> int | None:
    """os.open of a file in lore-service's tree: no symlink followed, no FIFO
    waited on, and only a regular file that is ours; None when it is absent."""
    import errno

    try:
        fd = os.open(path, flags | SAFE_OPEN, mode)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateFileError(
                f"{what} {path} is a symbolic link, which lore-service never follows",
                f"remove the link; `{TOOL_NAME} install` writes the file again",
            ) from None
        raise StateFileError(
            f"cannot open {what} {path}: {exc.strerror}",
            "check the file's owner and permissions (lore-service doctor)",
            code="state_unreadable",
        ) from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "special"
        problem = StateFileError(
            f"{what} {path} is not a regular file ({kind})",
            f"move it aside and re-run `{TOOL_NAME} install` (lore-service did not modify it)",
        )
    elif untrusted(st):
        problem = untrusted_error(path, untrusted(st) or "", what)
    if problem is not None:
        os.close(fd)
        raise problem
    if flags & (os.O_WRONLY | os.O_RDWR) and hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)  # (only the open had to be non-blocking)
    return fd


def read_state_bytes(path: str, what: str, limit: int = STATE_FILE_MAX_BYTES) -> bytes | None:
    """A state or config file's bytes; None when it does not exist. Opened
    with open_trusted(), and never more than `limit` bytes read: anything
    else is StateFileError (exit 4) naming the path."""
    hint = f"move it aside and re-run `{TOOL_NAME} install` (lore-service did not modify it)"
    fd = open_trusted(path, os.O_RDONLY, what)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise StateFileError(f"{what} {path} is {size} bytes, more than a state file may be ({limit})", hint)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise StateFileError(f"cannot read {what} {path}: {exc.strerror}", hint, code="state_unreadable") from None
    finally:
        os.close(fd)
    if size > limit:  # grew while we read
        raise StateFileError(f"{what} {path} is more than {limit} bytes", hint)
    return b"".join(chunks)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_json_file(path: str, what: str) -> dict[str, Any] | None:
    """A dict, None when the file does not exist, StateFileError otherwise."""
    raw = read_state_bytes(path, what)
    if raw is None:
        return None
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)  # NaN, Infinity: corrupt
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StateFileError(
            f"{what} {path} is corrupt ({exc.__class__.__name__})",
            f"move it aside and re-run `{TOOL_NAME} install` (it was not modified)",
        ) from None
    if not isinstance(obj, dict):
        raise StateFileError(f"{what} {path} is corrupt (not an object)", "move it aside and re-run install")
    version = obj.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StateFileError(f"{what} {path} has no valid schema_version", "move it aside and re-run install")
    if version > SCHEMA_VERSION:
        raise StateFileError(
            f"{what} {path} was written by a newer lore-service (schema {version}, this one reads {SCHEMA_VERSION})",
            "upgrade lore-service; the file was left untouched",
            code="state_newer_schema",
        )
    return obj


def iso_from_ms(ms: int) -> str:
    """UTC ISO 8601 with milliseconds, e.g. 2026-11-28T00:30:00.000Z."""
    secs, rem = divmod(int(ms), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{rem:03d}Z"


def ms_from_iso(iso: str) -> int | None:
    """Inverse of iso_from_ms (UTC, `Z`); None for anything else. Plain
    arithmetic: time.strptime would import _strptime, calendar and locale into
    every `status` (staleness reads the install time)."""
    try:
        if (iso[4], iso[7], iso[10], iso[13], iso[16]) != ("-", "-", "T", ":", ":"):
            return None
        fields = (iso[0:4], iso[5:7], iso[8:10], iso[11:13], iso[14:16], iso[17:19])
        if not all(f.isascii() and f.isdigit() for f in fields):
            return None
        year, month, day, hour, minute, second = map(int, fields)
        frac = int(iso[20:23]) if iso[19:20] == "." else 0
    except (ValueError, TypeError, IndexError):
        return None
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    month_days = (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
    if not (1 <= month <= 12 and 1 <= day <= month_days[month - 1] and hour < 24 and minute < 60 and second < 61):
        return None
    # days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil)
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return (((days * 24 + hour) * 60 + minute) * 60 + second) * 1000 + frac


def local_time(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def human_duration(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{int(seconds)}s"
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"


# ----------------------------------------------------------------------------
# 9c. Identity and paths
# ----------------------------------------------------------------------------


SERVICE_ID_MAX = 48


def is_valid_service_id(value: str) -> bool:
    if not 1 <= len(value) <= SERVICE_ID_MAX or not value.isascii():
        return False
    if not (value[0].islower() or value[0].isdigit()):
        return False
    return all(c.islower() or c.isdigit() or c == "-" for c in value)


def validate_service_id(value: str) -> str:
    if not is_valid_service_id(value):
        raise UsageError(
            f"invalid service name {quoted(value)}",
            "names are 1-48 characters of a-z, 0-9 and '-', starting with a letter or digit "
            "(they become unit, label, task and file names)",
            code="bad_name",
        )
    return value


def slugify(name: str) -> str:
    out: list[str] = []
    for ch in name.lower():
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif out and out[-1] != "-":
            out.append("-")
    # 39 + '-' + 8 hex stays within the 48-character id limit
    return "".join(out).strip("-")[:39].strip("-") or "project"


def derive_service_id(project_root: str) -> str:
    import hashlib

    digest = hashlib.sha256(project_root.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{slugify(os.path.basename(project_root.rstrip(os.sep)) or 'root')}-{digest}"


def canonical_project(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def check_path_text(path: str, what: str) -> str:
    """Paths end up in unit files, crontab lines and XML: a line break or
    other control character there could smuggle in a directive. Bytes that
    are not UTF-8 (surrogate escapes) cannot be written into any of them."""
    if _control_character(path, tab_ok=False):
        raise UsageError(
            f"{what} {path!r} contains a control character (line break, tab, ...)",
            "rename the folder, or install from a path without control characters",
            code="bad_path",
        )
    if not path.isprintable() and any(0xD800 <= ord(c) <= 0xDFFF for c in path):
        raise UsageError(
            f"{what} {path!r} is not valid UTF-8",
            "rename the folder to a UTF-8 name (e.g. with `convmv`), then install again",
            code="bad_path",
        )
    return path


class Paths:
    """Where every file lives: platformdirs' per-user folders for app `lore`,
    or one relocated tree under LORE_SERVICE_HOME / --home."""

    def __init__(self, system: System, home: str | None = None) -> None:
        self.platform = system.platform  # (for the secret stores' OS-specific hints)
        self.read_statuses: dict[str, Status] | None = None  # see load_status
        home = home or system.environ.get("LORE_SERVICE_HOME") or None
        self.home = os.path.abspath(os.path.expanduser(home)) if home else None
        if self.home:
            self.config_root = os.path.join(self.home, "config")
            self.state_root = os.path.join(self.home, "state")
            self.log_root = os.path.join(self.home, "logs")
            self.data_root = os.path.join(self.home, "data")
        else:
            config, state, log, data = _user_dirs(system)
            self.config_root = os.path.join(config, "services")
            self.state_root = os.path.join(state, "services")
            self.log_root = os.path.join(log, "services")
            self.data_root = data

    def config_dir(self, sid: str) -> str:
        return os.path.join(self.config_root, sid)

    def state_dir(self, sid: str) -> str:
        return os.path.join(self.state_root, sid)

    def log_dir(self, sid: str) -> str:
        return os.path.join(self.log_root, sid)

    def manifest(self, sid: str) -> str:
        return os.path.join(self.config_dir(sid), "manifest.json")

    def config(self, sid: str) -> str:
        return os.path.join(self.config_dir(sid), "service.toml")

    def env_file(self, sid: str) -> str:
        return os.path.join(self.config_dir(sid), "token.env")

    def status(self, sid: str) -> str:
        return os.path.join(self.state_dir(sid), "status.json")

    def settings(self) -> str:
        """The user's settings for every service (the run limit), next to their folders."""
        return os.path.join(self.config_root, "settings.toml")

    def slot(self, index: int) -> str:
        """One of the host-wide run slots (not a service id: ids never start with a dot)."""
        return os.path.join(self.state_root, ".slots", f"slot-{index}.lock")

    def run_lock(self, sid: str) -> str:
        return os.path.join(self.state_dir(sid), "run.lock")

    def status_lock(self, sid: str) -> str:
        return os.path.join(self.state_dir(sid), "status.lock")

    def log(self, sid: str) -> str:
        return os.path.join(self.log_dir(sid), "service.log")

    def crash_log(self, sid: str) -> str:
        return os.path.join(self.log_dir(sid), "scheduler-output.log")

    def xdg_pins(self, user_home: str) -> list[tuple[str, str]]:
        """XDG variables a scheduler must set so a run finds these very folders
        (the user manager or cron may not share the shell's environment). Only
        non-default ones; none for a relocated home, which travels as --home."""
        if self.home:
            return []
        pins = []
        for var, root, default in (
            ("XDG_CONFIG_HOME", os.path.dirname(os.path.dirname(self.config_root)), ".config"),
            ("XDG_STATE_HOME", os.path.dirname(os.path.dirname(self.state_root)), ".local/state"),
            ("XDG_DATA_HOME", os.path.dirname(self.data_root), ".local/share"),
        ):
            if root != os.path.join(user_home, default):
                pins.append((var, root))
        return pins

    def anchors(self) -> list[str]:
        """The roots of lore-service's own tree: the --home folder, or the
        `lore` folders it keeps in the per-user config, state, log and data folders."""
        if self.home:
            return [self.home]
        roots = (self.config_root, self.state_root, self.log_root)
        return sorted({os.path.dirname(r) for r in roots} | {self.data_root})

    def verify_trusted(self, *paths: str) -> None:
        """Every existing folder from its root down to each path must be ours
        and writable by nobody else, and none below the root a symlink: then
        no other user can swap a manifest, a config or a file we write to."""
        for path in paths:
            anchor = next((a for a in self.anchors() if path == a or path.startswith(a + os.sep)), None)
            if anchor is None:
                continue
            chain = [anchor]
            for part in os.path.relpath(path, anchor).split(os.sep):
                if part != ".":
                    chain.append(os.path.join(chain[-1], part))
            for depth, folder in enumerate(chain):
                try:  # the root may be a link (e.g. macOS /tmp); nothing below it may be
                    st = os.stat(folder) if depth == 0 else os.lstat(folder)
                except FileNotFoundError:
                    break  # created later, private (ensure_dir)
                except OSError as exc:
                    raise StateFileError(
                        f"cannot look into {folder}: {exc.strerror}",
                        "check the folder's owner and permissions",
                        code="state_unreadable",
                    ) from None
                if stat.S_ISLNK(st.st_mode):
                    raise untrusted_error(folder, "is a symbolic link, which lore-service never follows")
                why = untrusted(st)
                if why:
                    raise untrusted_error(folder, why)

    def verify_service(self, sid: str) -> None:
        self.verify_trusted(self.config_dir(sid), self.state_dir(sid), self.log_dir(sid))

    def installed_ids(self) -> list[str]:
        """Every service with a manifest, readable or not: one that cannot be
        read is reported as unreadable (exit 4) by whoever loads it, never
        taken for absent."""
        try:
            names = os.listdir(self.config_root)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StateFileError(
                f"cannot read the services folder {self.config_root}: {exc.strerror}",
                "check its owner and permissions (lore-service doctor)",
                code="state_unreadable",
            ) from None
        ids = []
        for name in sorted(names):
            if not is_valid_service_id(name):
                continue
            try:
                os.lstat(self.manifest(name))  # lstat: a dangling or looping link is still there
            except FileNotFoundError:
                continue
            except OSError:
                pass  # the folder cannot be searched: unreadable, not absent
            ids.append(name)
        return ids


def _user_dirs(system: System) -> tuple[str, str, str, str]:
    """(config, state, log, data) folders for app `lore`.

    On Linux this is the XDG rule platformdirs applies, computed here because
    importing platformdirs (pathlib, tempfile, ...) would triple the start-up
    time of `status`; tests pin it to platformdirs' own answer. Elsewhere we
    ask platformdirs.
    """
    if system.platform.startswith("linux"):
        env = system.environ
        home = env.get("HOME") or os.path.expanduser("~")

        def xdg(var: str, default: str) -> str:
            value = env.get(var, "").strip()
            return value if value else os.path.join(home, default)

        state = os.path.join(xdg("XDG_STATE_HOME", ".local/state"), APP_NAME)
        return (
            os.path.join(xdg("XDG_CONFIG_HOME", ".config"), APP_NAME),
            state,
            os.path.join(state, "log"),
            os.path.join(xdg("XDG_DATA_HOME", ".local/share"), APP_NAME),
        )
    import platformdirs

    dirs = platformdirs.PlatformDirs(APP_NAME, appauthor=False)
    return dirs.user_config_dir, dirs.user_state_dir, dirs.user_log_dir, dirs.user_data_dir


# ----------------------------------------------------------------------------
# 9d. Locks and the service log
# ----------------------------------------------------------------------------


class FileLock:
    """An OS file lock (flock / msvcrt) that dies with its process, so a
    crashed run never leaves a stale lock behind."""

    def __init__(self, path: str, make_folder: bool = True) -> None:
        self.path = path
        self.make_folder = make_folder  # False: a lock in a folder that is gone is not taken
        self.folder_gone = False  # why try_acquire said False: the folder is gone, not the lock busy
        self._fd: int | None = None

    def try_acquire(self, blocking: bool = False) -> bool:
        if self.make_folder:
            ensure_dir(os.path.dirname(self.path))
        fd = open_trusted(self.path, os.O_RDWR | os.O_CREAT, "lock file")
        if fd is None:  # (O_CREAT: only when the folder is missing)
            self.folder_gone = True
            return False
        if System.lock_fd(fd, blocking):
            self._fd = fd
            return True
        os.close(fd)
        return False

    def record_owner(self, note: str = "") -> None:
        """Write our pid (and a note: the running stage) into the held lock
        file, for lock_is_held() and for the next run after a crash."""
        if self._fd is not None and not System.windows:  # msvcrt locks the byte we would write
            # the note ends in a line break, so a reader can tell it whole: written
            # over a longer old note, the file holds the new one and old bytes after
            # its line break until the cut (it is never empty in between)
            data = f"{os.getpid()}\n{note}\n".encode()
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))

    def clear_owner(self) -> None:
        """Forget what record_owner wrote, before letting go (a slot's next
        holder must not look like the last one until it has named itself)."""
        if self._fd is not None and not System.windows:
            os.ftruncate(self._fd, 0)

    def previous_note(self) -> str:
        """What the last holder recorded (read before record_owner overwrites it)."""
        if self._fd is None or System.windows:
            return ""
        return os.pread(self._fd, 512, 0).decode("utf-8", "replace")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock on every OS
            self._fd = None

    def __enter__(self) -> FileLock:
        if not self.try_acquire(blocking=True):  # (msvcrt gives up after about 10 s)
            raise BusyError(f"could not lock {self.path}", "run the command again")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_record(path: str) -> tuple[int | None, str]:
    """The pid and note (a slot's service id; a run's id and stage group) the
    last holder of a lock recorded, which may have ended since; (None, "")
    when there are none (Windows records none). The note ends in a line
    break, so one still being written reads as ""."""
    fd = open_trusted(path, os.O_RDONLY, "lock file")
    if fd is None:
        return None, ""
    try:
        head, _, rest = os.read(fd, 512).partition(b"\n")
    except OSError:
        return None, ""
    finally:
        os.close(fd)
    note, whole, _ = rest.partition(b"\n")
    pid = int(head) if head.strip().isdigit() and head.strip().isascii() else None
    return pid, note.decode("utf-8", "replace").strip() if whole else ""


def lock_holder(path: str) -> int | None:
    """The pid the last holder of a run lock recorded (it may have ended since)."""
    return lock_record(path)[0]


def lock_owner(path: str) -> tuple[int | None, str]:
    """lock_record for a reader that must not fail (a waiting run naming the
    slot holders): a lock file that cannot be trusted names nobody."""
    try:
        return lock_record(path)
    except LoreServiceError:
        return None, ""


def lock_is_held(path: str, system: System, pid: int | None = None) -> bool:
    """Whether a run holds the lock. Probing takes the lock for an instant,
    which could make a run starting at that instant skip, so it is only done
    when the pid the holder recorded (pid: read already) is alive."""
    head = pid if pid is not None else lock_holder(path)
    if not System.windows and not (head is not None and system.pid_alive(head)):
        return False
    probe = FileLock(path)
    try:
        if probe.try_acquire():
            probe.release()
            return False
    except OSError:
        return False
    return True


class ServiceLog:
    """Appends timestamped lines; rotates by size (service.log -> .1 -> .2 ...)."""

    def __init__(self, path: str, system: System, max_bytes: int = 5 * 1024 * 1024, backups: int = 3) -> None:
        self.path = path
        self.system = system
        # in a container (LORE_SERVICE_LOG_STDOUT=1, set by `export`) every line also goes
        # to stdout, so `kubectl logs` shows the run; the lines are redacted already
        self.echo = system.environ.get("LORE_SERVICE_LOG_STDOUT") == "1"
        self.max_bytes = max_bytes
        self.backups = backups
        self.may_rotate = True  # only the run-lock holder rotates
        self._fh: Any = None
        self._size = 0
        # the last lines this instance wrote (one run's), for a Healthchecks ping's body
        self.keep_bytes = 0
        self.kept: list[bytes] = []
        self._kept_size = 0

    def _open(self) -> None:
        ensure_dir(os.path.dirname(self.path))
        fd = open_trusted(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "service log")
        assert fd is not None  # (O_CREAT)
        self._fh = os.fdopen(fd, "ab", buffering=0)
        self._size = os.fstat(fd).st_size

    def _rotate(self) -> None:
        self.close()
        if self.backups == 0:
            remove_file(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            if os.path.exists(self.path):
                os.replace(self.path, f"{self.path}.1")
        self._open()

    def write_line(self, prefix: str, text: str) -> None:
        if self._fh is None:
            self._open()
        stamp = iso_from_ms(self.system.now_ms())
        data = f"{stamp} [{prefix}] {text}\n".encode("utf-8", "replace")
        if self.may_rotate and self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        self._fh.write(data)
        self._size += len(data)
        if self.keep_bytes:
            self._keep(data)
        if self.echo:
            sys.stdout.write(terminal_safe(data.decode("utf-8", "replace")))
            sys.stdout.flush()

    def _keep(self, data: bytes) -> None:
        self.kept.append(data)
        self._kept_size += len(data)
        while self._kept_size > self.keep_bytes and len(self.kept) > 1:
            self._kept_size -= len(self.kept.pop(0))

    def recent(self) -> bytes:
        """This instance's last lines, at most keep_bytes (the newest line's tail if it alone is longer)."""
        return b"".join(self.kept)[-self.keep_bytes :] if self.keep_bytes else b""

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _tail_file(path: str, n: int, block: int = 64 * 1024, end: int | None = None) -> list[bytes]:
    """Last n lines (before byte `end`, default the end), reading backwards
    block by block: time and memory grow with what is printed, not with the
    file's size (nor quadratically with n)."""
    fd = open_trusted(path, os.O_RDONLY, "service log")
    if fd is None:
        raise FileNotFoundError(path)
    blocks: list[bytes] = []
    newlines = 0
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        pos = size if end is None else min(end, size)
        while pos > 0 and newlines <= n:
            step = min(block, pos)
            pos -= step
            piece = os.pread(fd, step, pos) if hasattr(os, "pread") else _read_at(fd, pos, step)
            blocks.append(piece)
            newlines += piece.count(b"\n")
    finally:
        os.close(fd)
    lines = b"".join(reversed(blocks)).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if pos > 0:
        lines = lines[1:]  # the first piece may be half a line
    return lines[-n:] if n else []


def _read_at(fd: int, pos: int, size: int) -> bytes:
    os.lseek(fd, pos, os.SEEK_SET)
    return os.read(fd, size)


def tail_lines(path: str, n: int, end: int | None = None) -> list[str]:
    """Last n lines of the log (before byte `end` of the current file),
    reaching into service.log.1 if rotation just happened."""
    lines: list[bytes] = []
    for candidate in (path, path + ".1"):
        if len(lines) >= n:
            break
        try:
            lines = _tail_file(candidate, n - len(lines), end=end if candidate == path else None) + lines
        except FileNotFoundError:
            continue
    return [line.decode("utf-8", "replace") for line in lines]


def follow_lines(
    path: str, system: System, poll: float = 0.25, start: tuple[int, int, int] | None = None
) -> Iterator[str]:
    """New lines as they are written; reopens the file when it is rotated.
    start (device, inode, offset): begin there in that file (where a tail
    ended) rather than at its end; a file rotated meanwhile is read whole."""
    fh: Any = None
    ident: tuple[int, int] | None = None
    partial = b""
    first = True  # only the file open at start is read from its end
    try:
        while True:
            if fh is None:
                fd = open_trusted(path, os.O_RDONLY, "service log")
                if fd is None:
                    first = False
                    system.sleep(poll)
                    continue
                fh = os.fdopen(fd, "rb")  # (reopened on rotation; closed in finally)
                st = os.fstat(fh.fileno())
                ident = (st.st_dev, st.st_ino)
                if first and start is not None:
                    fh.seek(start[2] if ident == start[:2] else 0)
                elif first:
                    fh.seek(0, os.SEEK_END)
                first = False
            chunk = fh.read(64 * 1024)
            if chunk:
                partial += chunk
                *complete, partial = partial.split(b"\n")
                for line in complete:
                    yield line.decode("utf-8", "replace")
                continue
            try:
                st = os.stat(path)
                rotated = (st.st_dev, st.st_ino) != ident or st.st_size < fh.tell()
            except FileNotFoundError:
                rotated = True
            if rotated:
                fh.close()
                fh = None
                continue
            system.sleep(poll)
    finally:
        if fh is not None:
            fh.close()


# ----------------------------------------------------------------------------
# 9e. Secrets: the GitLab token's stores
# ----------------------------------------------------------------------------


KEYRING_SERVICE = "lore-service"
SECRET_PLACEHOLDER = "<redacted>"


def validate_token(token: str) -> str:
    token = token.strip()
    if not token:
        raise UsageError("the token is empty", "pass a GitLab personal access token", code="no_token")
    if any(c in token for c in "\r\n"):
        raise UsageError("the token contains a line break", "pass the token on one line", code="bad_token")
    # control characters and undecodable bytes (surrogate escapes) cannot be stored or sent as a header
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in token):
        raise UsageError(
            "the token contains a control character or bytes that are not UTF-8",
            "copy the token again from GitLab (User settings > Access tokens)",
            code="bad_token",
        )
    return token


def _secret_store_fix(platform: str) -> str:
    """What gets the OS store working on this platform, or the store to use instead."""
    if platform == "darwin":
        return (
            "unlock the login keychain (`security unlock-keychain`) and run `lore-service install` again from "
            "Terminal (it stores the item from the program the agent runs, so no prompt is needed), or re-install "
            "with --token-source embedded (the token is then kept in the LaunchAgent plist, mode 0600)"
        )
    if platform == "win32":
        return "run from the user's own log-on session, where Credential Manager is available"
    return "start a Secret Service (e.g. gnome-keyring) in this session, or re-install with --token-source env-file"


def _keyring(platform: str) -> Any:
    try:
        import keyring
        import keyring.errors
    except ImportError:
        raise SchedulerError(
            "the keyring package is not installed",
            "reinstall lore-service with its dependencies (pip install keyring); or " + _secret_store_fix(platform),
            code="secret_store",
        ) from None
    return keyring


def _keyring_error(action: str, exc: Exception, platform: str) -> SchedulerError:
    return SchedulerError(
        f"cannot {action} the token in the OS secret store: {exc.__class__.__name__}: {exc}",
        _secret_store_fix(platform),
        code="secret_store",
    )


def store_secret(paths: Paths, manifest: Manifest, token: str) -> str | None:
    """Persist the token; returns the file written, if any."""
    if manifest.token_source == "env-file":
        path = paths.env_file(manifest.service_id)
        atomic_write(path, f"{manifest.token_env}={token}\n", 0o600)
        return path
    if manifest.token_source in ("keychain", "credential-manager"):
        keyring = _keyring(paths.platform)
        try:
            keyring.set_password(KEYRING_SERVICE, manifest.service_id, token)
        except Exception as exc:  # keyring backends raise many unrelated types
            raise _keyring_error("store", exc, paths.platform) from None
    return None


def read_secret(paths: Paths, manifest: Manifest, environ: dict[str, str]) -> str | None:
    """The token for a run, or None; the variable in the caller's environment
    (embedded entries, or `run` called from the user's own cron) is the fallback."""
    token: str | None = None
    if manifest.token_source == "env-file":
        raw = read_state_bytes(paths.env_file(manifest.service_id), "token file", limit=64 * 1024)
        try:
            for line in (raw or b"").decode("utf-8").split("\n"):
                key, sep, value = line.partition("=")
                if sep and key == manifest.token_env:
                    token = value
        except UnicodeDecodeError:
            hint = f"re-run `{TOOL_NAME} install` to write it again"
            raise StateFileError("the token file is not UTF-8", hint) from None
    elif manifest.token_source in ("keychain", "credential-manager"):
        token = _read_keyring(paths.platform, manifest.service_id)
    return token or environ.get(manifest.token_env) or None


SECRET_READ_TIMEOUT = 20.0  # a Keychain permission prompt in a LaunchAgent is shown to nobody


def _read_keyring(platform: str, sid: str) -> str | None:
    """keyring.get_password with a timeout: the read runs in a daemon thread,
    so a store that never answers cannot hold a run (and its lock) forever."""
    import threading

    keyring = _keyring(platform)
    answer: list[str | None] = []
    failure: list[Exception] = []

    def read() -> None:
        try:
            answer.append(keyring.get_password(KEYRING_SERVICE, sid))
        except Exception as exc:  # keyring backends raise many unrelated types
            failure.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(SECRET_READ_TIMEOUT)
    if reader.is_alive():
        raise SchedulerError(
            f"the OS secret store did not answer within {SECRET_READ_TIMEOUT:.0f} s "
            "(a permission prompt nobody can see, or a locked store)",
            _secret_store_fix(platform),
            code="secret_store",
        )
    if failure:
        raise _keyring_error("read", failure[0], platform) from None
    return answer[0]


def delete_secret(paths: Paths, manifest: Manifest) -> None:
    if manifest.token_source == "env-file":
        remove_file(paths.env_file(manifest.service_id))
    elif manifest.token_source in ("keychain", "credential-manager"):
        keyring = _keyring(paths.platform)
        try:
            keyring.delete_password(KEYRING_SERVICE, manifest.service_id)
        except keyring.errors.PasswordDeleteError:
            pass  # already gone
        except Exception as exc:
            raise _keyring_error("delete", exc, paths.platform) from None


# ----------------------------------------------------------------------------
# 9f. The pinned executable (frozen builds)
# ----------------------------------------------------------------------------


# A release is the one-folder PyInstaller build (an archive; see build.py) or a
# .pyz. Wherever the user unpacked it (Downloads, /tmp), the scheduler must not
# run it from there: `install` copies the running build into
# <data_root>/bin/<version>/ and every scheduler entry names that copy. The copy
# is made under a temporary name in bin/, fsynced, asked for `--version`, and
# only then renamed into place; a newer version lands in its own folder, so
# entries switch to it only when `install` rewrites them. From source nothing is
# copied: the entry is the absolute interpreter and script (doctor judges
# whether they look disposable, section 7).

PINNED_DIR = "bin"
PINNED_EXE = TOOL_NAME + System.exe_suffix
PINNED_PYZ = TOOL_NAME + ".pyz"


@record
class Bundle:
    """What is running: kind onedir | onefile (PyInstaller), zipapp, or source."""

    kind: str
    executable: str  # the frozen program, the .pyz, or the interpreter (source)
    interpreter: str  # sys.executable
    extraction: str | None = None  # PyInstaller's sys._MEIPASS (onefile: a temporary folder)


def running_bundle(
    *, frozen: bool | None = None, executable: str | None = None, meipass: str | None = None, module: str | None = None
) -> Bundle:
    """Classify this process (parameters default to sys; tests pass them)."""
    frozen = bool(getattr(sys, "frozen", False)) if frozen is None else frozen
    interpreter = os.path.abspath(executable or sys.executable)
    if frozen:
        meipass = meipass if meipass is not None else getattr(sys, "_MEIPASS", None)
        home = os.path.dirname(interpreter)
        # one-folder: the bundle is the program's own folder (PyInstaller 5) or its
        # _internal (6); a one-file build extracts to a _MEIxxxx folder elsewhere,
        # which may be a sibling of the program (run from /tmp), so no prefix test
        beside = meipass is not None and os.path.abspath(meipass) in (home, os.path.join(home, "_internal"))
        return Bundle("onedir" if beside else "onefile", interpreter, interpreter, meipass)
    archive = os.path.dirname(os.path.abspath(module or __file__))
    if os.path.isfile(archive):  # python app.pyz: __file__ is app.pyz/lore_service.py
        return Bundle("zipapp", archive, interpreter)
    return Bundle("source", os.path.abspath(module or __file__), interpreter)


def bundle_command(bundle: Bundle) -> list[str]:
    """argv prefix that starts the bundle where it is now."""
    if bundle.kind in ("onedir", "onefile"):
        return [bundle.executable]
    return [bundle.interpreter, bundle.executable]


def pinned_folder(data_root: str, version: str = __version__) -> str:
    return os.path.join(data_root, PINNED_DIR, version)


def pinned_command(data_root: str, bundle: Bundle, version: str = __version__) -> list[str]:
    """argv prefix of the pinned copy the scheduler runs (source: unchanged)."""
    folder = pinned_folder(data_root, version)
    if bundle.kind in ("onedir", "onefile"):
        return [os.path.join(folder, PINNED_EXE)]
    if bundle.kind == "zipapp":
        return [bundle.interpreter, os.path.join(folder, PINNED_PYZ)]
    return bundle_command(bundle)


def _bundle_parts(bundle: Bundle) -> list[tuple[str, str]]:
    """(source path, name inside bin/<version>/) of everything the copy needs."""
    if bundle.kind == "zipapp":
        return [(bundle.executable, PINNED_PYZ)]
    extraction = os.path.abspath(bundle.extraction or os.sep)
    if bundle.kind == "onefile" and os.path.commonpath([extraction, bundle.executable]) == extraction:
        # never copy (or point a scheduler at) a one-file build's temporary extraction folder
        raise SchedulerError(
            f"{bundle.executable} is inside PyInstaller's extraction folder {bundle.extraction}",
            "run the lore-service program you downloaded, not a file from its temporary folder",
            code="pin_failed",
        )
    parts = [(bundle.executable, PINNED_EXE)]
    twin = os.path.join(os.path.dirname(bundle.executable), TOOL_NAME + "-w.exe")
    if System.windows and os.path.isfile(twin):  # the no-console twin the scheduled task runs
        parts.append((twin, TOOL_NAME + "-w.exe"))
    home = os.path.dirname(bundle.executable)
    if bundle.kind == "onedir" and bundle.extraction:
        contents = os.path.relpath(bundle.extraction, home)
        if contents != ".":  # the shared _internal folder (PyInstaller 6's default)
            parts.append((bundle.extraction, contents))
        else:  # contents_directory="." (or PyInstaller 5): the whole folder is the build
            taken = {name for _, name in parts} | {os.path.basename(bundle.executable)}
            parts.extend((os.path.join(home, n), n) for n in sorted(os.listdir(home)) if n not in taken)
    return parts


def frozen_child_environ(environ: dict[str, str], frozen: bool | None = None) -> dict[str, str]:
    """environ for programs a frozen build starts: the library path as it was
    before PyInstaller's bootloader pointed it at the bundle, and none of its
    _PYI_* variables (a child lore, systemctl or crontab must load the system's
    libraries; a child lore-service must start as a fresh instance)."""
    if not (bool(getattr(sys, "frozen", False)) if frozen is None else frozen):
        return dict(environ)
    env = {k: v for k, v in environ.items() if not k.startswith("_PYI_") and k != "_MEIPASS2"}
    for var in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "LIBPATH"):
        orig = env.pop(var + "_ORIG", None)
        env.pop(var, None)
        if orig is not None:
            env[var] = orig
    env["PYINSTALLER_RESET_ENVIRONMENT"] = "1"
    return env


def _same_file(a: str, b: str) -> bool:
    import filecmp

    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _copy_synced(src: str, dst: str) -> None:
    """Copy a file or a folder tree (symlinks kept), fsyncing every file and folder."""
    import shutil

    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True)
        for folder, _, files in os.walk(dst):
            for name in files:
                full = os.path.join(folder, name)
                if not os.path.islink(full):
                    with open(full, "rb+") as fh:
                        os.fsync(fh.fileno())
            _fsync_dir(folder)
        return
    shutil.copy2(src, dst)
    with open(dst, "rb+") as fh:
        os.fsync(fh.fileno())


def _answers_version(argv: list[str], version: str, frozen: bool, run: Callable[..., CommandResult]) -> str | None:
    """None when argv --version --json reports this version; else what went wrong."""
    result = run([*argv, "--version", "--json"], timeout=120)  # System's environ: no bundle library path
    if not result.ok:
        return f"exit status {result.returncode}: {result.summary()}"
    try:
        data = json.loads(result.stdout)["data"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable --version output {result.stdout[:200]!r}"
    if data.get("version") != version or bool(data.get("frozen")) != frozen:
        return f"it reports version {data.get('version')!r} (frozen {data.get('frozen')!r}), expected {version!r}"
    return None


QUARANTINE = "com.apple.quarantine"


def _prepare_for_launchd(staging: str, exe: str, run: Callable[..., CommandResult], codesign: str | None) -> None:
    """macOS: a downloaded build carries com.apple.quarantine, and launchd would
    start the copy into a Gatekeeper prompt nobody sees. The attribute is removed
    from the copy only (the download is the user's, left as their browser marked
    it), and a frozen copy is ad-hoc signed where codesign exists."""
    # exits 1 when some file never had the attribute, so the result is checked below
    run(["xattr", "-d", "-r", QUARANTINE, staging])
    left = run(["xattr", "-p", QUARANTINE, exe])
    if left.ok:
        raise SchedulerError(
            f"cannot remove {QUARANTINE} from the copy {exe}",
            f"check that {os.path.dirname(staging)} is on a disk that allows extended attributes",
            code="pin_failed",
        )
    if codesign and not exe.endswith(".pyz"):
        signed = run([codesign, "--force", "--sign", "-", exe])
        if not signed.ok:
            raise SchedulerError(
                f"cannot sign the copy {exe}: {signed.summary()}",
                f"run `codesign --force --sign - {_shell_quote(exe)}` by hand to see why, then re-run install",
                code="pin_failed",
            )


def pin_bundle(
    data_root: str,
    bundle: Bundle,
    run: Callable[..., CommandResult],
    version: str = __version__,
    runs_in_progress: Callable[[], bool] = lambda: False,
    *,
    macos: bool = False,
    codesign: str | None = None,
) -> list[str]:
    """Make <data_root>/bin/<version>/ hold a verified copy of the bundle; returns
    the argv prefix that runs it. Idempotent: an identical copy is kept as is.
    A different build of the same version replaces it only while no run is in
    progress: a running program finds its own files by path. On macOS the copy
    loses its quarantine attribute and is ad-hoc signed (with `codesign`, the
    tool's path, when there is one) before it is asked for its version."""
    import shutil

    command = pinned_command(data_root, bundle, version)
    if bundle.kind == "source":
        return command
    folder = pinned_folder(data_root, version)
    parts = _bundle_parts(bundle)
    if os.path.realpath(bundle.executable) == os.path.realpath(os.path.join(folder, parts[0][1])):
        return command  # running from the pinned copy itself
    if all(_same_file(src, os.path.join(folder, name)) for src, name in parts[:1]) and all(
        os.path.exists(os.path.join(folder, name)) for _, name in parts
    ):
        return command  # same build already pinned (the executable carries the code)
    bin_root = os.path.dirname(folder)
    ensure_dir(bin_root)
    staging = os.path.join(bin_root, f".{version}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        ensure_dir(staging)
        for src, name in parts:
            _copy_synced(src, os.path.join(staging, name))
        _fsync_dir(staging)
        trial = [os.path.join(staging, parts[0][1])]
        if macos:
            _prepare_for_launchd(staging, trial[0], run, codesign)
        if bundle.kind == "zipapp":
            trial.insert(0, bundle.interpreter)
        problem = _answers_version(trial, version, bundle.kind != "zipapp", run)
        if problem:
            raise SchedulerError(
                f"the copy of {bundle.executable} in {staging} does not run: {problem}",
                "check free space and that the data folder allows executing programs (not mounted noexec)",
                code="pin_failed",
            )
        if os.path.lexists(folder):  # same version, different build: swap it out
            busy = "a run is executing from it: run install again when it has ended"
            if runs_in_progress():
                raise SchedulerError(f"cannot replace the pinned copy {folder} now", busy, code="pin_failed")
            # set aside rather than deleted (prune_pinned removes it once an hour old)
            old = os.path.join(bin_root, f".{version}.{os.getpid()}.old")
            try:
                os.replace(folder, old)
            except OSError as exc:  # Windows: files of a running copy cannot be moved
                raise SchedulerError(
                    f"cannot replace the pinned copy {folder}: {exc.strerror or exc}", busy, code="pin_failed"
                ) from None
            os.utime(old)
            try:
                os.replace(staging, folder)
            except BaseException:
                os.replace(old, folder)  # never leave bin/<version> empty
                raise
        else:
            os.replace(staging, folder)
        _fsync_dir(bin_root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return command


def runs_in_progress(paths: Paths, system: System) -> bool:
    """Whether any service's run (installed or not: its state folder is kept) holds its lock."""
    try:
        with_state = os.listdir(paths.state_root)
    except OSError:
        return False
    return any(lock_is_held(paths.run_lock(sid), system) for sid in with_state if is_valid_service_id(sid))


def prune_pinned(paths: Paths, system: System, keep: str) -> list[str]:
    """Remove bin/<version> folders no installed service's manifest runs any more
    (and leftovers of interrupted copies); keeps `keep`. Returns what was removed.
    Any unreadable manifest stops the pruning: nothing is removed on a guess;
    nor while any run is in progress, since it may be executing from one of them."""
    import shutil

    bin_root = os.path.join(paths.data_root, PINNED_DIR)
    try:
        names = os.listdir(bin_root)
    except OSError:
        return []
    if runs_in_progress(paths, system):
        return []
    now_ms = system.now_ms()
    used = {os.path.abspath(keep)}
    for sid in paths.installed_ids():
        try:
            manifest = load_manifest(paths, sid)
        except LoreServiceError:
            return []
        for arg in manifest.program[:2] if manifest else ():
            if os.path.abspath(arg).startswith(bin_root + os.sep):
                used.add(os.path.join(bin_root, os.path.relpath(arg, bin_root).split(os.sep)[0]))
    removed = []
    for name in names:
        full = os.path.join(bin_root, name)
        try:  # a folder younger than an hour may be another install's copy, not yet in its manifest
            fresh = now_ms / 1000 - os.stat(full).st_mtime < 3600
        except OSError:
            continue
        if full not in used and not fresh and os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
    return removed


def pin_running_program(paths: Paths, system: System, bundle: Bundle) -> list[str]:
    """What install's apply step does here: a frozen build or a .pyz copies
    itself to bin/<version>/ (what planned_program() named), older copies no
    service runs are pruned. Returns the argv prefix; from source: no-op."""
    if bundle.kind == "source":
        return bundle_command(bundle)
    paths.verify_trusted(os.path.join(paths.data_root, PINNED_DIR))  # what every scheduler entry will run
    macos = system.platform == "darwin"
    command = pin_bundle(
        paths.data_root,
        bundle,
        system.run,
        runs_in_progress=lambda: runs_in_progress(paths, system),
        macos=macos,
        codesign=system.which("codesign") if macos else None,
    )
    prune_pinned(paths, system, pinned_folder(paths.data_root))
    return command


def macos_program_checks(system: System, program: Sequence[str]) -> list[Check]:
    """doctor on macOS: a scheduled frozen program that still carries quarantine,
    or whose signature does not verify, may never start when launchd (or cron) runs it."""
    exe = program[0] if program else ""
    interpreted = len(program) > 1 and program[1].endswith((".py", ".pyz"))
    if system.platform != "darwin" or interpreted or not os.path.isabs(exe) or not os.path.isfile(exe):
        return []  # an interpreter is not ours to sign; a missing program is program_checks' fail
    checks = []
    folder = os.path.dirname(exe)
    if system.run(["xattr", "-p", QUARANTINE, exe]).ok:
        checks.append(
            Check(
                "program quarantine",
                "warn",
                f"{exe} carries {QUARANTINE}: launchd may stop it at a Gatekeeper prompt nobody sees",
                f"xattr -d -r {QUARANTINE} {_shell_quote(folder)}",
            )
        )
    codesign = system.which("codesign")
    if codesign:
        verify = system.run([codesign, "--verify", exe])
        if not verify.ok:
            checks.append(
                Check(
                    "program signature",
                    "warn",
                    f"`codesign --verify {exe}` fails: {verify.summary()}",
                    f"codesign --force --sign - {_shell_quote(exe)}",
                )
            )
    return checks


if __name__ == "__main__":
    sys.exit(main())
