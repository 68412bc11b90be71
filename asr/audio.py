"""Audio decoding: any audio file, bytes or stream -> mono float32 at 16 kHz. earmark's one decoder.

libsndfile (through soundfile) reads WAV, FLAC, OGG/Vorbis, OGG/Opus and MP3 and seeks straight to
a frame. Whatever it does not recognise (M4A/AAC, the sound track of MP4, MKV, WebM, ...) goes to
FFmpeg (through PyAV). soxr resamples. All three are imported on first use, so importing this
module costs nothing. Local paths and bytes only: read s3:// through ``cluster.storage`` first.

Bad audio raises :class:`AudioError`, whose message names the source, the problem and the fix;
the pipeline turns it into an error row instead of a crash.

>>> import io, numpy as np, soundfile as sf
>>> buf = io.BytesIO()
>>> sf.write(buf, np.zeros(8_000, np.float32), 8_000, format="WAV")
>>> decode_audio(buf.getvalue()).shape  # one second, resampled to 16 kHz
(16000,)
>>> probe_audio(buf.getvalue())
AudioInfo(sample_rate=8000, channels=1, frames=8000, duration_s=1.0, format='wav/pcm_16')
>>> decode_audio(buf.getvalue(), offset_s=0.25, duration_s=0.5, sample_rate=8_000).shape
(4000,)
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

SAMPLE_RATE = 16_000
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 768_000

#: Bytes, a local path, or a binary file object (read from its start; one that cannot seek is read into memory).
AudioSource = bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes]

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_REDO = "re-export or re-download the file"
_CONVERT = "check that it is an audio or video file, or convert it with `ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`"
# FFmpeg: offsets below this are decoded from the start (sample-exact); above it we seek, which is
# exact to the container's timestamps (1 ms in Matroska). Seeks land a pre-roll early so decoders settle.
_SEEK_AFTER_S, _PREROLL_S = 30.0, 0.5
# Codec padding lets a container declare a little more than decodes; more than this is truncation.
_TRUNCATION_SLACK_S = 0.5
# FFmpeg containers whose header states the duration (others estimate it from the bit rate).
_HEADER_DURATION = ("mov", "matroska")


class AudioError(ValueError):
    """Audio that cannot be decoded; the message says what is wrong and what to do."""


@dataclass(frozen=True, slots=True)
class AudioInfo:
    sample_rate: int
    channels: int
    #: Frames at ``sample_rate``, as the header declares them.
    frames: int
    duration_s: float
    #: ``container/codec``, lower case: ``"wav/pcm_16"``, ``"ogg/opus"``, ``"mov/aac"``.
    format: str


def probe_audio(source: AudioSource) -> AudioInfo:
    """Describe audio from its header, without decoding it (unless the container keeps no duration).

    >>> probe_audio("talk.m4a")  # doctest: +SKIP
    AudioInfo(sample_rate=44100, channels=2, frames=88200, duration_s=2.0, format='mov/aac')
    """
    name, target = _resolve(source)
    with _open_soundfile(name, target) as f:
        if f is not None:
            fmt = f"{f.format}/{f.subtype}".lower()
            return AudioInfo(f.samplerate, f.channels, f.frames, f.frames / f.samplerate, fmt)
    with _open_av(name, target) as container:
        stream = _audio_stream(name, container)
        rate, declared = stream.codec_context.sample_rate, _declared_s(container, stream)
        frames = round(declared * rate) if declared else len(_read_av(name, container, 0.0, None)[0])
        fmt = f"{container.format.name.split(',')[0]}/{stream.codec_context.name}"
        return AudioInfo(rate, stream.codec_context.channels, frames, frames / rate, fmt)


def decode_audio(
    source: AudioSource, *, offset_s: float = 0.0, duration_s: float | None = None, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Decode ``source`` to a contiguous 1-D float32 array at ``sample_rate``, channels averaged.

    ``offset_s`` and ``duration_s`` select a segment without decoding what comes before it. An
    offset past the end raises; a duration that runs past the end returns what exists, so
    ``decode_audio(p, offset_s=60, duration_s=30)`` of a 70 s file gives 10 s. Offsets are
    sample-exact, except past 30 s into a file only FFmpeg reads: there it seeks, and lands as
    exactly as the container's timestamps allow (1 ms in MKV/WebM).

    >>> decode_audio("interview.mp4", offset_s=12.5, duration_s=4.0).shape  # doctest: +SKIP
    (64000,)
    """
    if not (math.isfinite(offset_s) and offset_s >= 0):
        raise ValueError(f"offset_s must be a finite number of seconds >= 0, got {offset_s!r}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a positive number of seconds or None, got {duration_s!r}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, got {sample_rate!r}")
    name, target = _resolve(source)
    with _open_soundfile(name, target) as f:
        decoded = None if f is None else _read_soundfile(name, f, offset_s, duration_s)
    if decoded is None:
        with _open_av(name, target) as container:
            decoded = _read_av(name, container, offset_s, duration_s)
    audio, rate = decoded
    if not np.isfinite(audio).all():
        raise AudioError(f"{name}: holds NaN or infinite samples, so it is corrupt; {_REDO}")
    if rate != sample_rate and audio.size:
        import soxr

        audio = soxr.resample(audio, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def _resolve(source: AudioSource) -> tuple[str, str | IO[bytes]]:
    """The source's name for messages, and what the backends open: a path or a seekable file."""
    if isinstance(source, bytes | bytearray | memoryview):
        if not len(source):
            raise AudioError("<bytes>: empty: no bytes were given; check the read or download that produced them")
        return "<bytes>", io.BytesIO(bytes(source))
    if isinstance(source, str | os.PathLike):
        path = os.fsdecode(os.fspath(source))
        if _URI.match(path):
            raise AudioError(
                f"{path}: decode_audio reads local paths and bytes only; "
                "read the bytes through cluster.storage first and pass them in"
            )
        if os.path.isdir(path):
            raise AudioError(f"{path}: is a directory, not an audio file; pass the files inside it")
        if not os.path.isfile(path):
            raise AudioError(f"{path}: the file does not exist; check the path (working directory: {os.getcwd()})")
        if os.path.getsize(path) == 0:
            raise AudioError(f"{path}: empty: the file has 0 bytes; {_REDO}")
        return path, path
    if not hasattr(source, "read"):
        raise TypeError(f"audio source must be bytes, a path or a binary file object, not {type(source).__name__}")
    name = getattr(source, "name", None)
    name = name if isinstance(name, str) else "<file>"
    if not (hasattr(source, "seekable") and source.seekable()):  # libsndfile and FFmpeg both seek
        source = io.BytesIO(source.read())
    if source.seek(0, io.SEEK_END) == 0:
        raise AudioError(f"{name}: empty: the file object holds 0 bytes; check the read or download behind it")
    return name, source


def _rewind(target: str | IO[bytes]) -> str | IO[bytes]:
    if not isinstance(target, str):
        target.seek(0)
    return target


def _check_header(name: str, rate: int, channels: int, frames: int | None) -> None:
    if channels < 1:
        raise AudioError(f"{name}: declares zero audio channels, so its header is damaged; {_REDO}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{name}: declares an absurd sample rate of {rate} Hz (expected "
            f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}), so its header is damaged; {_REDO}"
        )
    if frames == 0:
        raise AudioError(f"{name}: holds no audio (0 frames); {_REDO}, or leave it out of the input")


def _truncated(name: str, declared_s: float, holds_s: float) -> AudioError:
    return AudioError(
        f"{name}: truncated: the header declares {declared_s:.2f} s but the file holds {holds_s:.2f} s; {_REDO}"
    )


def _past_end(name: str, offset_s: float, end_s: float) -> AudioError:
    return AudioError(
        f"{name}: the offset {offset_s:.2f} s is past the end ({end_s:.2f} s); "
        "pass an offset inside the file (probe_audio gives its duration)"
    )


@contextlib.contextmanager
def _open_soundfile(name: str, target: str | IO[bytes]) -> Iterator[Any]:
    """Yields an open, checked ``soundfile.SoundFile``, or None when libsndfile does not know the format."""
    import soundfile as sf

    declared = _declared_wav_frames(_rewind(target))
    try:
        f = sf.SoundFile(_rewind(target))
    except sf.LibsndfileError as e:
        if e.code == 2:  # SF_ERR_SYSTEM
            raise AudioError(f"{name}: cannot be read ({e.error_string}); check that the file is readable") from None
        if e.code not in (1, 4):  # SF_ERR_UNRECOGNISED_FORMAT, SF_ERR_UNSUPPORTED_ENCODING go to FFmpeg
            raise AudioError(f"{name}: damaged or truncated: libsndfile says {e.error_string!r}; {_REDO}") from None
        f = None
    with f or contextlib.nullcontext():
        if f is not None:
            _check_header(name, f.samplerate, f.channels, f.frames)
            if declared is not None and declared > f.frames:
                raise _truncated(name, declared / f.samplerate, f.frames / f.samplerate)
        yield f


def _declared_wav_frames(target: str | IO[bytes]) -> int | None:
    """Frames an uncompressed RIFF/RF64 WAV header declares; libsndfile quietly trims it to what is there."""
    with open(target, "rb") if isinstance(target, str) else contextlib.nullcontext(target) as f:
        head = f.read(12)
        if head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            return None
        block_align = size64 = None
        while len(chunk := f.read(8)) == 8:
            kind, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if kind == b"data":
                size = size64 if size == 0xFFFFFFFF and size64 else size
                # Writers that stream (ffmpeg, espeak-ng --stdout) leave 0, 0x7FFFF000 or 0xFFFFFFFF.
                return size // block_align if block_align and 0 < size < 0x7FFFF000 else None
            body = f.read(size + (size & 1))
            # Only uncompressed codes (PCM, float, A-law, mu-law, extensible) hold one frame per block.
            if kind == b"fmt " and len(body) >= 14 and int.from_bytes(body[:2], "little") in (1, 3, 6, 7, 0xFFFE):
                block_align = int.from_bytes(body[12:14], "little")
            elif kind == b"ds64" and len(body) >= 16:
                size64 = int.from_bytes(body[8:16], "little")
        return None


def _read_soundfile(name: str, f: Any, offset_s: float, duration_s: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    rate, start = f.samplerate, round(offset_s * f.samplerate)
    if start >= f.frames:
        raise _past_end(name, offset_s, f.frames / rate)
    want = f.frames - start if duration_s is None else min(round(duration_s * rate), f.frames - start)
    # After a seek libsndfile's MP3 decoder has no bit reservoir and gives ~0.1 s of silence: decode a pre-roll.
    skip = min(start, round(_PREROLL_S * rate)) if f.format == "MP3" else 0
    try:
        f.seek(start - skip)
        data = f.read(want + skip, dtype="float32", always_2d=True)[skip:]
    except sf.LibsndfileError as e:
        raise AudioError(f"{name}: damaged or truncated: decoding failed ({e.error_string}); {_REDO}") from None
    if len(data) < want:  # compressed streams whose header counts more frames than decode (MP3, FLAC)
        raise _truncated(name, f.frames / rate, (start + len(data)) / rate)
    return (data[:, 0] if f.channels == 1 else data.mean(axis=1)), rate


def _open_av(name: str, target: str | IO[bytes]) -> Any:
    import av

    try:
        return av.open(_rewind(target), metadata_errors="replace")
    except av.FFmpegError as e:
        raise AudioError(
            f"{name}: not readable as audio (FFmpeg: {e.strerror}): not audio, or damaged or truncated; "
            f"{_CONVERT}, or re-download it"
        ) from None


def _audio_stream(name: str, container: Any) -> Any:
    if not container.streams.audio:
        found = ", ".join(f"{s.type} ({s.codec_context.name})" for s in container.streams if s.codec_context)
        raise AudioError(f"{name}: holds no audio stream (found: {found or 'nothing'}); pass a file with a sound track")
    stream = container.streams.audio[0]
    _check_header(name, stream.codec_context.sample_rate, stream.codec_context.channels, None)
    return stream


def _declared_s(container: Any, stream: Any) -> float | None:
    """The duration a trustworthy container header states, in seconds; None when it is a guess."""
    if not container.format.name.startswith(_HEADER_DURATION):
        return None
    if stream.duration:
        return float(stream.duration * stream.time_base)
    return container.duration / 1_000_000 if container.duration else None


def _read_av(name: str, container: Any, offset_s: float, duration_s: float | None) -> tuple[np.ndarray, int]:
    import av

    stream = _audio_stream(name, container)
    rate, declared = stream.codec_context.sample_rate, _declared_s(container, stream)
    start = round(offset_s * rate)
    stop = None if duration_s is None else start + round(duration_s * rate)
    if stream.duration and declared:  # mp4 states its length exactly: drop the encoder's end padding
        stop = round(declared * rate) if stop is None else min(stop, round(declared * rate))
    if declared and start >= round(declared * rate):
        raise _past_end(name, offset_s, declared)
    try:
        chunks, end = _decode_frames(name, container, stream, start, stop, seek=offset_s > _SEEK_AFTER_S)
        if chunks is None:
            container.seek(0)
            chunks, end = _decode_frames(name, container, stream, start, stop, seek=False)
    except av.FFmpegError as e:
        raise AudioError(f"{name}: damaged or truncated: FFmpeg failed to decode it ({e}); {_REDO}") from None
    if end is None or chunks is None:
        raise AudioError(f"{name}: holds no audio (the audio stream decodes to 0 frames); {_REDO}")
    if (stop is None or end < stop) and declared and end / rate < declared - _TRUNCATION_SLACK_S:
        raise _truncated(name, declared, end / rate)
    if start >= end:
        raise _past_end(name, offset_s, end / rate)
    return np.concatenate(chunks), rate


def _decode_frames(
    name: str, container: Any, stream: Any, start: int, stop: int | None, *, seek: bool
) -> tuple[list[np.ndarray] | None, int | None]:
    """Mono samples [start, stop) of the stream, and the frame where decoding ended (None: no frames).

    The first frame's timestamp places it; later frames are counted, which is sample-exact. After a
    seek that lands past ``start`` or finds nothing, returns (None, None): decode from the start.
    """
    rate = stream.codec_context.sample_rate
    origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if seek:
        container.seek(int((start / rate - _PREROLL_S + origin) / stream.time_base), stream=stream)
    chunks: list[np.ndarray] = []
    pos: int | None = None
    for frame in container.decode(stream):
        if pos is None:
            if seek and (frame.time is None or frame.time - origin > start / rate):
                return None, None
            pos = round((frame.time - origin) * rate) if frame.time is not None else 0
        if frame.sample_rate != rate:
            raise AudioError(f"{name}: changes sample rate mid-stream ({rate} -> {frame.sample_rate} Hz); {_CONVERT}")
        lo, pos = pos, pos + frame.samples
        if pos > start:
            mono = _frame_to_mono(frame)
            chunks.append(mono[max(start - lo, 0) : None if stop is None else max(stop - lo, 0)])
        if stop is not None and pos >= stop:
            return chunks, pos
    return (None, None) if seek and pos is None else (chunks, pos)


def _frame_to_mono(frame: Any) -> np.ndarray:
    samples = frame.to_ndarray()
    if not frame.format.is_planar:  # packed: one row of interleaved channels
        samples = samples.reshape(-1, frame.layout.nb_channels).T
    if samples.dtype.kind == "u":  # u8 is offset binary
        return (samples.astype(np.float32).mean(axis=0) - 128) / 128
    if samples.dtype.kind == "i":
        return samples.astype(np.float32).mean(axis=0) / -float(np.iinfo(samples.dtype).min)
    return samples.astype(np.float32, copy=False).mean(axis=0)
