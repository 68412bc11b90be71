"""File transcription through ``earmark serve``: requests and audio seconds per second, batched and not.

    .venv/bin/python benchmarks/serve_files.py [--clients 1,8,32] [--repeats 3]

The files: ``--files`` recordings (24) made of the demo corpus's short clips back to back, cut at
lengths drawn uniformly between 1 and 30 s (fixed ``--seed``), as 16 kHz mono WAV bytes in
memory. The server: ``earmark serve`` on loopback (one CPU replica, the demo model, no API key),
started with batching (parts of concurrent requests share model calls) and then, after the
first is stopped, with ``--no-batching`` (one model call per file part), never both at once.

For each server, after two unmeasured requests, for each number of clients C in ``--clients``:
C concurrent clients (one ``httpx.AsyncClient`` in one asyncio process) each send their share of
requests one after the other, ``POST /v1/audio/transcriptions`` (multipart, ``response_format
json``), client k taking the files from k on, so that all files are sent. ``--requests`` is the
number per client; without it each run sends ``--total`` requests (96) split over its clients,
so that every run is about the same work (~20-40 s on 2 cores with the demo model).

Figures per run: requests per second and audio seconds per second (all requests' audio over the
run's wall time, from the first request sent to the last answer), and p50/p95 of the request
latency (send to answer). With ``--repeats`` R, every figure is the median of R runs (the runs of
one server interleave: clients 1, 8, 32, 1, 8, 32, ...). The lead ran it with ``--repeats 3`` on
a quiet machine.

Baseline: ``earmark transcribe-file FILE`` as a user runs it, a new process per file (so each pays
for starting Python and loading the model), on the first ``--baseline-files`` files (3), run
while no server is up; reported as seconds per file (median) and audio seconds per second (their
audio over their wall time).

Printed: the machine's cores and the served model's id, each run, then the table: clients x
(batched, unbatched) -> req/s, audio s/s, p50/p95 latency, and the ratios batched / unbatched and
each mode's audio s/s over transcribe-file's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving import (  # noqa: E402 - after the path
    ROOT,
    SAMPLE_RATE,
    concatenated,
    corpus_clips,
    earmark_server,
    machine,
    percentile,
    run_benchmark,
    served_model,
    wav_bytes,
)


@dataclass(frozen=True)
class AudioFile:
    name: str
    data: bytes
    seconds: float


@dataclass
class Run:
    clients: int
    requests: int
    failed: int
    wall_s: float
    req_per_s: float
    audio_per_s: float
    p50_s: float
    p95_s: float


def make_files(n: int, seed: int, shortest: float, longest: float) -> list[AudioFile]:
    clips = corpus_clips()
    rng = random.Random(seed)
    files = []
    for i in range(n):
        seconds = round(rng.uniform(shortest, longest), 2)
        order = rng.sample(range(len(clips)), len(clips))
        audio = concatenated(clips, seconds, order)
        files.append(AudioFile(f"bench-{i:02d}.wav", wav_bytes(audio), len(audio) / SAMPLE_RATE))
    return files


async def post(client, url: str, f: AudioFile) -> None:
    response = await client.post(
        url,
        files={"file": (f.name, f.data, "audio/wav")},
        data={"model": "earmark", "response_format": "json"},
    )
    if response.status_code != 200:
        raise RuntimeError(f"{f.name}: HTTP {response.status_code}: {response.text[:300]}")
    if "text" not in response.json():
        raise RuntimeError(f"{f.name}: no text in {response.text[:300]}")


async def run_clients(server, files: list[AudioFile], clients: int, per_client: int) -> Run:
    import httpx

    url = server.url + "/v1/audio/transcriptions"
    latencies: list[float] = []
    audio = [0.0]
    failures: list[str] = []

    async def one_client(client: httpx.AsyncClient, k: int) -> None:
        for j in range(per_client):
            f = files[(k + j * clients) % len(files)]
            t0 = time.perf_counter()
            try:
                await post(client, url, f)
            except (httpx.HTTPError, RuntimeError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - t0)
            audio[0] += f.seconds

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=30.0), limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(client, k) for k in range(clients)))
        wall = time.perf_counter() - t0
    if failures:
        print(f"  {len(failures)} request(s) failed; first: {failures[0]}", flush=True)
    return Run(
        clients=clients,
        requests=len(latencies),
        failed=len(failures),
        wall_s=wall,
        req_per_s=len(latencies) / wall,
        audio_per_s=audio[0] / wall,
        p50_s=percentile(latencies, 50),
        p95_s=percentile(latencies, 95),
    )


def per_client(args, clients: int) -> int:
    return args.requests if args.requests else max(1, math.ceil(args.total / clients))


def median_run(runs: list[Run]) -> Run:
    """Each figure the median over the repeats (so one row may mix runs)."""
    med = lambda key: statistics.median(getattr(r, key) for r in runs)  # noqa: E731
    return Run(
        clients=runs[0].clients,
        requests=int(med("requests")),
        failed=max(r.failed for r in runs),
        wall_s=med("wall_s"),
        req_per_s=med("req_per_s"),
        audio_per_s=med("audio_per_s"),
        p50_s=med("p50_s"),
        p95_s=med("p95_s"),
    )


def mode_runs(mode: str, args, files: list[AudioFile]) -> tuple[dict[int, list[Run]], str]:
    server_args = ["--model", args.model]
    if mode == "unbatched":
        server_args.append("--no-batching")
    runs: dict[int, list[Run]] = {c: [] for c in args.clients}
    with earmark_server(server_args) as server:
        model = served_model(server)
        print(f"\n{mode}: earmark serve {' '.join(server_args)} (port {server.port}), model {model}", flush=True)
        asyncio.run(run_clients(server, files, 1, 2))  # warm-up, not measured
        for k in range(args.repeats):
            for c in args.clients:
                run = asyncio.run(run_clients(server, files, c, per_client(args, c)))
                runs[c].append(run)
                print(
                    f"{mode:9s} repeat {k + 1} clients {c:3d}: {run.requests:4d} requests in {run.wall_s:6.1f} s -> "
                    f"{run.req_per_s:6.2f} req/s, {run.audio_per_s:7.1f} audio s/s, latency p50 {run.p50_s:6.2f} s "
                    f"p95 {run.p95_s:6.2f} s",
                    flush=True,
                )
    return runs, model


def baseline(files: list[AudioFile], count: int) -> dict[str, float] | None:
    """``earmark transcribe-file FILE``, a fresh process per file."""
    if count <= 0:
        return None
    walls, audio = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for f in files[:count]:
            path = Path(tmp) / f.name
            path.write_bytes(f.data)
            t0 = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "jobs.cli", "transcribe-file", str(path)],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                print(f"transcribe-file {f.name} failed ({done.returncode}): {done.stderr[-800:]}", flush=True)
                continue
            walls.append(wall)
            audio += f.seconds
            print(f"transcribe-file {f.name} ({f.seconds:4.1f} s of audio): {wall:5.1f} s", flush=True)
    if not walls:
        return None
    return {"files": len(walls), "s_per_file": statistics.median(walls), "audio_per_s": audio / sum(walls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    parser.add_argument("--clients", type=ints, default=[1, 8, 32], help="concurrent clients, e.g. 1,8,32")
    parser.add_argument("--requests", type=int, help="requests per client (default: --total split over the clients)")
    parser.add_argument("--total", type=int, default=96, help="requests per run when --requests is not given")
    parser.add_argument("--repeats", type=int, default=1, help="runs per figure; the median is reported")
    parser.add_argument("--files", type=int, default=24, help="distinct files")
    parser.add_argument("--shortest", type=float, default=1.0, help="shortest file (s)")
    parser.add_argument("--longest", type=float, default=30.0, help="longest file (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-files", type=int, default=3, help="files for `earmark transcribe-file` (0: none)")
    parser.add_argument("--modes", default="batched,unbatched", help="batched, unbatched or both (in that order)")
    parser.add_argument("--model", default="demo", help="the server's --model")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    modes = [m for m in ("batched", "unbatched") if m in args.modes.split(",")]
    if not modes:
        parser.error("--modes: batched, unbatched or both")

    files = make_files(args.files, args.seed, args.shortest, args.longest)
    total_audio = sum(f.seconds for f in files)
    print(f"machine: {machine()}")
    print(
        f"{len(files)} files of {min(f.seconds for f in files):.1f}-{max(f.seconds for f in files):.1f} s "
        f"({total_audio / len(files):.1f} s on average), WAV 16 kHz mono; clients {args.clients}; "
        f"repeats {args.repeats}",
        flush=True,
    )
    base = baseline(files, args.baseline_files)
    results: dict[str, dict[int, Run]] = {}
    everything: dict[str, dict[int, list[Run]]] = {}
    model = ""
    for mode in modes:
        everything[mode], model = mode_runs(mode, args, files)
        results[mode] = {c: median_run(runs) for c, runs in everything[mode].items()}

    print(f"\nmodel {model}; {machine()}; medians of {args.repeats} run(s)")
    if base:
        print(
            f"earmark transcribe-file (a process per file, {base['files']} files): {base['s_per_file']:.1f} s per file, "
            f"{base['audio_per_s']:.1f} audio s/s"
        )
    head = "".join(f"  {m + ': req/s  audio s/s  p50 s  p95 s':>40s}" for m in modes)
    ratios = "  batched/unbatched" if len(modes) == 2 else ""
    versus = "".join(f"  {m[:1] + '/transcribe-file':>17s}" for m in modes) if base else ""
    print(f"{'clients':>7s}{head}{ratios}{versus}")
    for c in args.clients:
        line = f"{c:7d}"
        for m in modes:
            r = results[m][c]
            line += f"  {r.req_per_s:11.2f}  {r.audio_per_s:9.1f}  {r.p50_s:5.2f}  {r.p95_s:5.2f}".rjust(42)
            if r.failed:
                line += f" ({r.failed} failed)"
        if len(modes) == 2:
            line += f"  {results['batched'][c].audio_per_s / results['unbatched'][c].audio_per_s:17.2f}x"
        if base:
            line += "".join(f"  {results[m][c].audio_per_s / base['audio_per_s']:16.1f}x" for m in modes)
        print(line)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "model": model,
                    "config": {k: v for k, v in vars(args).items() if k != "json"},
                    "files": [{"name": f.name, "seconds": f.seconds} for f in files],
                    "transcribe_file": base,
                    "medians": {m: [asdict(results[m][c]) for c in args.clients] for m in modes},
                    "runs": {
                        m: {str(c): [asdict(r) for r in runs] for c, runs in rs.items()} for m, rs in everything.items()
                    },
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    run_benchmark(main)
