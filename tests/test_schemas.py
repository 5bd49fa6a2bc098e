"""The JSON Schemas in specs/schemas/ against REAL outputs.

Every document validated here was produced by the product itself (main(argv)
with the fake backend and the fake `lore`): manifest.json and status.json on
disk, and the --json robot envelope with its per-command data. A schema that
drifts from the code, or code that drifts from the spec, fails here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import TOKEN, edit_config, write_plan
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "specs" / "schemas"
SCHEMA_FILES = sorted(SCHEMA_DIR.glob("*.schema.json"))
EXPECTED = {
    "manifest.schema.json",
    "status.schema.json",
    "envelope.schema.json",
    "status-output.schema.json",
    "doctor-output.schema.json",
    "version-output.schema.json",
    "event.schema.json",
    "history-output.schema.json",
}


def _load(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))


def _registry() -> Registry:
    resources = []
    for path in SCHEMA_FILES:
        schema = json.loads(path.read_text(encoding="utf-8"))
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


REGISTRY = _registry()


def validate(instance: Any, schema_name: str, ref: str = "") -> None:
    """Validate with the schema (or one of its $defs via a JSON pointer ref)."""
    schema = _load(schema_name)
    if ref:
        schema = {"$ref": schema["$id"] + ref}
    validator = jsonschema.Draft202012Validator(schema, registry=REGISTRY)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, f"{schema_name}{ref}: " + "; ".join(
        f"at /{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
    )


def envelope(result: Any) -> dict[str, Any]:
    """stdout is exactly one JSON document, and it is a valid envelope."""
    lines = [line for line in result.out.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON document on stdout, got: {result.out!r}"
    doc = json.loads(lines[0])
    validate(doc, "envelope.schema.json")
    assert TOKEN not in result.out
    return doc


def sid_paths(home: Path, sid: str) -> tuple[Path, Path]:
    return home / "config" / sid / "manifest.json", home / "state" / sid / "status.json"


def read_json(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    assert TOKEN not in text, f"the token leaked into {path}"
    return json.loads(text)


# -- the schema files themselves -------------------------------------------------------


def test_every_expected_schema_exists() -> None:
    assert {p.name for p in SCHEMA_FILES} >= EXPECTED


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_schema_is_valid_2020_12(path: Path) -> None:
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith("/" + path.name)
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_schema_refs_resolve(path: Path) -> None:
    """Every $ref (including cross-file ones) resolves through the registry."""
    schema = json.loads(path.read_text(encoding="utf-8"))
    resolver = REGISTRY.resolver(base_uri=schema["$id"])

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                resolver.lookup(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)


# -- manifest.json -----------------------------------------------------------------------


def test_install_writes_a_valid_manifest(cli, home: Path, lore_bin: Path) -> None:
    result = cli("--json", "install", "--backend", "fake", "--interval", "45m", "--profile", "full")
    assert result.code == 0, result.err + result.out
    doc = envelope(result)
    sid = doc["data"]["service_id"]
    manifest_path, status_path = sid_paths(home, sid)
    manifest = read_json(manifest_path)
    validate(manifest, "manifest.schema.json")
    assert manifest["interval_seconds"] == 45 * 60
    assert manifest["profile"] == "full"
    assert manifest["token_source"] == "env-file"
    assert not status_path.exists()  # no runs yet


def test_reinstall_keeps_manifest_valid(cli, installed: dict[str, Any], home: Path) -> None:
    result = cli("--json", "install", "--backend", "fake", "--interval", "2h")
    assert result.code == 0, result.err + result.out
    envelope(result)
    manifest = read_json(sid_paths(home, installed["service_id"])[0])
    validate(manifest, "manifest.schema.json")
    assert manifest["interval_seconds"] == 7200


def test_install_dry_run_envelope(cli) -> None:
    result = cli("--json", "install", "--backend", "fake", "--dry-run")
    assert result.code == 0, result.err + result.out
    doc = envelope(result)
    assert doc["data"]["dry_run"] is True
    manifest_file = next(f for f in doc["data"]["files"] if f["path"].endswith("manifest.json"))
    validate(json.loads(manifest_file["content"]), "manifest.schema.json")


# -- status.json and run output ------------------------------------------------------------


def test_success_run(cli, installed: dict[str, Any], home: Path) -> None:
    result = cli("--json", "trigger")
    assert result.code == 0, result.err + result.out
    doc = envelope(result)
    assert doc["data"]["run"]["outcome"] == "success"
    status = read_json(sid_paths(home, installed["service_id"])[1])
    validate(status, "status.schema.json")
    assert status["last_run"]["outcome"] == "success"
    assert status["last_run"]["trigger"] == "manual"
    assert [s["stage"] for s in status["last_run"]["stage_results"]] == ["issues", "mrs", "docs"]
    assert status["next_retry_at_ms"] is None and status["paused"] is None


def test_degraded_run(cli, installed: dict[str, Any], home: Path, project: Path) -> None:
    write_plan(project, {"docs": {"exit": 1}})
    result = cli("--json", "run")
    assert result.code == 0, result.err + result.out
    doc = envelope(result)
    assert doc["data"]["run"]["outcome"] == "degraded"
    assert doc["data"]["state"] == "degraded"
    status = read_json(sid_paths(home, installed["service_id"])[1])
    validate(status, "status.schema.json")
    docs = status["last_run"]["stage_results"][2]
    assert docs == {**docs, "stage": "docs", "critical": False, "outcome": "failed", "exit_code": 1}
    assert status["consecutive_failures"] == 0


def test_failed_run_with_backoff(cli, installed: dict[str, Any], home: Path, project: Path) -> None:
    write_plan(project, {"issues": {"exit": 75}, "mrs": {"exit": 75}})
    result = cli("--json", "run")
    assert result.code == 1, result.err + result.out
    doc = envelope(result)
    assert doc["ok"] is False and doc["error"]["code"] == "run_failed"
    assert doc["data"]["run"]["outcome"] == "failed"
    status = read_json(sid_paths(home, installed["service_id"])[1])
    validate(status, "status.schema.json")
    assert status["consecutive_failures"] == 1
    assert isinstance(status["next_retry_at_ms"], int)
    assert status["last_run"]["error_class"] == "transient"
    # docs is optional and no critical stage succeeded: skipped
    assert status["last_run"]["stage_results"][2]["outcome"] == "skipped"

    # the scheduled run inside the backoff window is skipped, exit 0
    skipped = cli("--json", "run")
    assert skipped.code == 0, skipped.err + skipped.out
    sdoc = envelope(skipped)
    assert sdoc["data"]["skipped"] is True
    out = cli("--json", "status")
    assert out.code == 0
    sdata = envelope(out)["data"]
    validate(sdata, "status-output.schema.json")
    assert sdata["state"] == "backoff"


def test_timeout_and_permanent_pause(cli, installed: dict[str, Any], home: Path, project: Path) -> None:
    edit_config(home, installed["service_id"], lambda d: d["stages"]["mrs"].update(timeout_seconds=1))
    # issues fails permanently (78), mrs hangs and times out -> paused permanent_error
    write_plan(project, {"issues": {"exit": 78}, "mrs": {"hang": True}})
    result = cli("--json", "trigger")
    assert result.code == 1, result.err + result.out
    envelope(result)
    status = read_json(sid_paths(home, installed["service_id"])[1])
    validate(status, "status.schema.json")
    by_stage = {s["stage"]: s for s in status["last_run"]["stage_results"]}
    assert by_stage["issues"]["error_class"] == "permanent"
    assert by_stage["mrs"]["outcome"] == "timeout"
    assert by_stage["docs"]["outcome"] == "skipped"
    assert status["paused"]["kind"] == "permanent_error"


def test_paused_runs(cli, installed: dict[str, Any], home: Path) -> None:
    paused = cli("--json", "pause", "--reason", "maintenance window")
    assert paused.code == 0
    pdoc = envelope(paused)
    validate(pdoc["data"]["paused"], "status.schema.json", "#/$defs/pause")

    run = cli("--json", "run")
    assert run.code == 0, run.err + run.out
    rdoc = envelope(run)
    assert rdoc["data"]["skipped"] is True and rdoc["data"]["run"] is None

    trig = cli("--json", "trigger")
    assert trig.code != 0
    tdoc = envelope(trig)
    assert tdoc["ok"] is False and tdoc["error"]["code"] == "paused"

    status = read_json(sid_paths(home, installed["service_id"])[1])
    validate(status, "status.schema.json")
    assert status["paused"]["kind"] == "manual" and status["last_run"] is None

    out = cli("--json", "status")
    data = envelope(out)["data"]
    validate(data, "status-output.schema.json")
    assert data["state"] == "paused"

    resumed = cli("--json", "resume")
    assert resumed.code == 0
    envelope(resumed)
    validate(read_json(sid_paths(home, installed["service_id"])[1]), "status.schema.json")


def test_circuit_breaker_pause(cli, installed: dict[str, Any], home: Path, project: Path) -> None:
    edit_config(home, installed["service_id"], lambda d: d["circuit_breaker"].update(threshold=2))
    write_plan(project, {"issues": {"exit": 75}})
    for _ in range(2):
        result = cli("--json", "trigger")
        assert result.code == 1, result.err + result.out
        envelope(result)
    status = read_json(sid_paths(home, installed["service_id"])[1])
    validate(status, "status.schema.json")
    assert status["paused"]["kind"] == "circuit_breaker"
    assert len(status["history"]) == 2


# -- status / list / logs / doctor output ------------------------------------------------


def test_status_output_idle_and_after_runs(cli, installed: dict[str, Any], project: Path) -> None:
    idle = cli("--json", "status")
    assert idle.code == 0, idle.err + idle.out
    data = envelope(idle)["data"]
    validate(data, "status-output.schema.json")
    assert data["state"] == "idle" and data["last_run"] is None

    assert cli("--json", "trigger").code == 0
    after = envelope(cli("--json", "status"))["data"]
    validate(after, "status-output.schema.json")
    assert after["state"] == "healthy"
    assert after["scheduler"]["registered"] is True

    everything = cli("--json", "status", "--all")
    assert everything.code == 0
    all_data = envelope(everything)["data"]
    validate(all_data, "status-output.schema.json", "#/$defs/status_all")
    assert [s["service_id"] for s in all_data["services"]] == [installed["service_id"]]


def test_status_output_reports_scheduler_drift(cli, installed: dict[str, Any], home: Path) -> None:
    entry = home / "fake-scheduler" / f"{installed['service_id']}.json"
    entry.unlink()
    data = envelope(cli("--json", "status"))["data"]
    validate(data, "status-output.schema.json")
    assert data["scheduler"]["drift"]


@pytest.mark.parametrize("argv", [("list",), ("logs", "--tail", "5"), ("--version",)])
def test_other_commands_envelope(cli, installed: dict[str, Any], argv: tuple[str, ...]) -> None:
    assert cli("--json", "trigger").code == 0
    result = cli("--json", *argv)
    assert result.code == 0, result.err + result.out
    envelope(result)


def test_doctor_output_installed(cli, installed: dict[str, Any]) -> None:
    result = cli("--json", "doctor")
    doc = envelope(result)
    assert doc["ok"] is True
    validate(doc["data"], "doctor-output.schema.json")
    assert doc["data"]["service_id"] == installed["service_id"]
    assert result.code == (1 if doc["data"]["failed"] else 0)


def test_doctor_output_failing_check(cli, installed: dict[str, Any], home: Path) -> None:
    (home / "config" / installed["service_id"] / "token.env").unlink()
    result = cli("--json", "doctor")
    assert result.code == 1
    data = envelope(result)["data"]
    validate(data, "doctor-output.schema.json")
    assert any(c["name"] == "token" and c["status"] == "fail" for c in data["checks"])


def test_doctor_output_readiness(cli) -> None:
    result = cli("--json", "doctor")
    data = envelope(result)["data"]
    validate(data, "doctor-output.schema.json")
    assert data["service_id"] is None
    assert result.code == (1 if data["failed"] else 0)


# -- error envelopes ---------------------------------------------------------------------


def test_status_not_installed_is_exit_3(cli) -> None:
    result = cli("--json", "status")
    assert result.code == 3
    doc = envelope(result)
    assert doc["ok"] is False
    assert doc["error"]["code"] == "not_installed"
    assert doc["data"] == {"state": "not_installed"}


@pytest.mark.parametrize("interval", ["5s", "4m", "25h", "0m", "abc", "", "30", "²h"])
def test_bad_interval_is_exit_2(cli, lore_bin: Path, interval: str) -> None:
    result = cli("--json", "install", "--backend", "fake", "--interval", interval)
    assert result.code == 2, result.out
    doc = envelope(result)
    assert doc["ok"] is False and doc["command"] == "install"
    assert doc["error"]["code"] == "bad_interval"


def test_bad_name_is_exit_2(cli, lore_bin: Path) -> None:
    result = cli("--json", "install", "--backend", "fake", "--name", "Bad_Name")
    assert result.code == 2
    doc = envelope(result)
    assert doc["error"]["code"] == "bad_name"


@pytest.mark.parametrize("argv", [(), ("frobnicate",), ("status", "--bogus")])
def test_usage_errors_are_exit_2(cli, argv: tuple[str, ...]) -> None:
    result = cli("--json", *argv)
    assert result.code == 2
    doc = envelope(result)
    assert doc["error"]["code"] == "usage"


def test_corrupt_status_is_exit_4(cli, installed: dict[str, Any], home: Path) -> None:
    status_path = sid_paths(home, installed["service_id"])[1]
    status_path.parent.mkdir(parents=True, exist_ok=True)
    status_path.write_text("{not json", encoding="utf-8")
    result = cli("--json", "status")
    assert result.code == 4
    doc = envelope(result)
    assert doc["error"]["code"] == "state_corrupt"
    assert status_path.read_text(encoding="utf-8") == "{not json"  # never overwritten


def test_newer_schema_manifest_is_exit_4(cli, installed: dict[str, Any], home: Path) -> None:
    manifest_path = sid_paths(home, installed["service_id"])[0]
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["schema_version"] = 2
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    result = cli("--json", "status")
    assert result.code == 4
    assert envelope(result)["error"]["code"] == "state_newer_schema"


def test_invalid_config_table_is_exit_4(cli, installed: dict[str, Any], home: Path) -> None:
    """A hand-edited service.toml with a wrong-typed table is a state error (exit 4), not an internal one."""
    cfg = home / "config" / installed["service_id"] / "service.toml"
    text = cfg.read_text(encoding="utf-8")
    cfg.write_text(text.replace("[backoff]\n", "backoff = 5\n\n[unused]\n", 1), encoding="utf-8")
    result = cli("--json", "run")
    doc = envelope(result)
    assert (result.code, doc["error"]["code"]) == (4, "config_invalid")


def test_json_help_is_one_document(cli) -> None:
    """With --json, stdout is exactly one JSON document, even for --help."""
    result = cli("--json", "--help")
    assert result.code == 0
    envelope(result)


def test_version_json_from_source_validates_and_has_no_baked_provenance(cli) -> None:
    result = cli("--json", "--version")
    data = envelope(result)["data"]
    validate(data, "version-output.schema.json")
    assert data["layout"] == "source" and data["commit"] is None and data["build_date"] is None
    text = cli("--version")
    assert text.out.startswith(f"lore-service {data['version']} (source, Python ") and "commit" not in text.out


def test_version_reports_the_commit_and_date_a_build_baked_in(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """build.py bundles a generated lore_service_build module; --version reads it."""
    import types

    stamp = types.ModuleType("lore_service_build")
    stamp.COMMIT = "0123456789abcdef0123456789abcdef01234567"  # type: ignore[attr-defined]
    stamp.BUILD_DATE = "2026-11-29T12:00:00Z"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lore_service_build", stamp)
    data = envelope(cli("--json", "--version"))["data"]
    validate(data, "version-output.schema.json")
    assert (data["commit"], data["build_date"]) == (stamp.COMMIT, stamp.BUILD_DATE)
    assert cli("--version").out.rstrip().endswith(f"; commit {stamp.COMMIT}, built 2026-11-29T12:00:00Z)")


def test_status_check_token_and_export_outputs_match_the_schemas(cli, installed: dict[str, Any], system) -> None:
    import time

    assert cli("--json", "trigger").code == 0
    doc = envelope(cli("--json", "status", "--check", "--all"))
    assert doc["ok"] is True and doc["data"]["services"][0]["ok"] is True
    system.clock_ms = int(time.time() * 1000) + 8 * 3600 * 1000  # no success for 8h: stale
    doc = envelope(cli("--json", "status", "--check"))
    assert doc["ok"] is False and doc["error"]["code"] == "unhealthy" and doc["data"]["services"][0]["problems"]
    system.clock_ms = None
    assert envelope(cli("--json", "token"))["data"]["found"] is True
    assert envelope(cli("--json", "export", "--image", "registry.example/lore:1"))["ok"] is True


def test_skipped_runs_validate_in_the_envelope_and_in_status_json(cli, installed, project, home, tmp_path, monkeypatch):
    sid = installed["service_id"]
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "away")
    for command in ("run", "run", "trigger"):
        doc = envelope(cli("--json", command, "--name", sid))
        assert doc["data"]["run"]["outcome"] == "skipped"
    _, status_path = sid_paths(home, sid)
    status = read_json(status_path)
    validate(status, "status.schema.json")
    assert status["last_skip"]["repeats"] == 3
    validate(envelope(cli("--json", "status", "--name", sid))["data"], "status-output.schema.json")


def test_history_output_validates_with_runs_of_every_outcome(cli, installed, project, home, tmp_path, monkeypatch):
    sid = installed["service_id"]
    for plan in ({"docs": {"exit": 3}}, {"mrs": {"exit": 75}}, {}):
        write_plan(project, plan)
        cli("--json", "trigger")
    assert envelope(cli("--json", "history"))["data"]["runs"] != []
    monkeypatch.chdir(tmp_path)
    project.rename(tmp_path / "away")
    for _ in range(2):
        assert cli("--json", "run", "--name", sid).code == 0
    doc = envelope(cli("--json", "history", "--name", sid, "--limit", "4"))
    validate(doc["data"], "history-output.schema.json")
    assert [(r["outcome"], r["repeats"]) for r in doc["data"]["runs"]] == [
        ("skipped", 2),
        ("success", 1),
        ("failed", 1),
        ("degraded", 1),
    ]
    bad = envelope(cli("--json", "history", "--name", sid, "--limit", "none"))
    assert bad["ok"] is False and bad["error"]["code"] == "usage"
