"""The release: build.py's tag guard, checksums, Homebrew formula and Scoop
manifest, and reproducible archives. All through `python build.py` as the
release workflow calls it, on stand-in archives (no PyInstaller run); the
real archive's smoke test is in test_frozen.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import jsonschema
import pytest
from conftest import ROOT, shared_schema

import lore_service as ls

VERSION = ls.__version__
URL_BASE = f"https://github.com/example/lore-service/releases/download/v{VERSION}"
TARGETS = ("linux-x86_64", "macos-arm64", "macos-x86_64", "windows-x86_64")


def build_py(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "build.py"), *argv], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def stand_in_archives(folder: Path, version: str = VERSION) -> dict[str, Path]:
    """One small file per release archive, named as build.py names them."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for target in TARGETS:
        ext = ".zip" if target.startswith("windows") else ".tar.gz"
        path = folder / f"lore-service-{version}-{target}{ext}"
        path.write_bytes(f"archive for {target}\n".encode())
        out[target] = path
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lore_build", ROOT / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------
# the tag guard


def test_a_tag_that_is_not_the_version_stops_the_release_before_any_build() -> None:
    bad = build_py("--expect-version", "v9.9.9")
    assert bad.returncode != 0 and f"tag v9.9.9 does not match __version__ '{VERSION}'" in bad.stderr
    assert "PyInstaller" not in bad.stderr  # refused before building
    good = build_py("--expect-version", f"v{VERSION}", "--version-only")
    assert good.returncode == 0 and good.stdout.strip() == VERSION
    assert build_py("--expect-version", f"refs/tags/v{VERSION}", "--version-only").returncode == 0


# ---------------------------------------------------------------------------
# checksums


def test_checksums_go_next_to_each_archive_and_into_SHA256SUMS(tmp_path: Path) -> None:
    archives = stand_in_archives(tmp_path / "dist")
    r = build_py("--json", *map(str, archives.values()))
    assert r.returncode == 0, r.stderr
    sums = (tmp_path / "dist" / "SHA256SUMS").read_text()
    expected = "".join(f"{sha(p)}  {p.name}\n" for p in sorted(archives.values(), key=lambda p: p.name))
    assert sums == expected
    for path in archives.values():
        assert Path(f"{path}.sha256").read_text() == f"{sha(path)}  {path.name}\n"
    assert json.loads(r.stdout)["sha256"] == {p.name: sha(p) for p in archives.values()}
    if shutil.which("sha256sum"):  # what the README tells Linux users to run
        for listing in ["SHA256SUMS", *(f"{p.name}.sha256" for p in archives.values())]:
            check = subprocess.run(["sha256sum", "-c", listing], cwd=tmp_path / "dist", capture_output=True)
            assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "dist" / "lore-service-0.1.0-macos-arm64.tar.gz").write_bytes(b"tampered")
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path / "dist", capture_output=True)
        assert check.returncode != 0


# ---------------------------------------------------------------------------
# Homebrew and Scoop


@pytest.fixture
def manifests(tmp_path: Path) -> tuple[dict[str, Path], Path, dict]:
    archives = stand_in_archives(tmp_path / "dist")
    r = build_py("--manifests", URL_BASE + "/", *map(str, archives.values()))
    assert r.returncode == 0, r.stderr
    formula = tmp_path / "dist" / "lore-service.rb"
    scoop = json.loads((tmp_path / "dist" / "lore-service.json").read_text())
    return archives, formula, scoop


def test_the_scoop_manifest_validates_and_points_at_the_windows_archive(manifests) -> None:
    archives, _, scoop = manifests
    schema = json.loads(shared_schema("scoop-manifest.schema.json").read_text())
    jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker()).validate(scoop)
    windows = archives["windows-x86_64"]
    assert scoop["version"] == VERSION
    assert scoop["architecture"]["64bit"] == {"url": f"{URL_BASE}/{windows.name}", "hash": sha(windows)}
    assert scoop["bin"] == "lore-service.exe" and scoop["extract_dir"] == "lore-service"
    assert scoop["checkver"] == {"github": "https://github.com/example/lore-service"}
    update = scoop["autoupdate"]["architecture"]["64bit"]
    assert update["url"] == (
        "https://github.com/example/lore-service/releases/download/v$version/lore-service-$version-windows-x86_64.zip"
    )
    assert update["hash"] == {"url": "$url.sha256"}  # the .sha256 build.py publishes next to the archive


def test_the_homebrew_formula_names_each_archive_with_its_sha256_and_tests_version(manifests) -> None:
    archives, formula, _ = manifests
    text = formula.read_text()
    pairs = re.findall(r'url "([^"]+)"\n\s+sha256 "([0-9a-f]{64})"', text)
    expected = {(f"{URL_BASE}/{archives[t].name}", sha(archives[t])) for t in TARGETS if t != "windows-x86_64"}
    assert set(pairs) == expected
    macos = text[text.index("on_macos do") : text.index("on_linux do")]
    assert re.search(r'on_arm do\n\s+url "[^"]+macos-arm64\.tar\.gz"', macos)
    assert re.search(r'on_intel do\n\s+url "[^"]+macos-x86_64\.tar\.gz"', macos)
    assert 'libexec.install Dir["*"]' in text and 'bin.install_symlink libexec/"lore-service"' in text
    test_block = text[text.index("test do") :]
    assert '"#{bin}/lore-service --version"' in test_block and "#{version}" in test_block
    ruby = shutil.which("ruby")
    if not ruby:
        if os.environ.get("LORE_E2E_REQUIRED") == "1":
            pytest.fail("ruby is not installed (run-tests installs Debian's ruby as root)")
        pytest.skip("ruby not installed: `ruby -c` not run (apt-get install ruby)")
    check = subprocess.run([ruby, "-c", str(formula)], capture_output=True, text=True)
    assert check.returncode == 0 and "Syntax OK" in check.stdout, check.stdout + check.stderr


def test_manifests_need_a_github_release_url(tmp_path: Path) -> None:
    archives = stand_in_archives(tmp_path / "dist")
    r = build_py("--manifests", "https://example.com/downloads", *map(str, archives.values()))
    assert r.returncode != 0 and "releases/download" in r.stderr
    assert not (tmp_path / "dist" / "lore-service.json").exists()


def test_archives_of_two_versions_make_no_manifest(tmp_path: Path) -> None:
    old = stand_in_archives(tmp_path / "dist", version="0.0.9")
    new = stand_in_archives(tmp_path / "dist")
    r = build_py("--manifests", URL_BASE, str(old["macos-arm64"]), str(new["windows-x86_64"]))
    assert r.returncode != 0 and "several versions" in r.stderr


# ---------------------------------------------------------------------------
# reproducible archives


def test_the_archive_is_byte_identical_for_the_same_tree_and_epoch(tmp_path: Path) -> None:
    """What makes two builds of a commit compare equal: member order, owners and
    times come from the epoch, not from the disk (the full two-build check is
    measured in the README)."""
    build = load_build()
    folder = tmp_path / "one" / "lore-service"
    (folder / "_internal").mkdir(parents=True)
    (folder / "lore-service").write_bytes(b"\x7fELF stand-in")
    (folder / "_internal" / "b.so").write_bytes(b"b")
    (folder / "_internal" / "a.zip").write_bytes(b"a")
    for d in ("d1", "d2", "d3"):
        (tmp_path / d).mkdir()
    first = Path(build.archive(str(folder), VERSION, 1_750_000_000, str(tmp_path / "d1")))
    os.utime(folder / "_internal" / "a.zip", (1, 1))  # a rebuild writes the files at another time
    second = Path(build.archive(str(folder), VERSION, 1_750_000_000, str(tmp_path / "d2")))
    assert first.read_bytes() == second.read_bytes()
    third = Path(build.archive(str(folder), VERSION, 1_760_000_000, str(tmp_path / "d3")))
    assert third.read_bytes() != first.read_bytes()  # the epoch is what the archive carries


def test_the_build_date_is_SOURCE_DATE_EPOCH_else_the_commits_date(monkeypatch: pytest.MonkeyPatch) -> None:
    build = load_build()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1750000000")
    assert build.source_date_epoch() == 1_750_000_000
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    committed = build.git("log", "-1", "--format=%ct")
    assert build.source_date_epoch() == (int(committed) if committed else build.EPOCH)
