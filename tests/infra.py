"""Reading and checking infra/ for the tests: Kustomize rendering, schemas, the project's rules.

There is no Kubernetes (nor kustomize or kubectl) on the test machines, so:

* :func:`render` renders a kustomization with the subset of Kustomize that infra/k8s uses
  (``resources``, ``namespace``, ``labels`` without selectors, and ``patches`` that are strategic
  merges of maps onto objects named like them); anything else in a kustomization is refused, so
  kubectl's built-in Kustomize renders infra/k8s the same way;
* :func:`schema_problems` checks every object: core kinds with ``kubernetes-validate`` (strict),
  KubeRay kinds with ``jsonschema`` against the CRD's openAPIV3Schema (KubeRay v1.7.0, vendored
  in infra/k8s/crds) with unknown fields forbidden, as ``kubectl apply`` with server-side field
  validation would;
* :func:`project_problems` checks what the CRD schema leaves to the controller or to us.

Each check returns a list of problems (empty: fine), so a test can show all of them at once.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
#: The one image every manifest, the launcher config and the Dockerfile's label name.
IMAGE = "ghcr.io/earmark/earmark:0.1.0"
KUBERNETES_VERSION = "1.33.0"
KUBERAY_KINDS = ("RayJob", "RayService", "RayCluster")
KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches"}
#: Kinds that live in no namespace (Kustomize's ``namespace`` leaves them alone).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "StorageClass"}

Obj = dict[str, Any]


def load_documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def render(directory: Path) -> list[Obj]:
    """The objects ``kubectl kustomize directory`` gives, for the Kustomize subset above."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZE_KEYS
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml: {sorted(unknown)} are outside the subset the tests render")
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects += render(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        if set(patch) - {"path", "patch"}:
            raise ValueError(f"{directory}: patch {patch}: only 'path' or 'patch' (strategic merge of maps)")
        text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
        for doc in yaml.safe_load_all(text):
            _apply_patch(objects, doc, directory)
    for label in kustomization.get("labels", []):
        if set(label) - {"pairs"}:
            raise ValueError(f"{directory}: labels {label}: only 'pairs' (no selectors, no templates)")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    return objects


def _apply_patch(objects: list[Obj], patch: Obj, where: Path) -> None:
    name = patch["metadata"]["name"]
    targets = [o for o in objects if o["kind"] == patch["kind"] and o["metadata"]["name"] == name]
    if len(targets) != 1:
        raise ValueError(f"{where}: patch of {patch['kind']}/{name} matches {len(targets)} objects, not one")
    _merge(targets[0], patch, f"{patch['kind']}/{name}")


def _merge(target: Obj, patch: Obj, path: str) -> None:
    for key, value in patch.items():
        if isinstance(value, list):
            raise ValueError(f"{path}.{key}: lists are merged by key in Kustomize; patch maps only here")
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, f"{path}.{key}")
        else:
            target[key] = copy.deepcopy(value)


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


# -- schemas -----------------------------------------------------------------------------------


@cache
def crd_schema(kind: str) -> Obj:
    with gzip.open(K8S / "crds" / f"{kind}.v1.schema.json.gz") as f:
        return _strict(json.load(f))


def _strict(schema: Any) -> Any:
    """Forbid unknown fields wherever the schema lists properties and does not keep unknown ones
    (what the API server's strict field validation does with a CRD)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def schema_problems(obj: Obj) -> list[str]:
    import jsonschema
    import kubernetes_validate

    label = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("kind") in KUBERAY_KINDS:
        validator = jsonschema.Draft7Validator(crd_schema(obj["kind"]))
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        problems = [
            f"{label}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(body)
        ]
        if obj.get("apiVersion") != "ray.io/v1":
            problems.append(f"{label}: apiVersion {obj.get('apiVersion')!r}, KubeRay serves ray.io/v1")
        for where, template in pod_templates(obj):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            problems += _kubernetes_problems(wrapped, f"{label} {where}")
        return problems
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{label}: {'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def _kubernetes_problems(obj: Obj, label: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{label}: {'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def ray_cluster_spec(obj: Obj) -> Obj | None:
    spec = obj.get("spec", {})
    return {"RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig"), "RayCluster": spec}.get(
        obj["kind"]
    )


def pod_templates(obj: Obj) -> Iterator[tuple[str, Obj]]:
    """(where, pod template) of every pod an object makes."""
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        yield "template", spec.get("template", {})
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitterPodTemplate", spec["submitterPodTemplate"]
    cluster = ray_cluster_spec(obj)
    if cluster:
        yield "headGroupSpec", cluster.get("headGroupSpec", {}).get("template", {})
        for group in cluster.get("workerGroupSpecs", []):
            yield f"workerGroupSpecs[{group.get('groupName')}]", group.get("template", {})


def containers(template: Obj) -> list[Obj]:
    spec = template.get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


# -- the project's rules -----------------------------------------------------------------------

ENUMS = {
    ("RayJob", "submissionMode"): {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"},
    ("RayService", "upgradeStrategy.type"): {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"},
}
AUTOSCALER_VERSIONS = {"v1", "v2"}


def project_problems(objects: list[Obj], ray_version: str) -> list[str]:
    """What the CRD schemas leave to the controller, and earmark's own rules for every manifest."""
    problems: list[str] = []
    accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    for obj in objects:
        label = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = obj.get("spec", {})
        for (kind, dotted), allowed in ENUMS.items():
            if obj["kind"] == kind:
                value = _get(spec, dotted)
                if value is not None and value not in allowed:
                    problems.append(f"{label}: spec.{dotted} {value!r} is not one of {sorted(allowed)}")
        if obj["kind"] == "RayJob":
            if "ttlSecondsAfterFinished" in spec and not spec.get("shutdownAfterJobFinishes"):
                problems.append(f"{label}: ttlSecondsAfterFinished is ignored without shutdownAfterJobFinishes: true")
            if spec.get("deletionStrategy") and spec.get("shutdownAfterJobFinishes"):
                problems.append(f"{label}: deletionStrategy cannot be combined with shutdownAfterJobFinishes")
            if not isinstance(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"), dict):
                problems.append(f"{label}: runtimeEnvYAML is not a YAML map")
            problems += _variables_problems(label, spec.get("entrypoint", ""), obj, configmaps)
        cluster = ray_cluster_spec(obj)
        if cluster:
            if cluster.get("rayVersion") != ray_version:
                problems.append(
                    f"{label}: rayVersion {cluster.get('rayVersion')!r}, the project pins Ray {ray_version}"
                )
            version = (cluster.get("autoscalerOptions") or {}).get("version")
            if version is not None and version not in AUTOSCALER_VERSIONS:
                problems.append(f"{label}: autoscalerOptions.version {version!r} is not one of v1, v2")
            if cluster.get("headGroupSpec", {}).get("rayStartParams", {}).get("num-cpus") != "0":
                problems.append(f"{label}: the head must take no Ray work (rayStartParams num-cpus: '0')")
            for group in cluster.get("workerGroupSpecs", []):
                low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
                if not low <= group.get("replicas", low) <= high:
                    problems.append(f"{label}: worker group {group.get('groupName')}: replicas outside min..max")
        for where, template in pod_templates(obj):
            problems += _pod_problems(f"{label} {where}", template, accounts, configmaps)
    return problems


def _pod_problems(label: str, template: Obj, accounts: set[str], configmaps: dict[str, Obj]) -> list[str]:
    problems = []
    pod = template.get("spec", {})
    account = pod.get("serviceAccountName")
    if account not in accounts:
        problems.append(f"{label}: serviceAccountName {account!r} is not one of the ServiceAccounts {sorted(accounts)}")
    context = pod.get("securityContext", {})
    if not context.get("runAsNonRoot") or not context.get("runAsUser"):
        problems.append(f"{label}: the pod must run as a non-root user (securityContext runAsNonRoot, runAsUser)")
    for container in containers(template):
        name = f"{label} container {container.get('name')}"
        if container.get("image") != IMAGE:
            problems.append(f"{name}: image {container.get('image')!r}, every manifest uses {IMAGE}")
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(resources.get(part, {})):
                problems.append(f"{name}: resources.{part} needs cpu and memory")
        gpus = [resources.get(p, {}).get("nvidia.com/gpu") for p in ("requests", "limits")]
        if gpus[0] != gpus[1]:
            problems.append(f"{name}: nvidia.com/gpu requests {gpus[0]} and limits {gpus[1]} must be equal")
        security = container.get("securityContext", {})
        if security.get("allowPrivilegeEscalation") is not False or "ALL" not in security.get("capabilities", {}).get(
            "drop", []
        ):
            problems.append(f"{name}: allowPrivilegeEscalation: false and capabilities drop ALL")
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef", {}).get("name")
            if ref is not None and ref not in configmaps:
                problems.append(f"{name}: envFrom ConfigMap {ref!r} is not in the manifests")
    return problems


def _variables_problems(label: str, entrypoint: str, obj: Obj, configmaps: dict[str, Obj]) -> list[str]:
    """Every $VAR of a RayJob's entrypoint is set on its head (from a ConfigMap or env)."""
    cluster = ray_cluster_spec(obj) or {}
    head = cluster.get("headGroupSpec", {}).get("template", {})
    known: set[str] = set()
    for container in containers(head):
        known |= {e["name"] for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            known |= set(configmaps.get(source.get("configMapRef", {}).get("name"), {}))
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", entrypoint))
    return [f"{label}: the entrypoint uses ${v}, which the head's environment does not set" for v in used - known]


def _get(data: Obj, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)  # type: ignore[assignment]
    return data
