"""How many realtime streams one CPU replica of ``earmark serve`` holds in real time, batched and not.

    .venv/bin/python benchmarks/serve_streams.py [--streams 1,4,16,32,64,96,128,192,256] [--seconds 12]

For each mode, one server is started (``earmark serve --max-sessions 512`` on loopback, no API
key: one replica on CPU with the demo model; ``--no-batching`` for the unbatched mode, one model
call per session per chunk), the modes one after the other, never both servers at once. Against
it, for each N in ``--streams``, N WebSocket sessions (``/v1/realtime``, one asyncio process, the
``websockets`` client) each:

* configure latency mode 56,3 (``session.update``: ``transcription.att_context [56, 3]``,
  ``turn_detection: null``, format ``audio/pcm`` at 16000 Hz, so the server resamples nothing),
* stream ``--seconds`` of demo-corpus speech (the short clips back to back, each stream starting
  at another clip) in ``--chunk-ms`` appends paced in real time: chunk k is sent at
  t0 + offset + k * chunk, the offsets drawn uniformly over the first chunk (fixed seed) so the
  streams do not all send at the same instant; a stream that falls behind its schedule sends its
  late chunks at once and the lateness is recorded,
* commit, and wait for ``conversation.item.input_audio_transcription.completed``.

The client precomputes every append event (base64 text) before the clock starts.

Figures, per N:

* delta latency: for every ``...transcription.delta``, its arrival time minus the time the chunk
  holding its ``earmark.audio_end_s`` was sent (how long after the audio reached that position
  its text was on the client); p50 and p95 over all deltas of all streams. The last delta of a
  stream is the one sent with the completion, after the commit.
* completion lag: the ``completed`` event's arrival minus the time the stream's last chunk was
  sent (the commit follows it at once); the median and the worst stream.
* client lateness: how far behind its schedule the client sent a chunk, worst over all streams
  (the client shares the machine with the server: a late client offers less load than asked).
* CPU: the client's own CPU use and the server's process tree's (cores, averaged over the run).

The rule for "held in real time" (thresholds are options): p95 delta latency <= ``--max-p95``
(1.5 s) AND every stream's completion lag <= ``--max-lag`` (1.5 s) AND the client kept its
pacing (worst lateness <= ``--max-client-late``, 0.25 s) AND every stream completed (no error
event, no timeout). A mode's sweep stops after the first N that breaks the rule.

Printed: the machine's cores and the served model's id, one line per N as it runs, then both
modes side by side and the headline: the most streams held in real time, batched / unbatched,
and their ratio. Latencies on a shared machine are noisy: compare the modes of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving import (  # noqa: E402 - after the path
    SAMPLE_RATE,
    ServerCpu,
    concatenated,
    corpus_clips,
    earmark_server,
    machine,
    pcm16,
    percentile,
    run_benchmark,
    served_model,
)

DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
FAILED = "conversation.item.input_audio_transcription.failed"
COMMIT = json.dumps({"type": "input_audio_buffer.commit"})
#: distinct audio streams prepared (stream i sends variant i % VARIANTS): the client's memory stays small
VARIANTS = 8


@dataclass
class Stream:
    """What one session measured (monotonic seconds of the client's event loop)."""

    sent: list[float] = field(default_factory=list)  # when chunk k was sent
    deltas: list[tuple[float, float]] = field(default_factory=list)  # (arrival, audio_end_s)
    completed_at: float | None = None
    late_s: float = 0.0  # worst lateness of a send against its schedule
    error: str | None = None


@dataclass
class Row:
    """One N in one mode."""

    streams: int
    completed: int
    deltas: int
    p50_s: float
    p95_s: float
    lag_median_s: float
    lag_max_s: float
    client_late_s: float
    client_cpu: float
    server_cpu: float
    open_s: float  # opening and configuring the N sessions (before the clock starts)
    realtime: bool
    why: str


def session_update(att: tuple[int, int]) -> str:
    return json.dumps(
        {
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                        "transcription": {"model": "earmark", "att_context": list(att)},
                        "turn_detection": None,
                    }
                },
            },
        }
    )


def prepare_chunks(seconds: float, chunk_ms: int) -> tuple[list[list[str]], int]:
    """VARIANTS streams of ``seconds`` each, as ready-to-send append events; and the samples per chunk."""
    clips = corpus_clips()
    step = SAMPLE_RATE * chunk_ms // 1000
    variants = []
    for v in range(VARIANTS):
        start = v * len(clips) // VARIANTS
        order = list(range(start, len(clips))) + list(range(start))
        audio = concatenated(clips, seconds, order)
        variants.append(
            [
                json.dumps(
                    {
                        "type": "input_audio_buffer.append",
                        "audio": base64.b64encode(pcm16(audio[i : i + step])).decode(),
                    }
                )
                for i in range(0, len(audio), step)
            ]
        )
    return variants, step


async def connect(url: str):
    from websockets.asyncio.client import connect as ws_connect

    # no client pings: a busy server answering a ping late must not end a measured session
    return await ws_connect(url, max_size=None, open_timeout=120, ping_interval=None, close_timeout=5)


async def expect(ws, kind: str, timeout: float) -> dict:
    event = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    if event["type"] != kind:
        raise RuntimeError(f"expected {kind}, got {event['type']}: {event.get('error') or event}")
    return event


class Gate:
    """The common start: every stream reports itself configured (or failed), then all are given t0."""

    def __init__(self, n: int) -> None:
        self.waiting = n
        self.all_ready = asyncio.Event()
        self.t0: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def ready(self) -> None:
        self.waiting -= 1
        if self.waiting <= 0:
            self.all_ready.set()


async def one_stream(
    url: str, update: str, chunks: list[str], chunk_s: float, gate: Gate, offset_s: float, timeout_s: float
) -> Stream:
    """Connect and configure, wait for the gate's t0, stream, commit, await completion."""
    loop = asyncio.get_running_loop()
    out = Stream()
    try:
        ws = await connect(url)
    except Exception as exc:  # a refused handshake is a failed stream, not a failed benchmark
        out.error = f"connect: {type(exc).__name__}: {exc}"
        gate.ready()
        return out
    try:
        try:
            await expect(ws, "session.created", 120)
            await ws.send(update)
            await expect(ws, "session.updated", 120)
        finally:
            gate.ready()
        t0 = await gate.t0 + offset_s

        async def receive() -> None:
            async for message in ws:
                event = json.loads(message)
                kind = event["type"]
                if kind == DELTA:
                    out.deltas.append((loop.time(), event["earmark"]["audio_end_s"]))
                elif kind == COMPLETED:
                    out.completed_at = loop.time()
                    return
                elif kind in ("error", FAILED):
                    error = event.get("error") or {}
                    out.error = f"{kind}: {error.get('code')}: {error.get('message')}"
                    if kind == FAILED:
                        return

        receiver = asyncio.ensure_future(receive())
        for k, message in enumerate(chunks):
            due = t0 + k * chunk_s
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            out.late_s = max(out.late_s, now - due)
            out.sent.append(now)
            await ws.send(message)
        await ws.send(COMMIT)
        try:
            await asyncio.wait_for(receiver, timeout_s)
        except TimeoutError:
            out.error = out.error or f"no completed event within {timeout_s:g} s of the commit"
    except Exception as exc:
        out.error = out.error or f"{type(exc).__name__}: {exc}"
    finally:
        await ws.close()
    return out


def latencies(stream: Stream, step: int) -> list[float]:
    """Every delta's arrival minus the send time of the chunk holding its audio_end_s."""
    out = []
    for arrival, end_s in stream.deltas:
        k = min(len(stream.sent) - 1, max(0, (round(end_s * SAMPLE_RATE) - 1) // step))
        out.append(arrival - stream.sent[k])
    return out


async def wait_idle(url: str, timeout_s: float = 60.0) -> None:
    """Until the replica reports no open session (the previous N's sockets are closed)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(url + "/healthz")).json().get("sessions") == 0:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)


async def run_streams(server, n: int, variants: list[list[str]], step: int, args, rng: random.Random) -> Row:
    loop = asyncio.get_running_loop()
    chunk_s = step / SAMPLE_RATE
    url = server.ws_url + "/v1/realtime?intent=transcription"
    update = session_update(args.att)
    gate = Gate(n)
    offsets = [rng.uniform(0, chunk_s) for _ in range(n)]
    tasks = [
        asyncio.ensure_future(
            one_stream(url, update, variants[i % len(variants)], chunk_s, gate, offsets[i], args.timeout)
        )
        for i in range(n)
    ]
    # every session is open and configured (or has failed to be) before the clock starts
    t_open = time.monotonic()
    await gate.all_ready.wait()
    open_s = time.monotonic() - t_open
    cpu = ServerCpu(server.proc.pid)
    cpu0, client0, wall0 = cpu.seconds(), time.process_time(), time.monotonic()
    gate.t0.set_result(loop.time() + 0.2)
    streams = await asyncio.gather(*tasks)
    wall = time.monotonic() - wall0
    server_cpu = (cpu.seconds() - cpu0) / wall
    client_cpu = (time.process_time() - client0) / wall
    lats = [x for s in streams for x in latencies(s, step)]
    lags = [s.completed_at - s.sent[-1] for s in streams if s.completed_at is not None and s.sent]
    done = [s for s in streams if s.completed_at is not None and s.error is None]
    errors = [s.error for s in streams if s.error]
    row = Row(
        streams=n,
        completed=len(done),
        deltas=len(lats),
        p50_s=percentile(lats, 50),
        p95_s=percentile(lats, 95),
        lag_median_s=statistics.median(lags) if lags else math.nan,
        lag_max_s=max(lags) if lags else math.nan,
        client_late_s=max(s.late_s for s in streams),
        client_cpu=client_cpu,
        server_cpu=server_cpu,
        open_s=open_s,
        realtime=False,
        why="",
    )
    why = []
    if errors:
        why.append(f"{len(errors)} stream(s) failed (first: {errors[0]})")
    if not lats or row.p95_s > args.max_p95:
        why.append(f"p95 delta latency {row.p95_s:.2f} s > {args.max_p95:g} s")
    if len(lags) < n or row.lag_max_s > args.max_lag:
        why.append(f"worst completion lag {row.lag_max_s:.2f} s > {args.max_lag:g} s")
    if row.client_late_s > args.max_client_late:
        why.append(f"the client fell {row.client_late_s:.2f} s behind its pacing (> {args.max_client_late:g} s)")
    row.realtime = not why
    row.why = "; ".join(why)
    await wait_idle(server.url)
    return row


async def warm_up(server, variants: list[list[str]], step: int, args) -> None:
    """One short stream, unpaced: the model's first calls (allocations, kernels) are not measured."""
    loop = asyncio.get_running_loop()
    gate = Gate(1)
    gate.t0.set_result(loop.time())
    chunks = variants[0][: max(1, int(args.warmup * SAMPLE_RATE / step))]
    s = await one_stream(
        server.ws_url + "/v1/realtime?intent=transcription", session_update(args.att), chunks, 0.0, gate, 0.0, 120
    )
    if s.error or s.completed_at is None:
        raise RuntimeError(f"the warm-up stream failed: {s.error}")
    await wait_idle(server.url)


def fmt(x: float, spec: str = "5.2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_row(mode: str, r: Row) -> None:
    verdict = "real time" if r.realtime else f"BROKE: {r.why}"
    print(
        f"{mode:9s} N={r.streams:<4d} done {r.completed:>4d}/{r.streams:<4d} deltas {r.deltas:>6d}  "
        f"latency p50 {fmt(r.p50_s)} s p95 {fmt(r.p95_s)} s  completion lag median {fmt(r.lag_median_s)} s "
        f"max {fmt(r.lag_max_s)} s  client late {fmt(r.client_late_s)} s  cpu client {r.client_cpu:.2f} "
        f"server {r.server_cpu:.2f} cores  {verdict}",
        flush=True,
    )


def held(rows: list[Row]) -> int:
    """The most streams held in real time (the sweep stops at the first N that breaks)."""
    return max((r.streams for r in rows if r.realtime), default=0)


def sweep(mode: str, args, variants: list[list[str]], step: int) -> tuple[list[Row], str]:
    server_args = ["--model", args.model, "--max-sessions", str(args.max_sessions)]
    if mode == "unbatched":
        server_args.append("--no-batching")
    rows: list[Row] = []
    rng = random.Random(args.seed)
    with earmark_server(server_args) as server:
        model = served_model(server)
        print(f"\n{mode}: earmark serve {' '.join(server_args)} (port {server.port}), model {model}", flush=True)
        asyncio.run(warm_up(server, variants, step, args))
        for n in args.streams:
            row = asyncio.run(run_streams(server, n, variants, step, args, rng))
            rows.append(row)
            print_row(mode, row)
            if not row.realtime:
                break
    return rows, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    parser.add_argument(
        "--streams", type=ints, default=[1, 4, 16, 32, 64, 96, 128, 192, 256], help="N to try, in order"
    )
    parser.add_argument("--seconds", type=float, default=12.0, help="audio per stream")
    parser.add_argument("--chunk-ms", type=int, default=80, help="audio per append event")
    parser.add_argument("--att-context", default="56,3", help="the latency mode, LEFT,RIGHT")
    parser.add_argument("--modes", default="batched,unbatched", help="batched, unbatched or both (in that order)")
    parser.add_argument("--max-p95", type=float, default=1.5, help="real time: p95 delta latency at most (s)")
    parser.add_argument("--max-lag", type=float, default=1.5, help="real time: every completion lag at most (s)")
    parser.add_argument(
        "--max-client-late", type=float, default=0.25, help="real time: the client's worst lateness at most (s)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="wait for a completion this long after the commit")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of audio in the unmeasured warm-up stream")
    parser.add_argument("--max-sessions", type=int, default=512, help="the server's --max-sessions")
    parser.add_argument("--model", default="demo", help="the server's --model")
    parser.add_argument("--seed", type=int, default=0, help="for the start offsets")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.att = tuple(int(v) for v in args.att_context.split(","))
    modes = [m for m in ("batched", "unbatched") if m in args.modes.split(",")]
    if not modes:
        parser.error("--modes: batched, unbatched or both")

    variants, step = prepare_chunks(args.seconds, args.chunk_ms)
    print(f"machine: {machine()}")
    print(
        f"{max(args.streams)} streams at most, {args.seconds:g} s of audio each in {args.chunk_ms} ms chunks paced in "
        f"real time, att_context {args.att[0]},{args.att[1]}, pcm16 at 16 kHz; real time = p95 <= {args.max_p95:g} s, "
        f"completion lag <= {args.max_lag:g} s, client late <= {args.max_client_late:g} s, no failures",
        flush=True,
    )
    results: dict[str, list[Row]] = {}
    model = ""
    for mode in modes:
        results[mode], model = sweep(mode, args, variants, step)

    print(f"\nmodel {model}; {machine()}")
    cols = "  ".join(f"{m + ': p50/p95 s, max lag s, rt':>34s}" for m in modes)
    print(f"{'N':>5s}  {cols}")
    for n in args.streams:
        cells = []
        for m in modes:
            r = next((r for r in results[m] if r.streams == n), None)
            cells.append(
                f"{'':>34s}"
                if r is None
                else f"{fmt(r.p50_s)} / {fmt(r.p95_s)}, {fmt(r.lag_max_s, '6.2f')}, {'yes' if r.realtime else 'NO':>3s}".rjust(
                    34
                )
            )
        if any(c.strip() for c in cells):
            print(f"{n:5d}  {'  '.join(cells)}")
    most = {m: held(results[m]) for m in modes}
    untried = {m: results[m] and results[m][-1].realtime for m in modes}  # never broke: the figure is a floor
    shown = {m: f"{most[m]}{'+' if untried[m] else ''}" for m in modes}
    headline = ", ".join(f"{m} {shown[m]}" for m in modes)
    if len(modes) == 2:
        b, u = most["batched"], most["unbatched"]
        ratio = f"{b / u:.1f}x" if u else "n/a (unbatched held none)"
        print(
            f"\nmost streams held in real time: batched {shown['batched']} / unbatched {shown['unbatched']} = {ratio}"
        )
    else:
        print(f"\nmost streams held in real time: {headline}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "model": model,
                    "config": {k: v for k, v in vars(args).items() if k not in ("json",) and not callable(v)},
                    "modes": {m: [asdict(r) for r in rows] for m, rows in results.items()},
                    "most_streams_in_real_time": most,
                    "never_broke": untried,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    run_benchmark(main)
