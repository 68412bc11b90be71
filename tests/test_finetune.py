"""``earmark finetune`` on a real local Ray: two data-parallel CPU workers, and a worker killed
mid-run that resumes from its checkpoint. Short runs on the bundled corpus (the loop test shows
that fine-tuning helps; these show that the machinery holds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from asr.demo.corpus import CORPUS_DIR
from jobs.registry import Registry

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def corpus_manifests(folder: Path) -> tuple[Path, Path]:
    """The bundled corpus as training manifests (tagged text, target_lang): 80 train, 19 dev."""
    rows = [json.loads(line) for line in (CORPUS_DIR / "manifest.jsonl").read_text().splitlines() if line.strip()]
    out = [
        {
            "audio_filepath": str(CORPUS_DIR / r["audio_filepath"]),
            "duration": r["duration"],
            "text": r["text_tagged"],
            "target_lang": r["langs"][0],
        }
        for r in rows
    ]
    folder.mkdir(parents=True, exist_ok=True)
    train, dev = folder / "train.jsonl", folder / "dev.jsonl"
    train.write_text("".join(json.dumps(o) + "\n" for o in out[:80]))
    dev.write_text("".join(json.dumps(o) + "\n" for o in out[80:]))
    return train, dev


def test_bad_manifests_fail_before_any_worker_starts(tmp_path: Path) -> None:
    from asr.training import ManifestError
    from jobs.finetune import FinetuneRequest, run_finetune

    train, dev = corpus_manifests(tmp_path / "data")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train.read_text().splitlines()[0] + "\n" + '{"audio_filepath": "a.wav", "duration": 1.0}\n')
    with pytest.raises(ManifestError, match=r"bad.jsonl:2: missing text"):
        run_finetune(FinetuneRequest(train=[str(bad)], dev=str(dev), registry=str(tmp_path / "reg")))
    alien = tmp_path / "alien.jsonl"
    row = json.loads(train.read_text().splitlines()[0]) | {"target_lang": "xx-XX"}
    alien.write_text(json.dumps(row) + "\n")
    with pytest.raises(ManifestError, match=r"no locale 'xx-XX' \(it knows de-DE, en-US, es-ES, fr-FR\)"):
        run_finetune(FinetuneRequest(train=[str(alien)], dev=str(dev), registry=str(tmp_path / "reg")))
    assert not (tmp_path / "reg").exists()


def _run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def _stop_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _train_workers(exclude: set[int]) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "RayTrainWorker" in cmd and p.info["pid"] not in exclude:
            found.append(p)
    return found


def _registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has registered (a folder alone may still be mid-report)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    return len(snapshot.get("checkpoint_results") or [])


def test_two_cpu_workers_and_one_killed_mid_run_resume_from_the_last_checkpoint(tmp_path: Path) -> None:
    """Two data-parallel workers (gloo); once Ray Train has registered a checkpoint, one worker is
    killed with SIGKILL. Ray restarts the group, which resumes from that checkpoint, and the run
    ends with a model in the registry and its card."""
    train, dev = corpus_manifests(tmp_path / "data")
    registry = tmp_path / "reg"
    before = {p.pid for p in _train_workers(set())}
    proc = _run_cli(
        ["finetune", "--train", str(train), "--dev", str(dev), "--registry", str(registry), "--name", "kill",
         "--workers", "2", "--max-steps", "9", "--steps-per-checkpoint", "3", "--lr", "1e-5", "--json"]
    )  # fmt: skip
    killed = None
    try:
        runs = registry / "_train" / "kill-v0001"
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if _registered_checkpoints(runs):
                workers = _train_workers(before)
                if workers:
                    killed = workers[0].pid
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.2)
        assert killed, "no checkpoint appeared, or no training worker to kill"
        out, err = proc.communicate(timeout=600)
    finally:
        _stop_tree(proc)
    assert proc.returncode == 0, err[-3000:]
    card = json.loads(out)
    training = card["training"]
    assert training["workers"] == 2 and training["steps"] == 9
    assert training["attempts"] == 2, training
    assert all(a["world_size"] == 2 and a["backend"] == "gloo" for a in training["attempt_log"])
    assert training["resumed_from_steps"] and training["resumed_from_steps"][0] in (3, 6)
    assert Registry(str(registry)).versions("kill") == ["v0001"]
    assert (registry / "kill" / "v0001" / "model.nemo").stat().st_size > 1e6
    assert card["data"]["train"][0]["lines"] == 80 and len(card["data"]["train"][0]["sha256"]) == 64
    for key in ("dev", "parent_dev"):
        assert card["metrics"][key]["languages"]["all"]["wer"] is not None
    # checkpoints went to the registry's storage; the last two are kept
    assert len([d for d in (registry / "_train" / "kill-v0001").glob("checkpoint_*") if d.is_dir()]) == 2


@pytest.mark.parametrize(
    ("freeze", "frozen", "trained"), [("decoder", "decoder", "encoder"), ("encoder", "encoder", "decoder")]
)
def test_freezing_keeps_one_part_and_cpu_training_uses_the_vectorised_loss(freeze, frozen, trained) -> None:
    from asr.model import load_model
    from asr.training import TrainSettings, VectorisedRNNTLoss, prepare_model

    model, _ = load_model("demo")
    prepare_model(model, TrainSettings(freeze=freeze), on_gpu=False)
    assert not any(p.requires_grad for p in getattr(model, frozen).parameters())
    assert all(p.requires_grad for p in getattr(model, trained).parameters())
    assert all(p.requires_grad for p in model.joint.parameters())
    assert isinstance(model.loss, VectorisedRNNTLoss)
    with pytest.raises(ValueError, match="--freeze 'joint': use one of none, encoder, decoder"):
        TrainSettings(freeze="joint")
