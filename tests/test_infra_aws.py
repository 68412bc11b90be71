"""The AWS deployment (infra/aws): Ray cluster launcher configs and the IAM policies of their nodes.

Everything here runs offline. ``ray up`` has no dry run, so the configs are checked the way
``ray up`` checks them before it calls AWS: ``prepare_config`` (merges Ray's AWS defaults.yaml,
reads files only) and ``validate_config`` (Ray's ray-schema.json, unknown keys rejected). The
rest of ``ray up`` (``bootstrap_aws``: key pair, subnets, security group; and the resource
autodetection through DescribeInstanceTypes) calls AWS and is not run. Both are private APIs of
Ray, which is pinned at 2.60. The policies are linted by parliament and checked against the
cluster config they serve.
"""

from __future__ import annotations

import copy
import importlib
import importlib.resources
import json
import re
import socket
import sys
import types
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "infra" / "aws"
CLUSTER = AWS / "cluster.yaml"
IAM = AWS / "iam"

from tests.infra import IMAGE  # noqa: E402

#: The placeholder buckets, by what they hold; the policies, cluster.yaml and infra/README.md name these.
BUCKETS = {"archive": "earmark-archive", "labels": "earmark-labels", "models": "earmark-models"}
#: What earmark does in S3 (cluster.storage, jobs.commit): reads, writes Parquet parts and
#: manifests (multipart when large), renames a manifest into place (copy and delete) and removes
#: run folders. The archive is only read.
S3_READ = {"s3:GetObject", "s3:ListBucket"}
S3_READ_WRITE = S3_READ | {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"}
#: The EC2 calls of Ray 2.60's AWSNodeProvider on the head, with cache_stopped_nodes false (else
#: also Stop/StartInstances) and no CloudWatch agent (else also DescribeImages).
AUTOSCALER_EC2 = {"ec2:DescribeInstances", "ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances"}
#: The only action granted on "*": EC2's Describe calls have no resource-level permissions.
UNSCOPABLE = {"ec2:DescribeInstances"}
GPU_FAMILY = re.compile(r"^(g|p)\d")  # g4dn, g5, g6, g6e, p4d, p5 ...


# -- loading ---------------------------------------------------------------------------------


def load_cluster(path: Path = CLUSTER) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def load_policy(name: str) -> dict[str, Any]:
    return json.loads((IAM / name).read_text())


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def allowed(policy: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in policy["Statement"] if s["Effect"] == "Allow"]


def statements_with(policy: dict[str, Any], action: str, effect: str = "Allow") -> list[dict[str, Any]]:
    return [s for s in policy["Statement"] if s["Effect"] == effect and action in as_list(s["Action"])]


def s3_statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in policy["Statement"] if any(a.startswith("s3:") for a in as_list(s["Action"]))]


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def head_type(config: dict[str, Any]) -> dict[str, Any]:
    return config["available_node_types"][config["head_node_type"]]


def profile_arn(node_type: dict[str, Any]) -> str:
    return node_type["node_config"]["IamInstanceProfile"]["Arn"]


def worker_run_options(config: dict[str, Any], node_type: dict[str, Any]) -> list[str]:
    """The docker run options of a worker of this type, as Ray merges them (autoscaler.py)."""
    docker = {**config["docker"], **node_type.get("docker", {})}
    return docker.get("run_options", []) + docker.get("worker_run_options", [])


def prepared(config: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    out = prepare_config(copy.deepcopy(config))
    validate_config(out)
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any lookup or connection beyond loopback fails the test (Ray's config code must not call AWS)."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            raise AssertionError(f"network lookup of {host!r} in an offline test")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"connection to {address!r} in an offline test")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)


# -- Ray's own checks --------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(AWS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(AWS)))
def test_every_launcher_config_passes_rays_own_validation(path: Path) -> None:
    prepared(load_cluster(path))


def _rename(config: dict[str, Any], keys: tuple[str, ...], new: str) -> None:
    parent = config
    for key in keys[:-1]:
        parent = parent[key]
    parent[new] = parent.pop(keys[-1])


@pytest.mark.parametrize(
    ("keys", "misspelt"),
    [
        (("max_workers",), "max_worker"),
        (("available_node_types",), "availble_node_types"),
        (("available_node_types", "gpu", "min_workers"), "min_worker"),
        (("docker", "run_options"), "run_option"),
        (("available_node_types", "gpu", "docker", "worker_run_options"), "worker_run_option"),
    ],
    ids=["max_worker", "availble_node_types", "min_worker", "run_option", "worker_run_option"],
)
def test_a_misspelt_key_is_rejected(keys: tuple[str, ...], misspelt: str) -> None:
    config = load_cluster()
    _rename(config, keys, misspelt)
    with pytest.raises(jsonschema.ValidationError, match=misspelt):
        prepared(config)


def test_nothing_is_installed_at_start_up() -> None:
    """The image holds everything; a missing key would bring back Ray's AWS defaults, which
    pip-install a nightly Ray wheel on every node."""
    config = prepared(load_cluster())
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], key


# -- the cluster ------------------------------------------------------------------------------


def test_every_node_runs_the_earmark_image() -> None:
    docker = load_cluster()["docker"]
    assert docker["image"] == IMAGE
    assert docker.get("head_image", IMAGE) == IMAGE and docker.get("worker_image", IMAGE) == IMAGE
    for name, node_type in load_cluster()["available_node_types"].items():
        assert node_type.get("docker", {}).get("worker_image", IMAGE) == IMAGE, name


def test_the_head_runs_no_work_and_has_no_gpu() -> None:
    config = load_cluster()
    head = head_type(config)
    assert head["resources"] == {"CPU": 0}
    assert not GPU_FAMILY.match(head["node_config"]["InstanceType"])
    assert "--gpus" not in " ".join(
        config["docker"].get("run_options", []) + config["docker"].get("head_run_options", [])
    )
    assert head.get("max_workers", 0) == 0


def test_gpu_workers_declare_their_gpu_and_get_it_in_the_container() -> None:
    config = load_cluster()
    gpu_types = {n: t for n, t in worker_types(config).items() if GPU_FAMILY.match(t["node_config"]["InstanceType"])}
    assert "gpu" in gpu_types
    for name, node_type in gpu_types.items():
        assert node_type["resources"].get("GPU", 0) >= 1, name
        assert "--gpus all" in worker_run_options(config, node_type), name


def test_the_gpu_type_is_spot_and_worker_counts_are_consistent() -> None:
    config = load_cluster()
    assert config["available_node_types"]["gpu"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    for name, node_type in worker_types(config).items():
        assert 0 <= node_type.get("min_workers", 0) <= node_type.get("max_workers", config["max_workers"]), name
        assert node_type.get("max_workers", 0) <= config["max_workers"], name
    assert sum(t.get("min_workers", 0) for t in worker_types(config).values()) <= config["max_workers"]


def test_head_and_workers_have_their_own_instance_profiles() -> None:
    config = load_cluster()
    worker_profiles = {profile_arn(t) for t in worker_types(config).values()}
    assert len(worker_profiles) == 1, "all worker types share the worker's profile"
    assert profile_arn(head_type(config)) not in worker_profiles
    assert profile_arn(head_type(config)).endswith(":instance-profile/earmark-ray-head")
    assert worker_profiles == {profile_arn(head_type(config)).replace("earmark-ray-head", "earmark-ray-worker")}


def test_every_serve_proxy_strips_the_client_timeout_header() -> None:
    """The proxy callback is in the container's environment on every node: `ray start`, and so
    every Serve proxy, inherits it."""
    from serve.proxy import PROXY_CALLBACK

    name, value = PROXY_CALLBACK
    assert f"-e {name}={value}" in load_cluster()["docker"]["run_options"]
    module, attr = value.split(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_the_containers_use_the_clusters_region_for_s3() -> None:
    config = load_cluster()
    region = config["provider"]["region"]
    options = config["docker"]["run_options"]
    assert f"-e AWS_DEFAULT_REGION={region}" in options
    assert f"-e EARMARK_S3_REGION={region}" in options


def test_nodes_are_launched_as_the_head_policy_requires() -> None:
    """The head's policy denies launches without IMDSv2 or outside the worker instance types,
    and grants no Stop/StartInstances: a config that drifted would fail only on AWS."""
    config = load_cluster()
    assert config["provider"]["cache_stopped_nodes"] is False
    assert "cloudwatch" not in config["provider"]
    guard = _deny_condition(load_policy("head-policy.json"), "ec2:InstanceType")
    assert set(as_list(guard)) == {t["node_config"]["InstanceType"] for t in worker_types(config).values()}
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"]["MetadataOptions"]["HttpTokens"] == "required", name


# -- the policies -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parliament() -> types.ModuleType:
    """parliament 1.6.4 (its latest release) imports pkg_resources for two file paths; setuptools
    >= 81 no longer ships it. A stand-in with that one function is in sys.modules only while
    parliament imports."""
    shim = None
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: str(importlib.resources.files(package) / name)  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    try:
        import parliament
    finally:
        if shim is not None:
            del sys.modules["pkg_resources"]
    return parliament


def lint(parliament: types.ModuleType, text: str, *, community: bool = False) -> list[tuple[str, str, str]]:
    """(issue, severity, detail) of every finding; ``community`` adds parliament's community
    auditors (privilege escalation, permissions management), with their config restored after."""
    saved = copy.deepcopy(parliament.config)
    try:
        if community:
            parliament.override_config(
                str(importlib.resources.files("parliament") / "community_auditors" / "config_override.yaml")
            )
        policy = parliament.analyze_policy_string(text, include_community_auditors=community)
        return [(f.issue, parliament.enhance_finding(f).severity, str(f.detail)) for f in policy.findings]
    finally:
        parliament.config.clear()
        parliament.config.update(saved)


@pytest.mark.parametrize("name", ["head-policy.json", "worker-policy.json"])
def test_parliament_finds_nothing_in_the_policies(parliament: types.ModuleType, name: str) -> None:
    assert lint(parliament, (IAM / name).read_text()) == []


def test_parliaments_community_auditors_find_only_the_autoscalers_passrole(parliament: types.ModuleType) -> None:
    """The head must pass the worker role to the instances it launches (iam:PassRole with
    ec2:RunInstances), which these auditors report as a possible privilege escalation. It is
    bounded: PassRole names only the worker role (which holds S3 access and nothing else), and a
    Deny refuses any other instance profile."""
    assert lint(parliament, (IAM / "worker-policy.json").read_text(), community=True) == []
    issues = {issue for issue, _, _ in lint(parliament, (IAM / "head-policy.json").read_text(), community=True)}
    assert issues == {"PERMISSIONS_MANAGEMENT_ACTIONS", "PRIVILEGE_ESCALATION"}


def test_parliament_would_catch_a_mistake(parliament: types.ModuleType) -> None:
    policy = load_policy("worker-policy.json")
    policy["Statement"][1]["Action"] = "s3:GetObjekt"
    assert [issue for issue, _, _ in lint(parliament, json.dumps(policy))] == ["UNKNOWN_ACTION"]


def test_the_trust_policy_lets_only_ec2_assume_the_roles() -> None:
    """Not linted: parliament reads every policy as an identity policy, and a trust policy has no Resource."""
    (statement,) = load_policy("ec2-trust.json")["Statement"]
    assert statement["Effect"] == "Allow"
    assert statement["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert statement["Action"] == "sts:AssumeRole"


@pytest.mark.parametrize("name", ["head-policy.json", "worker-policy.json"])
def test_the_policies_are_least_privilege_by_construction(name: str) -> None:
    policy = load_policy(name)
    for statement in policy["Statement"]:
        assert "NotAction" not in statement and "NotResource" not in statement, statement["Sid"]
        actions, resources = as_list(statement["Action"]), as_list(statement["Resource"])
        assert not [a for a in actions if "*" in a], f"{statement['Sid']}: a wildcard action"
        if "*" in resources:
            assert set(actions) <= UNSCOPABLE, f"{statement['Sid']}: Resource '*' for {actions}"
        if any(a.startswith("s3:") for a in actions):
            assert all(r.startswith("arn:aws:s3:::earmark-") for r in resources), statement["Sid"]


def test_the_buckets_are_the_named_ones_and_the_archive_is_read_only() -> None:
    access: dict[str, set[str]] = {}
    for statement in s3_statements(load_policy("worker-policy.json")):
        for resource in as_list(statement["Resource"]):
            bucket = resource.removeprefix("arn:aws:s3:::").split("/")[0]
            access.setdefault(bucket, set()).update(as_list(statement["Action"]))
    assert access == {
        BUCKETS["archive"]: S3_READ,
        BUCKETS["labels"]: S3_READ_WRITE,
        BUCKETS["models"]: S3_READ_WRITE,
    }
    comments = CLUSTER.read_text()
    assert set(re.findall(r"\bearmark-(?:archive|labels|models)\b", comments)) == set(BUCKETS.values())


def test_the_readme_names_the_same_buckets() -> None:
    readme = ROOT / "infra" / "README.md"
    if not readme.exists():
        pytest.skip("infra/README.md is not written yet")
    named = set(re.findall(r"s3://([a-z0-9.-]+)", readme.read_text()))
    assert named and named <= set(BUCKETS.values())


def test_the_head_has_the_workers_s3_access_because_job_drivers_run_there() -> None:
    assert s3_statements(load_policy("head-policy.json")) == s3_statements(load_policy("worker-policy.json"))


def test_the_worker_has_no_ec2_or_iam_access() -> None:
    actions = {a for s in load_policy("worker-policy.json")["Statement"] for a in as_list(s["Action"])}
    assert {a.split(":")[0] for a in actions} == {"s3"}


def test_the_head_may_make_exactly_the_autoscalers_ec2_calls() -> None:
    actions = {a for s in allowed(load_policy("head-policy.json")) for a in as_list(s["Action"])}
    assert {a for a in actions if a.startswith("ec2:")} == AUTOSCALER_EC2
    assert {a for a in actions if not a.startswith(("ec2:", "s3:"))} == {"iam:PassRole"}


def test_passrole_names_only_the_worker_role_and_only_for_ec2() -> None:
    config = load_cluster()
    worker_profile = profile_arn(worker_types(config)["gpu"])
    (statement,) = statements_with(load_policy("head-policy.json"), "iam:PassRole")
    # The README creates role and instance profile under one name.
    assert as_list(statement["Resource"]) == [worker_profile.replace(":instance-profile/", ":role/")]
    assert statement["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    assert _deny_condition(load_policy("head-policy.json"), "ec2:InstanceProfile") == worker_profile


def _deny_condition(policy: dict[str, Any], key: str) -> Any:
    """The value of the one RunInstances guardrail (a Deny) on condition ``key``."""
    (value,) = [
        values[key]
        for s in statements_with(policy, "ec2:RunInstances", effect="Deny")
        for values in s["Condition"].values()
        if key in values
    ]
    return value


def test_the_head_launches_tags_and_terminates_only_this_clusters_workers() -> None:
    """The tag names are Ray's (ray.autoscaler.tags); a rename in Ray would silently stop launches."""
    from ray.autoscaler.tags import NODE_KIND_WORKER, TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND

    policy, cluster_name = load_policy("head-policy.json"), load_cluster()["cluster_name"]
    assert _deny_condition(policy, f"aws:RequestTag/{TAG_RAY_CLUSTER_NAME}") == cluster_name
    assert _deny_condition(policy, f"aws:RequestTag/{TAG_RAY_NODE_KIND}") == NODE_KIND_WORKER
    assert _deny_condition(policy, "ec2:MetadataHttpTokens") == "required"
    (terminate,) = statements_with(policy, "ec2:TerminateInstances")
    assert terminate["Condition"] == {
        "StringEquals": {
            f"aws:ResourceTag/{TAG_RAY_CLUSTER_NAME}": cluster_name,
            f"aws:ResourceTag/{TAG_RAY_NODE_KIND}": NODE_KIND_WORKER,
        }
    }
    for statement in statements_with(policy, "ec2:CreateTags"):
        condition = statement["Condition"]
        at_launch = condition.get("StringEquals", {}).get("ec2:CreateAction") == "RunInstances"
        assert at_launch or condition["StringEquals"][f"aws:ResourceTag/{TAG_RAY_CLUSTER_NAME}"] == cluster_name


def test_every_arn_is_in_the_clusters_account_and_region() -> None:
    config = load_cluster()
    account = profile_arn(head_type(config)).split(":")[4]
    region = config["provider"]["region"]
    for name in ("head-policy.json", "worker-policy.json"):
        for statement in load_policy(name)["Statement"]:
            for arn in as_list(statement["Resource"]):
                if arn.startswith("arn:aws:ec2:"):
                    _, _, _, arn_region, arn_account, _ = arn.split(":", 5)
                    assert arn_region == region, arn
                    assert arn_account in (account, ""), arn  # images have no account in their ARN
                elif arn.startswith("arn:aws:iam:"):
                    assert arn.split(":")[4] == account, arn
