"""Throughput of ``earmark transcribe`` against a plain engine loop and NeMo's ``transcribe()``.

    .venv/bin/python benchmarks/transcribe_throughput.py [--repeats 3] [--copies 3]

The same clips (the corpus's short clips, each also cut at two other offsets, plus the long
recordings: a few hundred clips of 1-90 s) are transcribed three ways on this machine, in the
``auto`` language mode, each as a user runs it: a fresh process per run, so every way pays for
starting Python, importing NeMo and loading the model, and every way decodes the audio itself.

1. ``engine loop``: one process decodes each clip and calls ``Transcriber.transcribe`` on lists
   of 64 clips (the engine packs them by length). No Ray, no VAD, no Parquet.
2. ``nemo transcribe``: one process decodes the clips and calls NeMo's own
   ``model.transcribe(arrays, batch_size=16)`` (long recordings whole).
3. ``earmark transcribe``: the command, from the manifest to Parquet parts (decode, VAD split,
   actor pool, commit, summary), joining a Ray cluster started once beforehand on this machine
   (``ray start --head``; a cluster is up before jobs come, so its start-up is reported apart).

All three run with earmark's allocator settings (``cluster.runtime.ALLOCATOR_ENV``; what they
are worth alone: ``benchmarks/allocator.py``), so the ratios compare the pipelines.

Throughput is the input's audio seconds (the same number for all three) per wall second of the
whole process; printed: each run, the median of the repeats and its ratio to the engine loop.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from records.manifest import ManifestEntry, read_manifest, write_manifest  # noqa: E402 - after the path


def build_manifest(folder: Path, copies: int) -> tuple[Path, list[ManifestEntry]]:
    from demo.corpus import load_manifest

    rows = []
    for row in load_manifest():
        if "sentences" in row.extra:  # a long recording
            rows.append(ManifestEntry(row.audio_filepath))
            continue
        for k in range(copies):
            cut = 0.05 * k
            rows.append(ManifestEntry(row.audio_filepath, offset=cut, duration=round((row.duration or 0) - cut, 3)))
    path = folder / "bench.jsonl"
    path.write_bytes(write_manifest(rows))
    return path, rows


def total_seconds(rows: list[ManifestEntry]) -> float:
    from asr.audio import probe_audio

    total = 0.0
    for r in rows:
        whole = probe_audio(r.audio_filepath).duration_s
        total += min(r.duration or whole, whole - r.start_s)
    return total


def engine_loop(manifest: Path) -> None:
    from asr.audio import decode_audio
    from asr.engine import Transcriber

    rows = read_manifest(manifest.read_bytes())
    engine = Transcriber.load("demo", device="cpu")
    for i in range(0, len(rows), 64):
        chunk = rows[i : i + 64]
        audios = [decode_audio(r.audio_filepath, offset_s=r.start_s, duration_s=r.duration) for r in chunk]
        engine.transcribe(audios)


def nemo_transcribe(manifest: Path) -> None:
    from asr.audio import decode_audio
    from asr.model import load_model

    rows = read_manifest(manifest.read_bytes())
    audios = [decode_audio(r.audio_filepath, offset_s=r.start_s, duration_s=r.duration) for r in rows]
    model, _ = load_model("demo", device="cpu")
    model.transcribe(audios, batch_size=16, verbose=False)


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-1500:])
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=3, help="cuts of each short clip")
    parser.add_argument("--run", choices=["engine", "nemo"], help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.run:  # one timed way, in this fresh process
        (engine_loop if args.run == "engine" else nemo_transcribe)(args.manifest)
        return
    from cluster.runtime import allocator_env

    env = os.environ | {
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "NEMO_LOGGING_LEVEL": "ERROR", "RAY_ADDRESS": "",
        "RAY_AUTH_MODE": "disabled",  # a throwaway cluster on loopback
    }  # fmt: skip
    # every way, and the cluster, computes with earmark's allocator settings (cluster.runtime):
    # the comparison is of the pipelines, not of glibc's defaults (benchmarks/allocator.py)
    env |= allocator_env(env)
    ray_bin = str(Path(sys.executable).parent / "ray")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest, rows = build_manifest(work, args.copies)
        total_audio = total_seconds(rows)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.perf_counter()
        subprocess.run(
            [
                ray_bin,
                "start",
                "--head",
                f"--port={port}",
                "--node-ip-address=127.0.0.1",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={work / 'ray'}",
            ],  # fmt: skip
            env=env,
            check=True,
            capture_output=True,
        )
        ray_start = time.perf_counter() - t0
        me = [sys.executable, str(Path(__file__).resolve())]
        ways = {
            "engine loop": lambda k: me + ["--run", "engine", "--manifest", str(manifest)],
            "nemo transcribe": lambda k: me + ["--run", "nemo", "--manifest", str(manifest)],
            "earmark transcribe": lambda k: [
                sys.executable,
                "-m",
                "jobs.cli",
                "transcribe",
                str(manifest),
                "--out",
                str(work / f"out{k}"),
                "--address",
                f"127.0.0.1:{port}",
                "--quiet",
            ],  # fmt: skip
        }
        results: dict[str, list[float]] = {name: [] for name in ways}
        try:
            for k in range(args.repeats):
                for name, cmd in ways.items():
                    try:
                        wall = timed(cmd(k), env)
                    except RuntimeError as exc:  # a failing baseline is reported, not fatal
                        print(f"{name}: failed: {exc}")
                        continue
                    results[name].append(total_audio / wall)
                    print(f"repeat {k + 1} {name:20s} {wall:6.1f} s -> {total_audio / wall:6.1f} audio s/s", flush=True)
        finally:  # stop this cluster only (`ray stop` would stop every Ray on the machine)
            import psutil

            marks = (f":{port}", f"gcs_server_port={port}", str(work / "ray"))
            found = [
                p
                for p in psutil.process_iter(["cmdline"])
                if any(m in " ".join(p.info["cmdline"] or ()) for m in marks)
            ]
            for proc in found + [c for p in found for c in p.children(recursive=True)]:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
    base = statistics.median(results["engine loop"])
    print(
        f"\n{len(rows)} clips, {total_audio:.0f} s of audio; Ray cluster start-up (not in the timings): {ray_start:.1f} s"
    )
    print(f"{'way':20s} {'audio s/s (median)':>20s} {'ratio to engine loop':>22s}")
    for name, values in results.items():
        if values:
            med = statistics.median(values)
            print(f"{name:20s} {med:20.1f} {med / base:22.2f}")


if __name__ == "__main__":
    main()
