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

from demo.corpus import CORPUS_DIR
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
    from jobs.finetune import FinetuneRequest, run_finetune
    from records.manifest import ManifestError

    train, dev = corpus_manifests(tmp_path / "data")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train.read_text().splitlines()[0] + "\n" + '{"audio_filepath": "a.wav", "duration": 1.0}\n')
    with pytest.raises(ManifestError, match=r"bad.jsonl:2: missing text"):
        run_finetune(FinetuneRequest(train=[str(bad)], dev=[str(dev)], registry=str(tmp_path / "reg")))
    alien = tmp_path / "alien.jsonl"
    row = json.loads(train.read_text().splitlines()[0]) | {"target_lang": "xx-XX"}
    alien.write_text(json.dumps(row) + "\n")
    with pytest.raises(ManifestError, match=r"no locale 'xx-XX' \(it knows de-DE, en-US, es-ES, fr-FR\)"):
        run_finetune(FinetuneRequest(train=[str(alien)], dev=[str(dev)], registry=str(tmp_path / "reg")))
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
    from asr.train_settings import TrainSettings
    from asr.training import VectorisedRNNTLoss, prepare_model

    model, _ = load_model("demo")
    prepare_model(model, TrainSettings(freeze=freeze), on_gpu=False)
    assert not any(p.requires_grad for p in getattr(model, frozen).parameters())
    assert all(p.requires_grad for p in getattr(model, trained).parameters())
    assert all(p.requires_grad for p in model.joint.parameters())
    assert isinstance(model.loss, VectorisedRNNTLoss)
    with pytest.raises(ValueError, match="--freeze 'joint': use one of none, encoder, decoder"):
        TrainSettings(freeze="joint")


@pytest.mark.parametrize("at", ["output", "encoder"])
def test_the_anchor_holds_replay_clips_to_the_base_and_leaves_the_others_free(tmp_path: Path, at: str) -> None:
    """In-process, two steps: the replay clips are marked in every batch, the distance to the base
    is 0 before the first update (the base drew the same latency mode; a different one gives
    ~0.5) and grows after it."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from asr.model import load_model
    from asr.train_settings import TrainSettings, data_config, optim_config
    from asr.training import attach_anchor, prepare_model

    train, _ = corpus_manifests(tmp_path / "data")
    lines = train.read_text().splitlines()
    new, replay = tmp_path / "new.jsonl", tmp_path / "replay.jsonl"
    new.write_text("\n".join(lines[:40]) + "\n")
    replay.write_text("\n".join(lines[40:]) + "\n")
    settings = TrainSettings(max_steps=2, lr=1e-3, freeze="head", anchor=10.0, steps_per_epoch=2, warmup_steps=0)
    model, _ = load_model("demo")
    base, _ = load_model("demo")
    seen: list[dict] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            seen.append({"replay": batch[-1].tolist(), **{k: float(v) for k, v in outputs.items()}})

    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[Record()],
    )  # fmt: skip
    model.set_trainer(trainer)
    prepare_model(model, settings, on_gpu=False)
    attach_anchor(model, base, settings.anchor, at=at)
    config = data_config([str(new), str(replay)], model, settings, train=True, mix=[0.5, 0.5], replay=[str(replay)])
    assert [bool(c.get("tags")) for c in config["input_cfg"]] == [False, True]
    model.setup_training_data(OmegaConf.create(config))
    model.setup_optimization(OmegaConf.create(optim_config(settings)))
    frozen = {k: v.clone() for k, v in model.joint.state_dict().items()}
    trainer.fit(model)

    assert len(seen) == 2
    assert all(any(s["replay"]) for s in seen) and any(not all(s["replay"]) for s in seen)
    assert abs(seen[0]["anchor_distance"]) < 1e-6  # float noise only
    assert seen[1]["anchor_distance"] > 1e-5
    assert all(torch_equal(frozen[k], v) for k, v in model.joint.state_dict().items())  # the head stays
    assert not any(p.requires_grad for p in base.parameters())  # the base is never trained


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_a_killed_driver_is_resumed_by_the_same_command_and_a_different_command_is_refused(tmp_path: Path) -> None:
    """kill -9 of the `earmark finetune` driver once a checkpoint is registered: the same command
    run again resumes from it (the card says so); another command for the same model is refused
    with the way out (--restart), which starts over."""
    train, dev = corpus_manifests(tmp_path / "data")
    registry = tmp_path / "reg"
    args = ["finetune", "--train", str(train), "--dev", str(dev), "--registry", str(registry), "--name", "driver",
            "--max-steps", "9", "--steps-per-checkpoint", "3", "--lr", "1e-5", "--json"]  # fmt: skip
    run_dir = registry / "_train" / "driver-v0001"
    proc = _run_cli(args)
    try:
        deadline = time.monotonic() + 400
        while not _registered_checkpoints(run_dir):
            assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "the driver ended"
            assert time.monotonic() < deadline, "no checkpoint registered in time"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only
        proc.wait()
    finally:
        time.sleep(1)
        _stop_tree(proc)  # then the embedded Ray it leaves behind
    assert Registry(str(registry)).versions("driver") == []

    other = _run_cli([*args[:-2], "2e-5", "--json"])  # another --lr
    _, err = other.communicate(timeout=300)
    assert other.returncode == 3, err[-3000:]
    assert "driver-v0001" in err and "--restart" in err and "Traceback" not in err

    rerun = _run_cli(args)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    training = json.loads(out)["training"]
    assert training["resumed_run"] is True and training["steps"] == 9
    assert training["resumed_from_steps"] and training["resumed_from_steps"][0] in (3, 6)
    assert Registry(str(registry)).versions("driver") == ["v0001"]
    print(f"resumed from step {training['resumed_from_steps'][0]} after the driver was killed")


def test_an_unfinished_run_is_claimed_by_the_same_request_and_discarded_only_with_restart(tmp_path: Path) -> None:
    from jobs.finetune import FinetuneError, FinetuneRequest, _claim_run

    registry = Registry(str(tmp_path / "reg"))
    req = FinetuneRequest(train=["t.jsonl"], dev=["d.jsonl"], registry=registry.uri)
    first, other = {"settings": {"lr": 1e-5}}, {"settings": {"lr": 2e-5}}

    assert _claim_run(req, registry, "m-v0001", first) is False  # a new run
    leftover = tmp_path / "reg" / "_train" / "m-v0001" / "checkpoint_000000" / "checkpoint.ckpt"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"weights")
    assert _claim_run(req, registry, "m-v0001", first) is True  # the same request: resumed
    with pytest.raises(FinetuneError, match=r"m-v0001 with other data or settings.*--restart"):
        _claim_run(req, registry, "m-v0001", other)
    assert leftover.exists()
    restart = FinetuneRequest(train=["t.jsonl"], dev=["d.jsonl"], registry=registry.uri, restart=True)
    assert _claim_run(restart, registry, "m-v0001", other) is False  # discarded, started over
    assert not leftover.exists()
    assert _claim_run(req, registry, "m-v0001", other) is True
