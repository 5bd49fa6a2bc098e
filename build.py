#!/usr/bin/env python3
"""Build the standalone lore-service for this OS: `python build.py`.

One command from a clean checkout (Python 3.11+, PyPI reachable):

    python build.py                    # dist/lore-service/ (one folder) + its archive
    python build.py --layout onefile   # dist/onefile/lore-service (measured, not shipped)
    python build.py --zipapp           # also dist/lore-service-<version>.pyz (needs Python)

It creates build/venv from the exact pins in dist-config/build-requirements.txt
(never touching .venv), runs PyInstaller on dist-config/lore-service.spec,
checks that the result answers `--version --json` with the version in
lore_service.py (the one place it is written), and prints path, size, version
and build time. On Windows the folder also holds lore-service-w.exe, the
no-console twin the scheduled task runs.

Why one folder: see bench/bench_frozen.py and the README's performance
section. A one-file build unpacks itself into a temporary folder on every
start, several times slower than the one-folder build the scheduler runs.
The download is a single archive of that folder; `install` copies the folder
to lore-service's data folder (bin/<version>/) and points the scheduler there.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(ROOT, "dist-config")
REQUIREMENTS = os.path.join(CONFIG, "build-requirements.txt")
SPEC = os.path.join(CONFIG, "lore-service.spec")
BUILD = os.path.join(ROOT, "build")
DIST = os.path.join(ROOT, "dist")
NAME = "lore-service"
WINDOWS = sys.platform == "win32"
EXE_SUFFIX = ".exe" if WINDOWS else ""
# Fixed timestamp for the archives' members (reproducible archives).
EPOCH = 1_700_000_000
# Packages a .pyz can carry: pure Python (an extension module cannot be
# imported from inside a zip). SecretStorage is left out because it needs
# cryptography (compiled); see `zipapp_note`.
PURE = (
    "platformdirs",
    "tomli_w",
    "keyring",
    "jaraco.classes",
    "jaraco.context",
    "jaraco.functools",
    "more-itertools",
    "backports.tarfile",
    "importlib_metadata",
    "lazy-importer",
    "zipp",
    "pywin32-ctypes",
)


def log(message: str) -> None:
    print(f"build: {message}", file=sys.stderr, flush=True)


def version() -> str:
    """__version__ from lore_service.py, read without importing it."""
    with open(os.path.join(ROOT, "lore_service.py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit("error: no __version__ in lore_service.py")


def platform_tag() -> str:
    import platform

    system = {"linux": "linux", "darwin": "macos", "win32": "windows"}.get(sys.platform, sys.platform)
    machine = platform.machine().lower().replace("amd64", "x86_64").replace("aarch64", "arm64")
    return f"{system}-{machine}"


def venv_python(venv: str) -> str:
    return os.path.join(venv, "Scripts", "python.exe") if WINDOWS else os.path.join(venv, "bin", "python")


def build_venv() -> str:
    """build/venv with exactly the pinned requirements; rebuilt when they change."""
    venv = os.path.join(BUILD, "venv")
    with open(REQUIREMENTS, "rb") as fh:
        digest = hashlib.sha256(fh.read() + sys.version.encode()).hexdigest()[:16]
    stamp = os.path.join(venv, f".reqs-{digest}")
    python = venv_python(venv)
    if os.path.exists(stamp) and os.path.exists(python):
        return python
    log(f"creating {venv} from {os.path.relpath(REQUIREMENTS, ROOT)}")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "-r", REQUIREMENTS], check=True)
    subprocess.run([*pip, "check"], check=True)  # the pins are complete and consistent
    open(stamp, "w").close()
    return python


def tree_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def ask_version(argv: list[str]) -> dict:
    env = {**os.environ, "PYINSTALLER_RESET_ENVIRONMENT": "1"}
    proc = subprocess.run([*argv, "--version", "--json"], capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: {argv[-1]} --version failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return json.loads(proc.stdout)["data"]


def pyinstaller(python: str, layout: str) -> str:
    """Run the spec; returns the built executable."""
    distpath = DIST if layout == "onedir" else os.path.join(DIST, "onefile")
    workpath = os.path.join(BUILD, f"pyinstaller-{layout}")
    env = {**os.environ, "LORE_BUILD_LAYOUT": layout, "PYTHONHASHSEED": "0", "SOURCE_DATE_EPOCH": str(EPOCH)}
    # PyInstaller's cache is per user by default: two checkouts building at once corrupt it
    env["PYINSTALLER_CONFIG_DIR"] = os.path.join(BUILD, "pyinstaller-cache")
    out = os.path.join(distpath, NAME)
    if os.path.isdir(out):
        shutil.rmtree(out)
    cmd = [python, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN"]
    subprocess.run([*cmd, "--distpath", distpath, "--workpath", workpath, SPEC], check=True, env=env, cwd=ROOT)
    return os.path.join(out, NAME + EXE_SUFFIX) if layout == "onedir" else out + EXE_SUFFIX


def archive(folder: str, ver: str) -> str:
    """The one download: the one-folder build as a .tar.gz (.zip on Windows),
    members sorted, owned by root and stamped EPOCH so rebuilds compare equal."""
    base = os.path.join(DIST, f"{NAME}-{ver}-{platform_tag()}")
    names = []
    for here, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            names.append(os.path.join(here, f))
    parent = os.path.dirname(folder)
    if WINDOWS:
        path = base + ".zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for full in names:
                info = zipfile.ZipInfo(os.path.relpath(full, parent).replace(os.sep, "/"), time.gmtime(EPOCH)[:6])
                info.compress_type = zipfile.ZIP_DEFLATED
                with open(full, "rb") as fh:
                    zf.writestr(info, fh.read())
        return path
    path = base + ".tar.gz"
    import gzip

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = EPOCH
        return info

    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=EPOCH) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        dirs_done: set[str] = set()
        for full in names:
            rel = os.path.relpath(full, parent)
            parts = rel.split(os.sep)
            for i in range(1, len(parts)):  # folders first, in order
                d = os.sep.join(parts[:i])
                if d not in dirs_done:
                    dirs_done.add(d)
                    tar.add(os.path.join(parent, d), d, recursive=False, filter=clean)
            tar.add(full, rel, recursive=False, filter=clean)
    return path


def zipapp_build(python: str, ver: str) -> str:
    """dist/lore-service-<version>.pyz: lore_service.py + the pure-Python deps."""
    import zipapp

    stage = os.path.join(BUILD, "zipapp")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    pins = []
    with open(REQUIREMENTS, encoding="utf-8") as fh:
        for line in fh:
            spec = line.split("#")[0].split(";")[0].strip()
            if spec and spec.split("==")[0].lower().replace("_", "-") in {p.lower().replace("_", "-") for p in PURE}:
                pins.append(spec)
    subprocess.run(
        [python, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps", "--no-compile"]
        + ["--only-binary", ":all:", "--target", stage, *pins],
        check=True,
    )
    for junk in ("bin", "__pycache__"):
        shutil.rmtree(os.path.join(stage, junk), ignore_errors=True)
    shutil.copy2(os.path.join(ROOT, "lore_service.py"), stage)
    with open(os.path.join(stage, "__main__.py"), "w", encoding="utf-8") as fh:
        fh.write("import sys\n\nimport lore_service\n\nsys.exit(lore_service.main())\n")
    target = os.path.join(DIST, f"{NAME}-{ver}.pyz")
    zipapp.create_archive(stage, target, interpreter="/usr/bin/env python3", compressed=True)
    return target


def human(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=("onedir", "onefile"), default="onedir")
    parser.add_argument("--zipapp", action="store_true", help="also build a .pyz for people who have Python")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    args = parser.parse_args()
    if sys.version_info < (3, 11):  # noqa: UP036 (build.py runs before anything checked the version)
        raise SystemExit("error: build with Python 3.11 or newer (the binary embeds this interpreter)")
    ver = version()
    started = time.monotonic()
    python = build_venv()
    venv_seconds = time.monotonic() - started
    log(f"PyInstaller, layout {args.layout} (a few minutes on 2 cores)")
    exe = pyinstaller(python, args.layout)
    info = ask_version([exe])
    if info.get("version") != ver or info.get("frozen") is not True:
        raise SystemExit(f"error: {exe} reports {info}, expected version {ver}, frozen")
    summary: dict = {
        "layout": args.layout,
        "executable": exe,
        "version": info["version"],
        "python": info["python"],
        "platform": info["platform"],
        "size_bytes": tree_size(os.path.dirname(exe) if args.layout == "onedir" else exe),
    }
    if args.layout == "onedir":
        summary["archive"] = archive(os.path.dirname(exe), ver)
        summary["archive_bytes"] = os.path.getsize(summary["archive"])
    if args.zipapp:
        pyz = zipapp_build(python, ver)
        pyz_info = ask_version([sys.executable, pyz])
        if pyz_info.get("version") != ver:
            raise SystemExit(f"error: {pyz} reports {pyz_info}")
        summary["zipapp"] = pyz
        summary["zipapp_bytes"] = os.path.getsize(pyz)
    summary["venv_seconds"] = round(venv_seconds, 1)
    summary["build_seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    what = "folder" if args.layout == "onedir" else "file"
    print(f"built {NAME} {summary['version']} ({summary['platform']}, Python {summary['python']}, {args.layout})")
    print(f"  executable  {exe}")
    print(f"  size        {human(summary['size_bytes'])} ({what})")
    if "archive" in summary:
        print(f"  download    {summary['archive']} ({human(summary['archive_bytes'])})")
    if "zipapp" in summary:
        print(f"  zipapp      {summary['zipapp']} ({human(summary['zipapp_bytes'])})")
    print(f"  build time  {summary['build_seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
