"""infra/k8s short of a cluster: every object against its schema, the project's rules, the Serve
config against the application's own, misspelt keys refused, and checkov's policies.

The commands inside the manifests are run as written in tests/test_infra_cluster.py."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.infra import (
    IMAGE,
    INFRA,
    K8S,
    ROOT,
    Obj,
    find,
    load_documents,
    pod_templates,
    project_problems,
    render,
    schema_problems,
)

OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))


def ray_version() -> str:
    import ray

    return ray.__version__


@pytest.fixture(scope="module", params=[K8S / "base", *OVERLAYS], ids=lambda p: p.relative_to(K8S).as_posix())
def rendered(request) -> list[Obj]:
    return render(request.param)


def test_every_object_passes_its_schema(rendered):
    problems = [p for obj in rendered for p in schema_problems(obj)]
    assert not problems, "\n".join(problems)
    kinds = {o["kind"] for o in rendered}
    assert {"RayJob", "RayService", "Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds


def test_every_object_follows_the_project_rules(rendered):
    problems = project_problems(rendered, ray_version())
    assert not problems, "\n".join(problems)


def test_the_overlays_change_only_configuration_and_identity():
    base = {(o["kind"], o["metadata"]["name"]): o for o in render(K8S / "base")}
    for overlay in OVERLAYS:
        for obj in render(overlay):
            key = (obj["kind"], obj["metadata"]["name"])
            if obj["kind"] == "ConfigMap":
                assert set(obj["data"]) == set(base[key]["data"]), f"{overlay.name}: a ConfigMap key that base lacks"
            elif obj["kind"] == "ServiceAccount":
                assert set(obj["metadata"].get("annotations", {})) <= {"eks.amazonaws.com/role-arn"}
            else:
                assert obj == base[key], f"{overlay.name} changes {key}: overlays set configuration only"


def test_the_finetune_workers_match_the_configured_count(rendered):
    job = find(rendered, "RayJob", "earmark-finetune")
    config = find(rendered, "ConfigMap", "earmark-config")["data"]
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    workers = int(config["EARMARK_FINETUNE_WORKERS"])
    assert group["minReplicas"] == group["replicas"] == group["maxReplicas"] == workers
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) == int(config["EARMARK_GPUS_PER_WORKER"])
    assert job["spec"]["backoffLimit"] >= 1  # a lost head resumes on a new cluster


def test_the_rayservice_config_is_the_applications_own():
    """serveConfigV2 equals what `earmark serve --print-config` writes for the command in the
    manifest's comment, passes Serve's own schema, names only known deployment keys, imports."""
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    service = find(render(K8S / "base"), "RayService", "earmark-serve")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    text = (K8S / "base" / "serve-rayservice.yaml").read_text()
    command = " ".join(
        line.lstrip("# ").rstrip("\\").strip() for line in text.split("serveConfigV2 is what")[1].splitlines()[1:4]
    )
    assert command.startswith("earmark serve ")
    printed = subprocess.run(
        [str(ROOT / ".venv/bin/earmark"), *_split(command.removeprefix("earmark "))],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert json.loads(printed.stdout) == config
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr))
        for deployment in app["deployments"]:
            unknown = set(deployment) - set(DeploymentSchema.model_fields)
            assert not unknown, f"unknown deployment keys {unknown}"
            assert "request_timeout_s" not in deployment and deployment["graceful_shutdown_timeout_s"] >= 60
    assert "request_timeout_s" not in config.get("http_options", {})
    assert service["spec"]["rayClusterDeletionDelaySeconds"] >= 600
    for _, template in pod_templates(service):
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH") == "serve.proxy:middlewares"


def test_a_misspelt_serve_deployment_key_is_refused():
    from ray.serve.schema import DeploymentSchema

    service = find(render(K8S / "base"), "RayService", "earmark-serve")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    deployment = config["applications"][0]["deployments"][0]
    deployment["graceful_shutdown_timeout"] = deployment.pop("graceful_shutdown_timeout_s")
    assert set(deployment) - set(DeploymentSchema.model_fields) == {"graceful_shutdown_timeout"}


# Per manifest, keys to misspell (a dotted path to a map key; the last part loses its last letter).
MISSPELT = {
    "transcribe-rayjob.yaml": [
        "spec.shutdownAfterJobFinishes",
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.resources",
        "spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas",
    ],
    "finetune-rayjob.yaml": ["spec.backoffLimit", "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.tolerations"],
    "serve-rayservice.yaml": [
        "spec.rayClusterDeletionDelaySeconds",
        "spec.upgradeStrategy.type",
        "spec.rayClusterConfig.headGroupSpec.rayStartParams",
    ],
    "review.yaml": ["spec.replicas", "spec.template.spec.containers.0.readinessProbe", "spec.selector.matchLabels"],
    "config.yaml": ["data"],
    "serviceaccounts.yaml": ["automountServiceAccountToken"],
}


@pytest.mark.parametrize("name", sorted(MISSPELT))
def test_a_misspelt_key_in_a_copy_of_each_manifest_is_refused(name):
    documents = load_documents(K8S / "base" / name)
    assert not [p for d in documents for p in schema_problems(d)]
    for dotted in MISSPELT[name]:
        doc = copy.deepcopy(next(d for d in documents if _has(d, dotted)))
        *parents, last = dotted.split(".")
        holder = doc
        for part in parents:
            holder = holder[int(part)] if part.isdigit() else holder[part]
        holder[last[:-1]] = holder.pop(last)
        problems = schema_problems(doc) + project_problems([doc, *documents], ray_version())
        assert problems, f"{name}: {dotted} misspelt as {last[:-1]} was accepted"


def test_the_enums_and_cross_field_rules_the_crds_leave_out_are_checked():
    job = find(render(K8S / "base"), "RayJob", "earmark-transcribe")
    cases = {
        "spec.submissionMode": "K8sJob",
        "spec.rayClusterSpec.autoscalerOptions.version": "v3",
        "spec.rayClusterSpec.rayVersion": "2.9.0",
        "spec.shutdownAfterJobFinishes": False,
    }
    everything = render(K8S / "base")
    for dotted, value in cases.items():
        bad = copy.deepcopy(job)
        *parents, last = dotted.split(".")
        holder = bad
        for part in parents:
            holder = holder[part]
        holder[last] = value
        # KubeRay v1.7.0's CRD checks autoscalerOptions.version itself; the others are the controller's
        assert bool(schema_problems(bad)) == (dotted.endswith("autoscalerOptions.version")), dotted
        assert project_problems([bad, *[o for o in everything if o is not job]], ray_version()), dotted
    service = copy.deepcopy(find(everything, "RayService", "earmark-serve"))
    service["spec"]["upgradeStrategy"]["type"] = "Blue"
    assert project_problems([service, *everything], ray_version())


def test_every_image_reference_in_infra_is_the_same():
    found = set()
    for path in INFRA.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".yml", "") or path.name == "Dockerfile":
            found |= {m for m in _images(path.read_text(errors="replace"))}
    assert found == {IMAGE}, found


@pytest.mark.slow
def test_checkov_passes_on_the_kubernetes_manifests_with_every_skip_justified(tmp_path: Path):
    """On what `kubectl apply -k` applies (the rendered aws overlay): checkov reads no kustomization."""
    for obj in render(K8S / "overlays" / "aws"):
        (tmp_path / f"{obj['kind']}-{obj['metadata']['name']}.yaml").write_text(yaml.safe_dump(obj))
    checkov = ROOT / ".venv" / "checkov" / "bin" / "checkov"
    assert checkov.exists(), "checkov is missing: run scripts/setup.sh --test (it installs it in .venv/checkov)"
    config = INFRA / ".checkov.yaml"
    skips = yaml.safe_load(config.read_text())["skip-check"]
    reasons = _skip_reasons(config)
    assert set(skips) == set(reasons), f"every skipped check needs a reason comment: {set(skips) ^ set(reasons)}"
    out = subprocess.run(
        [str(checkov), "--config-file", str(config), "-d", str(tmp_path), "--framework", "kubernetes",
         "--output", "json", "--quiet", "--skip-download"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = json.loads(out.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{c['check_id']} {c['check_name']} ({c['resource']})"
        for r in reports
        for c in r.get("results", {}).get("failed_checks", [])
    ]
    assert not failed and out.returncode == 0, "\n".join(failed) or out.stderr
    (summary,) = [r["summary"] for r in reports]
    assert summary["parsing_errors"] == 0 and summary["resource_count"] >= 10 and summary["passed"] > 50, summary


def _skip_reasons(config: Path) -> dict[str, str]:
    reasons = {}
    for line in config.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("- CKV") and "#" in stripped:
            check, reason = stripped[2:].split("#", 1)
            if reason.strip():
                reasons[check.strip()] = reason.strip()
    return reasons


def _images(text: str) -> set[str]:
    import re

    return set(re.findall(r"ghcr\.io/[\w./-]+:[\w.-]+", text))


def _has(doc: Obj, dotted: str) -> bool:
    holder: object = doc
    for part in dotted.split("."):
        if isinstance(holder, list) and part.isdigit() and int(part) < len(holder):
            holder = holder[int(part)]
        elif isinstance(holder, dict) and part in holder:
            holder = holder[part]
        else:
            return False
    return True


def _split(command: str) -> list[str]:
    import shlex

    return shlex.split(command)
