"""The architecture's rules that hold at run time (the import rules themselves are import-linter
contracts in pyproject.toml, checked by `make lint`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_light_entry_points_load_no_torch_nemo_or_ray() -> None:
    """The review app, the command line and the job modules' drivers import without the heavy stack."""
    code = (
        "import sys, labeling.webapp, jobs.cli, jobs.finetune, jobs.loop, jobs.transcribe, records.pseudo_labels; "
        "print([m for m in ('torch', 'nemo', 'ray', 'lightning') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_job_never_starts_ray_itself(tmp_path: Path) -> None:
    """Library code runs on its caller's Ray connection: without one, a job says so (Ray Data
    would otherwise start a local cluster of its own)."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio_filepath": "/nowhere/a.wav"}\n')
    code = f"""
import sys, ray
from cluster.runtime import NotConnectedError
from jobs.stages import JobSettings
from jobs.transcribe import TranscribeRequest, run_transcribe
try:
    run_transcribe(TranscribeRequest(input={str(manifest)!r}, out={str(tmp_path / "out")!r}, settings=JobSettings(run_id="")))
except NotConnectedError as exc:
    print("refused:", exc)
print("ray started:", ray.is_initialized())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: Ray is not connected" in out.stdout and "connect()" in out.stdout
    assert "ray started: False" in out.stdout
