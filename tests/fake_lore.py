#!/usr/bin/env python3
"""A stand-in for `lore` (gitlore) used by the tests.

It is called exactly as lore-service calls the real program
(`lore ingest --type issues`, `lore ingest --type mrs`, `lore generate-docs`,
`lore embed`) in the project root, and behaves as the file
`.fake-lore.json` in that folder says, per stage:

    {"issues": {"exit": 0}, "mrs": {"exit": 75},
     "docs": {"hang": true}, "embeddings": {"print_token": true}}

Keys: exit (int), sleep (seconds), hang (sleep for a day), grandchild (start
a process in the same group that sleeps and records its pid), print_token
(echo the token variable), print_token_forms (the token in base64, URL and
UTF-16 forms), print_raw (text written as is), record_parent_limits (copy
the core-size line of the parent's /proc limits to a file), print_mb (write N MiB of output lines), signal
(kill itself with that signal number), env_var (token variable name,
default GITLAB_TOKEN), wait_for (a path: wait until that file exists, at
most two minutes). Every call appends one JSON line to
`.fake-lore-calls.jsonl`: stage, argv, cwd, pid, whether the token was set,
start_ns; one that ends by returning appends its start_ns and end_ns to
`.fake-lore-times.jsonl` too (time.monotonic_ns: one clock for every
process of the machine, so intervals of different runs can be compared).
Tests read these files while it runs: each line is appended whole and each
other file appears complete (see append_line, write_whole).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse


def stage_of(argv: list[str]) -> str:
    if argv[:1] == ["ingest"] and "--type" in argv:
        return argv[argv.index("--type") + 1]
    return {"generate-docs": "docs", "embed": "embeddings"}.get(argv[0] if argv else "", "unknown")


def print_token_forms(token: str) -> None:
    """The token as programs print it in other encodings: base64, URL-encoded, UTF-16."""
    raw = token.encode()
    out = sys.stdout.buffer
    out.write(b"b64 " + base64.b64encode(raw) + b"\n")
    out.write(b"b64url " + base64.urlsafe_b64encode(raw).rstrip(b"=") + b"\n")
    out.write(b"url " + urllib.parse.quote(token, safe="").encode() + b"\n")
    out.write(b"utf16 " + token.encode("utf-16-le") + b"\n")
    out.flush()


def append_line(path: str, record: dict) -> None:
    """One write of the whole line on an O_APPEND descriptor: a reader never sees half a line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def write_whole(path: str, text: str) -> None:
    """Written aside, then renamed: a test that sees the file sees all of it."""
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(temp, path)


def wait_for(path: str) -> None:
    deadline = time.monotonic() + 120
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


def main() -> int:
    start_ns = time.monotonic_ns()
    argv = sys.argv[1:]
    stage = stage_of(argv)
    try:
        with open(".fake-lore.json", encoding="utf-8") as fh:
            plan = json.load(fh).get(stage, {})
    except FileNotFoundError:
        plan = {}
    var = plan.get("env_var", "GITLAB_TOKEN")
    record = {
        "stage": stage,
        "argv": argv,
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "token_set": bool(os.environ.get(var)),
        "start_ns": start_ns,
    }
    append_line(".fake-lore-calls.jsonl", record)
    print(f"fake lore: stage {stage}", flush=True)
    if plan.get("print_token"):
        print(f"token is {os.environ.get(var, '')}", flush=True)
    if plan.get("print_token_forms"):
        print_token_forms(os.environ.get(var, ""))
    if plan.get("print_raw"):
        sys.stdout.write(plan["print_raw"])
        sys.stdout.flush()
    if plan.get("record_parent_limits") and os.path.exists(f"/proc/{os.getppid()}/limits"):
        with open(f"/proc/{os.getppid()}/limits", encoding="utf-8") as fh:
            core = next(line for line in fh if line.startswith("Max core file size"))
        write_whole(f".fake-lore-parent-limits-{stage}.txt", core)
    if plan.get("grandchild"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        write_whole(f".fake-lore-grandchild-{stage}.pid", str(child.pid))
    if plan.get("print_mb"):
        line = ("x" * 99 + "\n").encode()
        block = line * 10486  # ~1 MiB
        out = sys.stdout.buffer
        for _ in range(int(plan["print_mb"])):
            out.write(block)
        out.flush()
    if plan.get("sleep"):
        time.sleep(float(plan["sleep"]))
    if plan.get("wait_for"):
        wait_for(plan["wait_for"])
    if plan.get("hang"):
        time.sleep(86400)
    if plan.get("signal"):
        os.kill(os.getpid(), int(plan["signal"]))
        time.sleep(5)
    code = int(plan.get("exit", 0))
    if code:
        print(f"fake lore: failing with {code}", file=sys.stderr, flush=True)
    times = {"stage": stage, "pid": os.getpid(), "start_ns": start_ns, "end_ns": time.monotonic_ns()}
    append_line(".fake-lore-times.jsonl", times)
    return code


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.exit(main())
