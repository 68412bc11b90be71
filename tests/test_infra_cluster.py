"""The manifests' commands run as written on a Ray cluster of a head and a worker on loopback.

What KubeRay does with a RayJob, done here by hand: the nodes get the pod's environment (the
earmark-config ConfigMap, rendered from a test overlay that changes only the endpoint, the
buckets and the jobs' sizes), and the RayJob's ``entrypoint`` and ``runtimeEnvYAML`` are submitted
through Ray's Jobs API, as KubeRay's submitter does. The S3 server is SeaweedFS; the credentials
stand in for the workload identity. The RayService's serveConfigV2 goes through ``serve deploy``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cluster.storage import exists, upload_file
from demo import MODEL_PATH as DEMO_MODEL_PATH
from demo.corpus import CORPUS_DIR
from tests.infra import K8S, find, render
from tests.raycluster import LocalCluster
from tests.s3server import S3Server

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CLIPS = 6


@dataclass
class Deployed:
    cluster: LocalCluster
    objects: list[dict[str, Any]]
    config: dict[str, str]
    s3: S3Server
    buckets: dict[str, str]

    def job(self, name: str) -> dict[str, Any]:
        return find(self.objects, "RayJob", name)["spec"]

    def submit(self, name: str, env_vars: dict[str, str] | None = None, timeout_s: float = 600) -> tuple[str, str]:
        """Submit the RayJob's entrypoint and runtimeEnvYAML as KubeRay's submitter does; wait;
        return (status, logs). ``env_vars`` (fault cases only) are added to its runtime_env."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        spec = self.job(name)
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        if env_vars:
            runtime_env.setdefault("env_vars", {}).update(env_vars)
        client = JobSubmissionClient(self.cluster.dashboard_url)
        job_id = client.submit_job(entrypoint=spec["entrypoint"], runtime_env=runtime_env)
        deadline = time.monotonic() + timeout_s
        while (status := client.get_job_status(job_id)) not in {
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.STOPPED,
        }:
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                raise AssertionError(
                    f"{name} still {status} after {timeout_s} s:\n{client.get_job_logs(job_id)[-3000:]}"
                )
            time.sleep(1)
        return str(status), client.get_job_logs(job_id)


def write_overlay(root: Path, values: dict[str, str]) -> Path:
    """A Kustomize overlay of the base that patches only the ConfigMap."""
    root.mkdir(parents=True, exist_ok=True)
    patch = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "earmark-config"}, "data": values}
    (root / "config.yaml").write_text(yaml.safe_dump(patch))
    base = os.path.relpath(K8S / "base", root)
    kustomization = {"resources": [base], "patches": [{"path": "config.yaml"}]}
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return root


@pytest.fixture(scope="module")
def deployed(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    import uuid

    tag = uuid.uuid4().hex[:8]
    buckets = {k: f"{k}-{tag}" for k in ("archive", "labels", "models")}
    client = s3_server.client()
    for bucket in buckets.values():
        client.create_bucket(Bucket=bucket)
    archive, labels, models = buckets["archive"], buckets["labels"], buckets["models"]
    values = {
        "EARMARK_AUDIO_URI": f"s3://{archive}/audio/",
        "EARMARK_LABELS_URI": f"s3://{labels}/pseudo-labels/run-1",
        "EARMARK_MODEL": f"s3://{models}/base/nemotron-3.5-asr.nemo",
        "EARMARK_SERVE_MODEL": f"s3://{models}/registry/earmark/v0001/model.nemo",
        "EARMARK_REGISTRY": f"s3://{models}/registry",
        "EARMARK_TRAIN_MANIFEST": f"s3://{labels}/exports/run-1/train.jsonl",
        "EARMARK_DEV_MANIFEST": f"s3://{labels}/exports/run-1/dev.jsonl",
        "EARMARK_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "EARMARK_S3_REGION": "us-east-1",
        # this machine's size: a few steps on one CPU worker
        "EARMARK_FINETUNE_STEPS": "3",
        "EARMARK_FINETUNE_WORKERS": "1",
        "EARMARK_GPUS_PER_WORKER": "0",
    }
    objects = render(write_overlay(tmp_path_factory.mktemp("overlay"), values))
    config = find(objects, "ConfigMap", "earmark-config")["data"]
    assert {k: config[k] for k in values} == values

    options = s3_server.options()
    rows = [json.loads(line) for line in (CORPUS_DIR / "manifest.jsonl").read_text().splitlines() if line.strip()]
    short = [r for r in rows if r["duration"] < 8][: CLIPS + 8]
    for row in short[:CLIPS]:
        upload_file(
            CORPUS_DIR / row["audio_filepath"],
            f"{values['EARMARK_AUDIO_URI']}{Path(row['audio_filepath']).name}",
            options,
        )
    upload_file(DEMO_MODEL_PATH, values["EARMARK_MODEL"], options)
    upload_file(DEMO_MODEL_PATH, values["EARMARK_SERVE_MODEL"], options)
    entries = []
    for row in short:
        uri = f"s3://{labels}/exports/run-1/audio/{Path(row['audio_filepath']).name}"
        upload_file(CORPUS_DIR / row["audio_filepath"], uri, options)
        entries.append(
            {
                "audio_filepath": uri,
                "duration": row["duration"],
                "text": row["text_tagged"],
                "target_lang": row["langs"][0],
            }
        )
    client.put_object(
        Bucket=labels, Key="exports/run-1/train.jsonl", Body="".join(json.dumps(e) + "\n" for e in entries[:10])
    )
    client.put_object(
        Bucket=labels, Key="exports/run-1/dev.jsonl", Body="".join(json.dumps(e) + "\n" for e in entries[10:])
    )

    # the pods' environment: the ConfigMap (envFrom), the image's PATH, the workload identity
    service = find(objects, "RayService", "earmark-serve")["spec"]["rayClusterConfig"]
    pod_env = {e["name"]: e["value"] for e in service["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    env = {
        **config,
        **pod_env,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "EARMARK_S3_ACCESS_KEY_ID": s3_server.access_key,
        "EARMARK_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
        "EARMARK_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    head_cpus = int(
        find(objects, "RayJob", "earmark-transcribe")["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"][
            "num-cpus"
        ]
    )
    with LocalCluster(head_cpus=head_cpus, env=env, dashboard=True) as cluster:
        cluster.add_worker(cpus=4)
        yield Deployed(cluster, objects, config, s3_server, buckets)


def test_the_transcribe_rayjob_writes_its_parquet_to_s3(deployed: Deployed) -> None:
    import pyarrow.parquet as pq

    from cluster.storage import pyarrow_filesystem

    status, logs = deployed.submit("earmark-transcribe")
    assert status == "SUCCEEDED", logs[-3000:]
    uri = deployed.config["EARMARK_LABELS_URI"]
    fs, root = pyarrow_filesystem(uri, deployed.s3.options())
    table = pq.read_table(root, filesystem=fs)
    assert table.num_rows == CLIPS
    assert all(u.startswith(deployed.config["EARMARK_AUDIO_URI"]) for u in table.column("source_uri").to_pylist())
    assert all(t for t in table.column("text").to_pylist())


def test_the_finetune_rayjob_registers_a_model_on_s3(deployed: Deployed) -> None:
    from jobs.registry import Registry

    status, logs = deployed.submit("earmark-finetune", timeout_s=900)
    assert status == "SUCCEEDED", logs[-3000:]
    registry = Registry(deployed.config["EARMARK_REGISTRY"], deployed.s3.options())
    (name,) = registry.names()
    card = registry.card(name, registry.latest(name))
    assert card.training.settings.max_steps == int(deployed.config["EARMARK_FINETUNE_STEPS"])
    assert exists(registry.model_uri(f"{name}/{card.version}"), deployed.s3.options())
    # Ray Train's checkpoints went to the registry's storage on S3 (what a retried job resumes from)
    models = deployed.buckets["models"]
    listed = deployed.s3.client().list_objects_v2(Bucket=models, Prefix="registry/_train/")
    assert listed.get("KeyCount", 0) > 0


@pytest.mark.parametrize(
    "override, says",
    [
        ({"EARMARK_AUDIO_URI": "s3://earmark-no-such-bucket-here/audio/"}, "earmark-no-such-bucket-here"),
        ({"EARMARK_MODEL": "s3://{models}/base/missing.nemo"}, "missing.nemo"),
    ],
    ids=["no-such-bucket", "missing-model"],
)
def test_a_bad_bucket_or_model_fails_the_job_fast_with_one_line(deployed: Deployed, override, says) -> None:
    override = {k: v.format(**deployed.buckets) for k, v in override.items()}
    started = time.monotonic()
    status, logs = deployed.submit("earmark-transcribe", env_vars=override, timeout_s=300)
    assert status == "FAILED"
    assert time.monotonic() - started < 90, "a wrong bucket or model must fail before any retrying"
    assert "Traceback" not in logs, logs[-3000:]
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], logs[-2000:]


def test_the_rayservice_config_deploys_with_serve_deploy_and_answers(deployed: Deployed, tmp_path: Path) -> None:
    from openai import OpenAI

    key = subprocess.run(
        [str(BIN / "earmark"), "api-key", str(tmp_path / "keys.txt")], capture_output=True, text=True, check=True
    )
    api_key = key.stdout.strip().split()[-1]
    config = yaml.safe_load(find(deployed.objects, "RayService", "earmark-serve")["spec"]["serveConfigV2"])
    # what is a pod's own here: the Secret's mount, and the port and address the pod listens on
    config["applications"][0]["args"]["api_keys_file"] = str(tmp_path / "keys.txt")
    port = _free_port()
    config["http_options"] |= {"host": "127.0.0.1", "port": port}
    # this machine has no GPU: the replica asks for none (the manifest's GPU count is checked statically)
    config["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] = 0
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    deploy = subprocess.run(
        [str(BIN / "serve"), "deploy", str(path), "--address", deployed.cluster.dashboard_url],
        capture_output=True, text=True, env=deployed.cluster.env, timeout=120,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stderr
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, _serve_status(deployed)
            time.sleep(2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key)
        row = json.loads((CORPUS_DIR / "manifest.jsonl").read_text().splitlines()[0])
        with (CORPUS_DIR / row["audio_filepath"]).open("rb") as f:
            text = client.audio.transcriptions.create(model="earmark", file=f, response_format="text")
        assert isinstance(text, str) and text.strip()
        unauthorized = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"authorization": "Bearer wrong"})
        assert unauthorized.status_code == 401
    finally:
        subprocess.run(
            [str(BIN / "serve"), "shutdown", "--address", deployed.cluster.dashboard_url, "--yes"],
            capture_output=True, env=deployed.cluster.env, timeout=120,
        )  # fmt: skip


def _serve_status(deployed: Deployed) -> str:
    out = subprocess.run(
        [str(BIN / "serve"), "status", "--address", deployed.cluster.dashboard_url],
        capture_output=True, text=True, env=deployed.cluster.env, timeout=60,
    )  # fmt: skip
    return f"the Serve application did not answer within 240 s:\n{out.stdout}{out.stderr}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
