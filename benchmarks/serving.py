"""What the ``earmark serve`` benchmarks share (``serve_streams.py``, ``serve_files.py``): the demo
corpus's short clips as audio, PCM and WAV encodings, a server that is always stopped, and the
machine's description. Not a benchmark itself."""

from __future__ import annotations

import io
import os
import signal
import sys
import wave
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from asr.audio import SAMPLE_RATE  # noqa: E402 - after the path
from tests.serveserver import EarmarkServer  # noqa: E402 - after the path


def corpus_clips() -> list[np.ndarray]:
    """demo/corpus/short/*.flac, decoded at 16 kHz mono float32, in name order."""
    from asr.audio import decode_audio

    paths = sorted((ROOT / "demo" / "corpus" / "short").glob("*.flac"))
    if not paths:
        raise SystemExit(f"no clips in {ROOT / 'demo/corpus/short'}: run `make setup` first")
    return [decode_audio(p) for p in paths]


def concatenated(clips: Sequence[np.ndarray], seconds: float, order: Sequence[int]) -> np.ndarray:
    """Clips in ``order`` (looped) back to back, cut at exactly ``seconds``."""
    want = int(round(seconds * SAMPLE_RATE))
    out, total, i = [], 0, 0
    while total < want:
        clip = clips[order[i % len(order)]]
        out.append(clip)
        total += len(clip)
        i += 1
    return np.concatenate(out)[:want]


def pcm16(audio: np.ndarray) -> bytes:
    """Little-endian 16-bit PCM, as OpenAI's ``pcm16`` and a WAV file hold it."""
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def wav_bytes(audio: np.ndarray) -> bytes:
    """A 16 kHz mono 16-bit WAV file of ``audio``, in memory."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm16(audio))
    return buf.getvalue()


@contextmanager
def earmark_server(args: Sequence[str], *, start_timeout_s: float = 300.0) -> Iterator[EarmarkServer]:
    """``earmark serve ARGS`` on a free loopback port, stopped on leaving however it is left: an
    error, Ctrl-C (also while it is still starting) or SIGTERM (see :func:`exit_on_sigterm`)."""
    server = EarmarkServer(list(args), start_timeout_s=start_timeout_s)
    try:
        server.__enter__()
        yield server
    finally:
        server.__exit__()


def exit_on_sigterm() -> None:
    """SIGTERM ends the benchmark like Ctrl-C does, so that the ``with`` blocks stop the servers."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def run_benchmark(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``; Ctrl-C or SIGTERM stops its servers and exits with status 130."""
    exit_on_sigterm()
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; the server was stopped", file=sys.stderr)
        sys.exit(130)


def served_model(server: EarmarkServer) -> str:
    """The id (with its content hash) of the model the server serves."""
    import httpx

    card = httpx.get(server.url + "/v1/models", headers=server.headers, timeout=30).json()["data"][0]
    return card["id"]


def machine() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{os.cpu_count()} CPU cores ({usable} usable by this process), {sys.platform}, Python {sys.version.split()[0]}"
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation); NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


class ServerCpu:
    """CPU seconds used by the server's process tree (the CLI, embedded Ray, the replica)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def seconds(self) -> float:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return float("nan")
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total
