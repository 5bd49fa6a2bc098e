#!/usr/bin/env python3
"""Build the standalone lore-service for this OS: `python build.py`.

One command from a clean checkout (Python 3.11+, PyPI reachable):

    python build.py                    # dist/lore-service/ (one folder) + its archive
    python build.py --layout onefile   # dist/onefile/lore-service (measured, not shipped)
    python build.py --zipapp           # also dist/lore-service-<version>.pyz (needs Python)
    python build.py --manifests URL_BASE [ARCHIVE ...]
                                       # also dist/lore-service.rb (Homebrew) and
                                       # dist/lore-service.json (Scoop) for those archives
    python build.py --expect-version v0.1.0   # refuse to build unless that is __version__
    python build.py --expect-version v0.1.0 --version-only   # only that check

It creates build/venv from the exact pins in dist-config/build-requirements.txt
(never touching .venv), runs PyInstaller on dist-config/lore-service.spec,
checks that the result answers `--version --json` with the version in
lore_service.py (the one place it is written), and prints path, size, version
and build time. On Windows the folder also holds lore-service-w.exe, the
no-console twin the scheduled task runs.

Provenance and reproducibility: the build bakes the git commit and a build
date into a generated module, lore_service_build (`--version` reports them).
The date is SOURCE_DATE_EPOCH when set, else the commit's own date, and the
archive members carry it too, so building one commit twice gives the same
archive bytes. Next to each archive goes <archive>.sha256, and dist/SHA256SUMS
lists them all (`sha256sum -c SHA256SUMS`). Named ARCHIVEs are not built:
their checksums and manifests are written (the release workflow's last step).

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
# Build date when neither SOURCE_DATE_EPOCH nor git can give one.
EPOCH = 1_700_000_000
STAMP = os.path.join(BUILD, "stamp")  # holds the generated lore_service_build.py
SUMS = "SHA256SUMS"
DESCRIPTION = "Run lore (gitlore) sync by itself, per project, on the OS scheduler"
# The repository has no license file yet: Scoop requires the field, Homebrew does not.
LICENSE = "Unknown"
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


def git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH, else the commit's date: a rebuild of a commit gets the same date."""
    given = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if given:
        if not given.isdigit():
            raise SystemExit(f"error: SOURCE_DATE_EPOCH={given!r} is not a number of seconds")
        return int(given)
    committed = git("log", "-1", "--format=%ct")
    return int(committed) if committed and committed.isdigit() else EPOCH


def write_stamp(epoch: int) -> dict[str, str | None]:
    """build/stamp/lore_service_build.py: what `--version` reports as commit and build date."""
    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"  # built from edited files: the commit alone does not describe it
    built = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    os.makedirs(STAMP, exist_ok=True)
    with open(os.path.join(STAMP, "lore_service_build.py"), "w", encoding="utf-8", newline="\n") as fh:
        fh.write(f'"""Written by build.py."""\n\nCOMMIT = {commit!r}\nBUILD_DATE = {built!r}\n')
    return {"commit": commit, "build_date": built}


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


def pyinstaller(python: str, layout: str, epoch: int) -> str:
    """Run the spec; returns the built executable."""
    distpath = DIST if layout == "onedir" else os.path.join(DIST, "onefile")
    workpath = os.path.join(BUILD, f"pyinstaller-{layout}")
    env = {
        **os.environ,
        "LORE_BUILD_LAYOUT": layout,
        "LORE_BUILD_STAMP": STAMP,
        "PYTHONHASHSEED": "0",
        "SOURCE_DATE_EPOCH": str(epoch),
        # PyInstaller's cache is per user by default: two checkouts building at once corrupt it
        "PYINSTALLER_CONFIG_DIR": os.path.join(BUILD, "pyinstaller-cache"),
    }
    out = os.path.join(distpath, NAME)
    if os.path.isdir(out):
        shutil.rmtree(out)
    cmd = [python, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN"]
    subprocess.run([*cmd, "--distpath", distpath, "--workpath", workpath, SPEC], check=True, env=env, cwd=ROOT)
    return os.path.join(out, NAME + EXE_SUFFIX) if layout == "onedir" else out + EXE_SUFFIX


def archive(folder: str, ver: str, epoch: int, dist: str = DIST) -> str:
    """The one download: the one-folder build as a .tar.gz (.zip on Windows),
    members sorted, owned by root and stamped `epoch` so rebuilds compare equal."""
    base = os.path.join(dist, f"{NAME}-{ver}-{platform_tag()}")
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
                info = zipfile.ZipInfo(os.path.relpath(full, parent).replace(os.sep, "/"), time.gmtime(epoch)[:6])
                info.compress_type = zipfile.ZIP_DEFLATED
                with open(full, "rb") as fh:
                    zf.writestr(info, fh.read())
        return path
    path = base + ".tar.gz"
    import gzip

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = epoch
        return info

    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=epoch) as gz,
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


def zipapp_build(python: str, ver: str, epoch: int) -> str:
    """dist/lore-service-<version>.pyz: lore_service.py, the build stamp and the pure-Python deps."""
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
    shutil.copy2(os.path.join(STAMP, "lore_service_build.py"), stage)
    with open(os.path.join(stage, "__main__.py"), "w", encoding="utf-8") as fh:
        fh.write("import sys\n\nimport lore_service\n\nsys.exit(lore_service.main())\n")
    for here, dirs, files in os.walk(stage):  # zip members carry their files' times
        for name in dirs + files:
            os.utime(os.path.join(here, name), (epoch, epoch))
    target = os.path.join(DIST, f"{NAME}-{ver}.pyz")
    zipapp.create_archive(stage, target, interpreter="/usr/bin/env python3", compressed=True)
    return target


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(archives: list[str]) -> str:
    """<archive>.sha256 next to each archive and SHA256SUMS beside them, in the
    format `sha256sum -c` and `shasum -a 256 -c` read; returns SHA256SUMS's path."""
    folders = {os.path.dirname(os.path.abspath(a)) for a in archives}
    if len(folders) != 1:
        raise SystemExit(f"error: put the archives in one folder for {SUMS}, not {sorted(folders)}")
    lines = []
    for path in sorted(archives, key=os.path.basename):
        line = f"{sha256(path)}  {os.path.basename(path)}\n"
        with open(path + ".sha256", "w", encoding="utf-8", newline="\n") as fh:
            fh.write(line)
        lines.append(line)
    sums = os.path.join(folders.pop(), SUMS)
    with open(sums, "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(lines)
    return sums


def parse_archive(path: str) -> tuple[str, str]:
    """(version, os-arch) from lore-service-<version>-<os>-<arch>.tar.gz|.zip."""
    name = os.path.basename(path)
    stem = name.removesuffix(".tar.gz").removesuffix(".zip")
    parts = stem[len(NAME) + 1 :].split("-") if stem.startswith(NAME + "-") and stem != name else []
    if len(parts) != 3:
        raise SystemExit(f"error: {name} is not named {NAME}-<version>-<os>-<arch>.tar.gz or .zip")
    return parts[0], f"{parts[1]}-{parts[2]}"


def github_repo(url_base: str) -> str:
    """https://github.com/OWNER/NAME/releases/download/<tag> -> https://github.com/OWNER/NAME."""
    parts = url_base.rstrip("/").split("/")
    if len(parts) != 8 or parts[:3] != ["https:", "", "github.com"] or parts[5:7] != ["releases", "download"]:
        raise SystemExit(
            f"error: --manifests wants the release's download URL, https://github.com/OWNER/NAME/releases/download/"
            f"v<version>, not {url_base!r} (Scoop's checkver and autoupdate follow GitHub releases)"
        )
    return "/".join(parts[:5])


def homebrew_formula(url_base: str, ver: str, by_platform: dict[str, str]) -> str:
    """A formula for a tap: the one-folder tree in libexec, bin/lore-service linked to it."""
    blocks = []
    for os_name, block in (("macos", "on_macos"), ("linux", "on_linux")):
        arches = []
        for arch, cpu in (("arm64", "on_arm"), ("x86_64", "on_intel")):
            path = by_platform.get(f"{os_name}-{arch}")
            if path:
                url = f"{url_base}/{os.path.basename(path)}"
                arches.append(f'    {cpu} do\n      url "{url}"\n      sha256 "{sha256(path)}"\n    end\n')
        if arches:
            blocks.append(f"  {block} do\n" + "".join(arches) + "  end\n")
    if not blocks:
        raise SystemExit("error: --manifests: no macOS or Linux .tar.gz archive to put in the Homebrew formula")
    return (
        "# Generated by `python build.py --manifests`; copy it to Formula/lore-service.rb in a tap.\n"
        "class LoreService < Formula\n"
        f'  desc "{DESCRIPTION}"\n'
        f'  homepage "{github_repo(url_base)}"\n'
        f'  version "{ver}"\n\n' + "\n".join(blocks) + "\n"
        "  def install\n"
        '    libexec.install Dir["*"]\n'
        '    bin.install_symlink libexec/"lore-service"\n'
        "  end\n\n"
        "  test do\n"
        '    assert_match "lore-service #{version} (frozen", shell_output("#{bin}/lore-service --version")\n'
        "  end\n"
        "end\n"
    )


def scoop_manifest(url_base: str, ver: str, zip_path: str) -> dict:
    """A Scoop app manifest; autoupdate takes the new hash from the release's <archive>.sha256."""
    repo = github_repo(url_base)
    tag_url = f"{repo}/releases/download/v$version/{NAME}-$version-windows-x86_64.zip"
    return {
        "version": ver,
        "description": DESCRIPTION,
        "homepage": repo,
        "license": LICENSE,
        "architecture": {
            "64bit": {"url": f"{url_base}/{os.path.basename(zip_path)}", "hash": sha256(zip_path)},
        },
        "extract_dir": NAME,
        "bin": f"{NAME}.exe",
        "checkver": {"github": repo},
        "autoupdate": {"architecture": {"64bit": {"url": tag_url, "hash": {"url": "$url.sha256"}}}},
    }


def write_manifests(url_base: str, archives: list[str], dist: str) -> list[str]:
    """dist/lore-service.rb and dist/lore-service.json for the archives there are."""
    url_base = url_base.rstrip("/")
    by_platform: dict[str, str] = {}
    versions = set()
    for path in archives:
        ver, plat = parse_archive(path)
        versions.add(ver)
        by_platform[plat] = path
    if len(versions) != 1:
        raise SystemExit(f"error: --manifests: the archives are of several versions {sorted(versions)}")
    ver = versions.pop()
    written = []
    unix = {k: v for k, v in by_platform.items() if v.endswith(".tar.gz")}
    if unix:
        formula = os.path.join(dist, f"{NAME}.rb")
        with open(formula, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(homebrew_formula(url_base, ver, unix))
        written.append(formula)
    if "windows-x86_64" in by_platform:
        manifest = os.path.join(dist, f"{NAME}.json")
        with open(manifest, "w", encoding="utf-8", newline="\n") as fh:
            json.dump(scoop_manifest(url_base, ver, by_platform["windows-x86_64"]), fh, indent=2)
            fh.write("\n")
        written.append(manifest)
    return written


def human(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def check_tag(tag: str, ver: str) -> None:
    """The release workflow's guard: the tag v<version> names what lore_service.py says."""
    if tag.removeprefix("refs/tags/").removeprefix("v") != ver:
        raise SystemExit(f"error: tag {tag} does not match __version__ {ver!r} in lore_service.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=("onedir", "onefile"), default="onedir")
    parser.add_argument("--zipapp", action="store_true", help="also build a .pyz for people who have Python")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    parser.add_argument("--expect-version", metavar="TAG", help="fail unless TAG (v<version>) is __version__")
    parser.add_argument("--manifests", metavar="URL_BASE", help="write the Homebrew formula and Scoop manifest")
    parser.add_argument("--version-only", action="store_true", help="print __version__ (after --expect-version)")
    parser.add_argument("archives", nargs="*", help="existing archives: checksums and manifests only, no build")
    args = parser.parse_args()
    if sys.version_info < (3, 11):  # noqa: UP036 (build.py runs before anything checked the version)
        raise SystemExit("error: build with Python 3.11 or newer (the binary embeds this interpreter)")
    ver = version()
    if args.expect_version is not None:
        check_tag(args.expect_version, ver)
    if args.version_only:
        print(ver)
        return 0
    if args.archives:
        return publish(args.archives, args.manifests, args.json)
    started = time.monotonic()
    epoch = source_date_epoch()
    stamp = write_stamp(epoch)
    python = build_venv()
    venv_seconds = time.monotonic() - started
    log(f"PyInstaller, layout {args.layout} (a few minutes on 2 cores)")
    exe = pyinstaller(python, args.layout, epoch)
    info = ask_version([exe])
    if info.get("version") != ver or info.get("frozen") is not True or info.get("commit") != stamp["commit"]:
        raise SystemExit(f"error: {exe} reports {info}, expected version {ver}, frozen, commit {stamp['commit']}")
    summary: dict = {
        "layout": args.layout,
        "executable": exe,
        "version": info["version"],
        "commit": info["commit"],
        "build_date": info["build_date"],
        "python": info["python"],
        "platform": info["platform"],
        "size_bytes": tree_size(os.path.dirname(exe) if args.layout == "onedir" else exe),
    }
    archives = []
    if args.layout == "onedir":
        summary["archive"] = archive(os.path.dirname(exe), ver, epoch)
        summary["archive_bytes"] = os.path.getsize(summary["archive"])
        archives.append(summary["archive"])
    if args.zipapp:
        pyz = zipapp_build(python, ver, epoch)
        pyz_info = ask_version([sys.executable, pyz])
        if pyz_info.get("version") != ver:
            raise SystemExit(f"error: {pyz} reports {pyz_info}")
        summary["zipapp"] = pyz
        summary["zipapp_bytes"] = os.path.getsize(pyz)
        archives.append(pyz)
    if archives:
        summary["checksums"] = write_checksums(archives)
        summary["sha256"] = {os.path.basename(a): sha256(a) for a in archives}
    if args.manifests:
        summary["manifests"] = write_manifests(args.manifests, [a for a in archives if not a.endswith(".pyz")], DIST)
    summary["venv_seconds"] = round(venv_seconds, 1)
    summary["build_seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    what = "folder" if args.layout == "onedir" else "file"
    print(f"built {NAME} {summary['version']} ({summary['platform']}, Python {summary['python']}, {args.layout})")
    print(f"  commit      {summary['commit']} (build date {summary['build_date']})")
    print(f"  executable  {exe}")
    print(f"  size        {human(summary['size_bytes'])} ({what})")
    if "archive" in summary:
        print(f"  download    {summary['archive']} ({human(summary['archive_bytes'])})")
    if "zipapp" in summary:
        print(f"  zipapp      {summary['zipapp']} ({human(summary['zipapp_bytes'])})")
    if "checksums" in summary:
        print(f"  checksums   {summary['checksums']}")
    for path in summary.get("manifests", []):
        print(f"  manifest    {path}")
    print(f"  build time  {summary['build_seconds']}s")
    return 0


def publish(archives: list[str], url_base: str | None, as_json: bool) -> int:
    """Checksums (and manifests) for archives built elsewhere: the release's last step."""
    for path in archives:
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} is not a file")
    summary: dict = {
        "checksums": write_checksums(archives),
        "sha256": {os.path.basename(a): sha256(a) for a in sorted(archives)},
    }
    if url_base:
        bundles = [a for a in archives if not a.endswith(".pyz")]
        summary["manifests"] = write_manifests(url_base, bundles, os.path.dirname(os.path.abspath(archives[0])))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {summary['checksums']}" + "".join(f", {m}" for m in summary.get("manifests", [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
