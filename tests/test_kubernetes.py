"""`export --format kubernetes`: the sync as a CronJob, validated against the
official Kubernetes schemas (strict), held to the Pod Security "restricted"
profile, and its containers' command lines run here the way a pod runs them.
No cluster is needed or contacted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import FAKE_LORE, SCRIPT, TOKEN

import lore_service as ls

kubernetes_validate = pytest.importorskip("kubernetes_validate")


def export(cli, *argv: str) -> tuple[dict[str, Any], str]:
    """The robot document's manifest, and the text a person pipes to kubectl."""
    robot = cli("--json", "export", "--image", "registry.example/lore:1.2", *argv)
    assert robot.code == 0, robot.out + robot.err
    human = cli("export", "--image", "registry.example/lore:1.2", *argv)
    assert human.code == 0, human.err
    return robot.data, human.out


def items(text: str) -> list[dict[str, Any]]:
    """What kubectl reads from the printed text: comment lines, then one JSON List."""
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    document = json.loads(body)
    assert document["kind"] == "List"
    return document["items"]


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def cron_job(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "CronJob")


def pod_of(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["jobTemplate"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("interval", ["5m", "45m", "90m", "7h", "24h"])
def test_every_interval_exports_manifests_the_official_schemas_accept(cli, interval):
    data, text = export(cli, "--interval", interval)
    objects = items(text)
    assert objects == data["manifest"]["items"]  # people and robots get the same manifests
    for obj in objects:
        validate(obj)
    job = cron_job(objects)
    seconds = ls.parse_interval(interval)
    # the very expression the cron backend would install, in UTC
    assert job["spec"]["schedule"] == ls.cron_expression(data["service_id"], ls.cron_step(seconds))
    assert job["spec"]["timeZone"] == "Etc/UTC" and job["spec"]["concurrencyPolicy"] == "Forbid"
    assert job["spec"]["startingDeadlineSeconds"] > 0
    assert job["spec"]["successfulJobsHistoryLimit"] == 3 and job["spec"]["failedJobsHistoryLimit"] == 3
    spec = job["spec"]["jobTemplate"]["spec"]
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == ls.DEFAULT_RUN_BUDGET + 60


@pytest.mark.parametrize(
    "folder",
    ['it\'s "a" pro$HOME 100% ;é', "x" * 120, "-leading-dash-", "UPPER Case"],
)
def test_awkward_project_names_and_long_ids_still_make_valid_names(cli, tmp_path, folder):
    project = tmp_path / folder
    project.mkdir()
    data, text = export(cli, "--project", str(project))
    for obj in items(text):
        validate(obj)
        assert len(obj["metadata"]["name"]) <= (52 if obj["kind"] == "CronJob" else 253)
    assert cron_job(items(text))["metadata"]["annotations"]["lore-service/project"] == str(project.resolve())


def test_an_id_of_48_characters_is_shortened_with_a_hash_not_cut(cli):
    sid = "a" * 47 + "b"
    data, text = export(cli, "--name", sid)
    name = cron_job(items(text))["metadata"]["name"]
    assert len(name) <= 52 and name.startswith("lore-aaaa") and name != f"lore-{sid}"[:52]
    other = cron_job(items(export(cli, "--name", "a" * 47 + "c")[1]))["metadata"]["name"]
    assert other != name  # two long ids never share a CronJob


def test_every_flag_reaches_the_manifest(cli, tmp_path):
    data, text = export(
        cli,
        "--name", "acme-api", "--interval", "2h", "--profile", "full", "--token-env", "LORE_TOKEN",
        "--namespace", "sync", "--storage-class", "fast-ssd", "--storage-size", "20Gi",
        "--secret-name", "acme-token", "--mount-path", "/srv/lore/", "--program", "/opt/lore-service/lore-service",
        "--lore", "/opt/lore/bin/lore", "--cpu-request", "250m", "--cpu-limit", "2",
        "--memory-request", "512Mi", "--memory-limit", "2Gi", "--status-job",
    )  # fmt: skip
    objects = items(text)
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["namespace"] == "sync"
    kinds = [o["kind"] for o in objects]
    assert kinds == ["PersistentVolumeClaim", "CronJob", "Job"]
    claim = objects[0]["spec"]
    assert claim["storageClassName"] == "fast-ssd" and claim["resources"]["requests"]["storage"] == "20Gi"
    pod = pod_of(objects[1])
    install, run = pod["initContainers"][0], pod["containers"][0]
    assert run["command"] == ["/opt/lore-service/lore-service", "run", "--service-id", "acme-api"]
    assert install["command"][:2] == ["/opt/lore-service/lore-service", "install"]
    expected = {"--interval": "2h", "--profile": "full", "--token-env": "LORE_TOKEN", "--lore": "/opt/lore/bin/lore"}
    expected |= {"--project": "/srv/lore", "--token-source": "environment"}
    for flag, value in expected.items():
        assert install["command"][install["command"].index(flag) + 1] == value
    assert run["resources"] == {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
    env = {e["name"]: e for e in run["env"]}
    assert env["LORE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "acme-token", "key": "LORE_TOKEN"}
    assert env["LORE_SERVICE_HOME"]["value"] == "/srv/lore/.lore-service"
    secret = 'kubectl create secret generic acme-token -n sync --from-literal=LORE_TOKEN="$LORE_TOKEN"'
    assert data["secret_command"] == secret
    assert data["secret_command"] in text  # and people are told how to make it
    status = objects[2]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert status == ["/opt/lore-service/lore-service", "status", "--service-id", "acme-api"]


def test_an_installed_service_exports_its_own_options(cli, installed):
    cli("--json", "install", "--backend", "fake", "--interval", "45m", "--profile", "fast")
    data, text = export(cli)
    install = pod_of(cron_job(items(text)))["initContainers"][0]["command"]
    assert data["service_id"] == installed["service_id"]
    assert install[install.index("--interval") + 1] == "45m" and install[install.index("--profile") + 1] == "fast"


def test_the_pods_pass_the_restricted_profile_field_by_field_and_hold_no_token(cli, environ):
    data, text = export(cli, "--status-job")
    assert TOKEN not in text and TOKEN not in json.dumps(data)
    pods = [pod_of(o) if o["kind"] == "CronJob" else o["spec"]["template"]["spec"] for o in items(text)[1:]]
    for pod in pods:
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
        for container in pod["containers"] + pod.get("initContainers", []):
            csc = container["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False
            assert csc["capabilities"] == {"drop": ["ALL"]}
            assert csc["readOnlyRootFilesystem"] is True
            assert csc["runAsNonRoot"] is True and csc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert container["resources"]["requests"] and container["resources"]["limits"]
            writable = {m["mountPath"] for m in container["volumeMounts"]}
            assert writable == {"/data", "/tmp"}  # only the volume and /tmp
            tokens = [e for e in container["env"] if e["name"] == "GITLAB_TOKEN"]
            assert len(tokens) == 1 and set(tokens[0]) == {"name", "valueFrom"}  # never a value
            assert tokens[0]["valueFrom"]["secretKeyRef"]["key"] == "GITLAB_TOKEN"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}} and "persistentVolumeClaim" in volumes["data"]
        assert all("hostPath" not in v for v in pod["volumes"])


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--image", ""], "empty_value"),
        (["--namespace", "Not_A_Name"], "bad_name"),
        (["--storage-size", "lots"], "bad_quantity"),
        (["--cpu-limit", "1.5.2"], "bad_quantity"),
        (["--mount-path", "relative/dir"], "usage"),
        (["--mount-path", "/tmp"], "usage"),
        (["--interval", "4m"], "bad_interval"),
        (["--token-env", "1BAD"], "bad_env"),
    ],
)
def test_bad_export_options_are_refused_with_exit_2(cli, argv, code):
    r = cli("--json", "export", "--image", "registry.example/lore:1", *argv)
    assert r.code == 2 and r.doc["error"]["code"] == code, r.out


# -- doctor --kubernetes --------------------------------------------------------------------------------


def test_doctor_checks_an_exported_manifest_without_a_cluster(cli, tmp_path):
    _, text = export(cli, "--interval", "90m")
    path = tmp_path / "sync.yaml"
    path.write_text(text)
    r = cli("--json", "doctor", "--kubernetes", str(path))
    assert r.code == 0, r.out
    assert {c["name"]: c["status"] for c in r.data["checks"]} == {
        "manifest": "ok", "image": "ok", "token": "ok", "schedule": "ok", "home volume": "ok",
    }  # fmt: skip


@pytest.mark.parametrize("damage", ["inline token", "schedule", "home off the volume", "no image"])
def test_doctor_fails_a_manifest_that_lost_what_it_needs(cli, tmp_path, damage):
    _, text = export(cli)
    objects = items(text)
    pod = pod_of(cron_job(objects))
    run = pod["containers"][0]
    if damage == "inline token":
        run["env"] = [e for e in run["env"] if e["name"] != "GITLAB_TOKEN"] + [{"name": "GITLAB_TOKEN", "value": "x"}]
    elif damage == "schedule":
        cron_job(objects)["spec"]["schedule"] = "0 * * * *"
    elif damage == "home off the volume":
        next(e for e in run["env"] if e["name"] == "LORE_SERVICE_HOME")["value"] = "/home/lore"
    else:
        run["image"] = ""
    path = tmp_path / "sync.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    r = cli("--json", "doctor", "--kubernetes", str(path))
    assert r.code == 1 and r.doc["error"]["code"] == "checks_failed"
    failing = [c["name"] for c in r.data["checks"] if c["status"] == "fail"]
    assert failing == [{"inline token": "token", "schedule": "schedule", "home off the volume": "home volume",
                        "no image": "image"}[damage]]  # fmt: skip


# -- the pod's own command lines, run here as the pod runs them --------------------------------------


def test_the_containers_command_lines_run_as_the_pod_runs_them(cli, tmp_path):
    """Non-root uid 65532, a read-only working folder, the home on a (temporary)
    volume, the token from the environment: install step, then the sync. The
    run is recorded on the volume and its log lines appear on stdout."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
        if os.environ.get("LORE_E2E_REQUIRED") == "1":
            pytest.fail("needs root, setpriv and /usr/bin/python3 to run as the pod's user")
        pytest.skip("needs root, setpriv and /usr/bin/python3 to run as the pod's user")
    import tempfile

    import tomli_w

    base = Path(tempfile.mkdtemp(prefix="lore-pod-"))  # not under pytest's private temp folder
    try:
        base.chmod(0o755)
        image = base / "image"  # what the image holds: lore-service (from source here) and lore
        image.mkdir()
        shutil.copy(SCRIPT, image / "lore_service.py")
        shutil.copy(FAKE_LORE, image / "fake_lore.py")
        shutil.copytree(Path(tomli_w.__file__).parent, image / "tomli_w")
        program, lore = image / "lore-service", image / "lore"
        program.write_text(f'#!/bin/sh\nexec /usr/bin/python3 {image / "lore_service.py"} "$@"\n')
        lore.write_text(f'#!/bin/sh\nexec /usr/bin/python3 {image / "fake_lore.py"} "$@"\n')
        for path in [image, *image.rglob("*")]:
            path.chmod(0o755)
        volume = base / "volume"
        volume.mkdir()
        os.chown(volume, ls.K8S_RUN_AS, ls.K8S_RUN_AS)  # as fsGroup leaves a fresh claim
        readonly = base / "readonly"
        readonly.mkdir(mode=0o555)
        _, text = export(cli, "--mount-path", str(volume), "--program", str(program), "--lore", str(lore))
        pod = pod_of(cron_job(items(text)))
        steps = [pod["initContainers"][0], pod["containers"][0]]
        for container in steps:
            env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(image)}
            for e in container["env"]:
                env[e["name"]] = TOKEN if "valueFrom" in e else e["value"]
            uid = f"--reuid={ls.K8S_RUN_AS}"
            argv = ["setpriv", uid, f"--regid={ls.K8S_RUN_AS}", "--clear-groups", "--", *container["command"]]
            result = subprocess.run(argv, cwd=readonly, env=env, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, (container["name"], result.stdout, result.stderr)
            assert TOKEN not in result.stdout + result.stderr
        out = result.stdout
        assert "[issues] start: " in out and "[run] run " in out and " success in " in out  # `kubectl logs` has it
        home = volume / ".lore-service"
        sid = json.loads((next((home / "config").iterdir()) / "manifest.json").read_text())["service_id"]
        status = json.loads((home / "state" / sid / "status.json").read_text())
        assert status["last_run"]["outcome"] == "success" and status["last_run"]["trigger"] == "scheduled"
        manifest = json.loads((home / "config" / sid / "manifest.json").read_text())
        assert manifest["token_source"] == "environment" and not (home / "config" / sid / "token.env").exists()
        calls = [json.loads(line) for line in (volume / ".fake-lore-calls.jsonl").read_text().splitlines()]
        assert [c["stage"] for c in calls] == ["issues", "mrs", "docs"] and all(c["token_set"] for c in calls)
    finally:
        shutil.rmtree(base, ignore_errors=True)
