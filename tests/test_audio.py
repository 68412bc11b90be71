"""asr.audio: every format earmark meets decodes to 16 kHz mono float32, and bad audio says so.

Each test builds its audio here: a 440 Hz + 1 kHz tone mix, written with libsndfile (soundfile)
or encoded with FFmpeg (PyAV), at the sample rates and channel counts archives hold.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from asr.audio import SAMPLE_RATE, AudioError, AudioInfo, decode_audio, probe_audio

LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def tone(rate: int, seconds: float = 1.0, channels: int = 1) -> np.ndarray:
    """(frames, channels) float32: 440 Hz at 0.5 plus 1 kHz at 0.25, the same in every channel."""
    t = np.arange(round(rate * seconds)) / rate
    mix = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.25 * np.sin(2 * np.pi * 1000 * t)
    return np.repeat(mix[:, None], channels, axis=1).astype(np.float32)


def level_at(audio: np.ndarray, hz: float, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(spectrum[round(hz * len(audio) / rate)])


def dominant_hz(audio: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.argmax(spectrum) * rate / len(audio))


def write_soundfile(audio: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def add_pictures(out: av.container.OutputContainer, *, seconds: float) -> None:
    """A tiny MPEG-4 video stream, ten changing grey pictures a second."""
    stream = out.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for i in range(round(10 * seconds)):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i % 255, np.uint8), format="rgb24")
        frame.pts = i
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def silent_video() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        add_pictures(out, seconds=0.5)
    return buf.getvalue()


def encode_av(
    audio: np.ndarray, rate: int, container: str, codec: str, *, video: bool = False, to: Path | None = None
) -> bytes:
    """Encode (frames, channels) audio with FFmpeg; ``to`` writes a file (faststart MP4 needs one)."""
    layout = LAYOUTS[audio.shape[1]]
    options = {"movflags": "faststart"} if to is not None else {}
    buf = io.BytesIO()
    with av.open(str(to) if to else buf, "w", format=container, options=options) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if video:  # every stream is added before the first packet is written
            add_pictures(out, seconds=len(audio) / rate)
        sample_format = stream.codec_context.codec.audio_formats[0]
        step = 960 if codec == "libopus" else 1024
        for i in range(0, len(audio), step):
            chunk = audio[i : i + step].T if sample_format.is_planar else audio[i : i + step].reshape(1, -1)
            if sample_format.name.startswith("s16"):
                chunk = np.round(chunk * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=sample_format.name, layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, i, Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return to.read_bytes() if to else buf.getvalue()


def wav_header(*, channels: int = 1, rate: int = 16_000, frames: int = 1_000) -> bytes:
    """A hand-written 16-bit PCM WAV, for headers no honest writer produces."""
    block = max(channels, 1) * 2
    data = bytes(block * frames)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, 16)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def jpeg() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as out:
        stream = out.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        out.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


@dataclass(frozen=True)
class Format:
    """One way archives store audio: how to write it, at which rate, with how many channels."""

    write: Callable[[np.ndarray, int], bytes]
    rate: int
    channels: int
    lossless: bool
    #: How far the decoded length may stray from the written length.
    slack_s: float = 0.005

    def make(self, seconds: float = 1.0, audio: np.ndarray | None = None) -> bytes:
        return self.write(tone(self.rate, seconds, self.channels) if audio is None else audio, self.rate)


FORMATS = {
    "wav-int16-8k-mono": Format(lambda a, r: write_soundfile(a, r, "WAV", "PCM_16"), 8_000, 1, True, 0.001),
    "wav-float32-44k-stereo": Format(lambda a, r: write_soundfile(a, r, "WAV", "FLOAT"), 44_100, 2, True, 0.001),
    "flac-48k-6ch": Format(lambda a, r: write_soundfile(a, r, "FLAC", "PCM_24"), 48_000, 6, True, 0.001),
    "ogg-vorbis-22k-stereo": Format(lambda a, r: write_soundfile(a, r, "OGG", "VORBIS"), 22_050, 2, False),
    "ogg-opus-48k-mono": Format(lambda a, r: write_soundfile(a, r, "OGG", "OPUS"), 48_000, 1, False),
    "mp3-44k-stereo": Format(lambda a, r: write_soundfile(a, r, "MP3", "MPEG_LAYER_III"), 44_100, 2, False),
    "m4a-aac-44k-stereo": Format(lambda a, r: encode_av(a, r, "ipod", "aac"), 44_100, 2, False),
    "mp4-aac-48k-6ch-with-video": Format(lambda a, r: encode_av(a, r, "mp4", "aac", video=True), 48_000, 6, False),
    "mkv-flac-22k-stereo": Format(lambda a, r: encode_av(a, r, "matroska", "flac"), 22_050, 2, True, 0.001),
    # Matroska keeps no edit list, so FFmpeg cannot drop AAC's padding: up to two 1024-sample frames.
    "mkv-aac-8k-mono": Format(lambda a, r: encode_av(a, r, "matroska", "aac"), 8_000, 1, False, 2 * 1024 / 8_000),
    "webm-opus-48k-stereo": Format(lambda a, r: encode_av(a, r, "webm", "libopus"), 48_000, 2, False),
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_decodes_to_16khz_mono_float32_that_sounds_like_the_original(name: str) -> None:
    fmt = FORMATS[name]
    audio = decode_audio(fmt.make(seconds=1.0))

    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.flags.c_contiguous
    assert abs(len(audio) - SAMPLE_RATE) <= fmt.slack_s * SAMPLE_RATE
    assert abs(dominant_hz(audio) - 440) <= 2
    assert 0.4 < level_at(audio, 1000) / level_at(audio, 440) < 0.6
    if fmt.lossless:
        assert np.corrcoef(audio[:SAMPLE_RATE], tone(SAMPLE_RATE)[: len(audio), 0])[0, 1] > 0.99


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_speech_streamed_to_stdout_decodes_although_its_header_gives_no_length() -> None:
    wav = subprocess.run(["espeak-ng", "--stdout", "hello world"], capture_output=True, check=True).stdout
    reference, rate = sf.read(io.BytesIO(wav), dtype="float32")

    audio = decode_audio(wav)

    assert rate == 22_050 and abs(len(audio) - len(reference) * SAMPLE_RATE / rate) <= 2
    assert 0.5 < np.abs(audio).max() / np.abs(reference).max() < 1.5


@pytest.mark.parametrize("name", ["wav-float32-44k-stereo", "mkv-flac-22k-stereo"])
def test_stereo_downmix_averages_the_channels(name: str) -> None:
    fmt = FORMATS[name]
    mono = tone(fmt.rate)[:, 0]

    left_only = decode_audio(fmt.make(audio=np.stack([mono, np.zeros_like(mono)], axis=1)), sample_rate=fmt.rate)
    opposite = decode_audio(fmt.make(audio=np.stack([mono, -mono], axis=1)), sample_rate=fmt.rate)

    assert np.allclose(left_only, mono / 2, atol=1e-4)
    assert np.abs(opposite).max() < 1e-4


@pytest.mark.parametrize("name", ["wav-int16-8k-mono", "m4a-aac-44k-stereo"])
def test_bytes_path_and_file_objects_decode_identically(name: str, tmp_path: Path) -> None:
    data = FORMATS[name].make()
    path = tmp_path / "clip.bin"
    path.write_bytes(data)

    class Pipe:  # a stream that can only be read, like a pipe or an HTTP body
        def __init__(self) -> None:
            self.inner = io.BytesIO(data)

        def read(self, size: int = -1) -> bytes:
            return self.inner.read(size)

    from_bytes = decode_audio(data)
    with path.open("rb") as f:
        from_file = decode_audio(f)
    for other in (
        decode_audio(path),
        decode_audio(str(path)),
        from_file,
        decode_audio(io.BytesIO(data)),
        decode_audio(bytearray(data)),
        decode_audio(Pipe()),
    ):  # type: ignore[arg-type]
        assert np.array_equal(other, from_bytes)


@pytest.mark.parametrize("name", FORMATS)
def test_offset_and_duration_read_exactly_that_segment(name: str) -> None:
    fmt, rate = FORMATS[name], FORMATS[name].rate
    data = fmt.make(seconds=3.0)
    full = decode_audio(data, sample_rate=rate)
    start, length = round(1.37 * rate), round(0.8 * rate)

    segment = decode_audio(data, offset_s=1.37, duration_s=0.8, sample_rate=rate)
    at_16k = decode_audio(data, offset_s=1.37, duration_s=0.8)

    if fmt.lossless:
        assert np.array_equal(segment, full[start : start + length])
    else:  # the same decoder output, give or take float rounding (MP3 decodes a pre-roll after its seek)
        np.testing.assert_allclose(segment, full[start : start + length], rtol=0, atol=1e-6)
    assert len(at_16k) == round(0.8 * SAMPLE_RATE)


@pytest.mark.parametrize(
    "container, codec, rate", [("matroska", "flac", 8_000), ("ipod", "aac", 8_000), ("webm", "libopus", 48_000)]
)
def test_a_late_offset_seeks_in_ffmpeg_containers_and_lands_within_a_millisecond(
    container: str, codec: str, rate: int
) -> None:
    signal = np.random.default_rng(0).uniform(-0.5, 0.5, (40 * rate, 1)).astype(np.float32)
    data = encode_av(signal, rate, container, codec)
    full = decode_audio(data, sample_rate=rate)
    start, stop = round(35.25 * rate), round(37.25 * rate)

    segment = decode_audio(data, offset_s=35.25, duration_s=2.0, sample_rate=rate)

    # Exact where timestamps count samples; Opus in WebM is placed by millisecond timestamps.
    errors = {
        shift: np.abs(segment[rate // 100 :] - full[start + shift : stop + shift][rate // 100 :]).max()
        for shift in range(-rate // 1000, rate // 1000 + 1)
    }
    shift = min(errors, key=errors.__getitem__)
    assert len(segment) == stop - start and errors[shift] < 1e-3
    assert shift == 0 or codec == "libopus"


@pytest.mark.parametrize("name", ["wav-int16-8k-mono", "webm-opus-48k-stereo"])
def test_a_duration_past_the_end_returns_what_exists_and_an_offset_past_it_raises(name: str) -> None:
    data = FORMATS[name].make(seconds=1.0)

    tail = decode_audio(data, offset_s=0.75, duration_s=10.0)

    assert abs(len(tail) - 0.25 * SAMPLE_RATE) <= 0.005 * SAMPLE_RATE
    with pytest.raises(AudioError, match="past the end") as error:
        decode_audio(data, offset_s=1.5)
    assert "probe_audio" in str(error.value)


def test_probe_reads_the_header_of_libsndfile_and_ffmpeg_formats() -> None:
    wav = write_soundfile(tone(22_050, seconds=2.0, channels=2), 22_050, "WAV", "PCM_16")
    m4a = encode_av(tone(44_100, seconds=2.0, channels=6), 44_100, "ipod", "aac")
    webm = encode_av(tone(48_000, seconds=2.0, channels=2), 48_000, "webm", "libopus")

    assert probe_audio(wav) == AudioInfo(22_050, 2, 44_100, 2.0, "wav/pcm_16")
    assert probe_audio(m4a) == AudioInfo(44_100, 6, 88_200, 2.0, "mov/aac")
    info = probe_audio(webm)
    assert (info.sample_rate, info.channels, info.format) == (48_000, 2, "matroska/opus")
    assert abs(info.duration_s - 2.0) < 0.05


def test_importing_the_module_loads_no_decoder() -> None:
    code = "import sys, asr.audio; print(sorted({'soundfile', 'av', 'soxr'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
    ).stdout
    assert out.strip() == "[]"


def test_bad_arguments_are_the_callers_bug_not_bad_audio() -> None:
    wav = write_soundfile(tone(8_000), 8_000, "WAV", "PCM_16")
    for kwargs in ({"offset_s": -1.0}, {"duration_s": 0.0}, {"offset_s": float("nan")}, {"sample_rate": 10}):
        with pytest.raises(ValueError) as error:
            decode_audio(wav, **kwargs)
        assert not isinstance(error.value, AudioError)
    with pytest.raises(TypeError):
        decode_audio(12345)  # type: ignore[arg-type]


def cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def nan_wav() -> bytes:
    audio = tone(8_000)
    audio[100], audio[200] = np.nan, np.inf
    return write_soundfile(audio, 8_000, "WAV", "FLOAT")


BAD_AUDIO = [  # (bad bytes, words that name the problem, words that say what to do)
    pytest.param(lambda: b"", "empty", "download", id="empty bytes"),
    pytest.param(
        lambda: cut(FORMATS["wav-int16-8k-mono"].make(seconds=2.0)),
        "truncated: the header declares 2.00 s but the file holds 1.00 s",
        "re-export",
        id="truncated WAV",
    ),
    pytest.param(
        lambda: cut(write_soundfile(tone(16_000, 2.0), 16_000, "WAV", "FLOAT")),
        "truncated: the header declares 2.00 s",
        "re-download",
        id="truncated float WAV",
    ),
    pytest.param(
        lambda: cut(write_soundfile(tone(16_000, 2.0), 16_000, "FLAC", "PCM_16")),
        "damaged or truncated",
        "re-download",
        id="truncated FLAC",
    ),
    pytest.param(
        lambda: cut(write_soundfile(tone(16_000, 2.0), 16_000, "MP3", "MPEG_LAYER_III")),
        "truncated: the header declares 2.00 s",
        "re-download",
        id="truncated MP3",
    ),
    pytest.param(
        lambda: cut(write_soundfile(tone(16_000, 2.0), 16_000, "OGG", "VORBIS")),
        "damaged or truncated",
        "re-download",
        id="truncated OGG Vorbis",
    ),
    pytest.param(
        lambda: cut(write_soundfile(tone(16_000, 2.0), 16_000, "OGG", "OPUS")),
        "damaged or truncated",
        "re-download",
        id="truncated OGG Opus",
    ),
    pytest.param(
        lambda: cut(encode_av(tone(16_000, 2.0), 16_000, "ipod", "aac")),
        "damaged or truncated",
        "re-download",
        id="M4A cut before its index",
    ),
    pytest.param(
        lambda: cut(encode_av(tone(48_000, 2.0), 48_000, "webm", "libopus")),
        "truncated: the header declares 2.01 s",
        "re-download",
        id="truncated WebM",
    ),
    pytest.param(lambda: np.random.default_rng(0).bytes(5_000), "not readable as audio", "convert it", id="random"),
    pytest.param(
        lambda: b"Dear team, the recordings are attached.\n" * 20, "not readable as audio", "convert it", id="text"
    ),
    pytest.param(
        lambda: b"WEBVTT\n\n00:01.000 --> 00:04.000\nhello world\n" * 20,
        "no audio stream (found: subtitle (webvtt))",
        "sound track",
        id="subtitles",
    ),
    pytest.param(jpeg, "no audio stream (found: video (mjpeg))", "sound track", id="JPEG"),
    pytest.param(silent_video, "no audio stream (found: video (mpeg4))", "sound track", id="video without sound"),
    pytest.param(nan_wav, "NaN or infinite", "re-export", id="NaN and inf samples"),
    pytest.param(lambda: wav_header(channels=0), "Channel count is zero", "re-export", id="zero channels"),
    pytest.param(
        lambda: write_soundfile(np.zeros((0, 1), np.float32), 16_000, "WAV", "PCM_16"),
        "no audio (0 frames)",
        "leave it out",
        id="zero frames",
    ),
    pytest.param(lambda: wav_header(rate=100), "absurd sample rate of 100 Hz", "re-export", id="100 Hz"),
    pytest.param(lambda: wav_header(rate=2_000_000), "absurd sample rate of 2000000 Hz", "re-export", id="2 MHz"),
]


@pytest.mark.parametrize("make, problem, fix", BAD_AUDIO)
def test_bad_audio_raises_audio_error_naming_the_problem_and_the_fix(
    make: Callable[[], bytes], problem: str, fix: str
) -> None:
    with pytest.raises(AudioError) as error:
        decode_audio(make())

    message = str(error.value)
    assert message.startswith("<bytes>: ") and problem in message and fix in message


def test_a_faststart_m4a_cut_in_its_audio_is_reported_as_damaged_or_truncated(tmp_path: Path) -> None:
    data = encode_av(tone(16_000, 4.0), 16_000, "ipod", "aac", to=tmp_path / "talk.m4a")
    (tmp_path / "cut.m4a").write_bytes(cut(data))

    with pytest.raises(AudioError, match=r"cut.m4a: damaged or truncated"):
        decode_audio(tmp_path / "cut.m4a")


def test_bad_paths_raise_audio_error_saying_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "cut.wav").write_bytes(cut(write_soundfile(tone(8_000, 2.0), 8_000, "WAV", "PCM_16")))
    cases = {
        tmp_path / "missing.wav": "does not exist; check the path",
        tmp_path: "is a directory",
        tmp_path / "empty.wav": "empty: the file has 0 bytes; re-export",
        tmp_path / "cut.wav": "cut.wav: truncated",
        "s3://bucket/clip.wav": "read the bytes through cluster.storage",
    }
    for source, words in cases.items():
        for read in (decode_audio, probe_audio):
            with pytest.raises(AudioError) as error:
                read(source)
            assert words in str(error.value)


def test_bad_audio_in_a_file_object_is_named_after_the_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not audio at all\n" * 10)

    with (tmp_path / "notes.txt").open("rb") as f, pytest.raises(AudioError, match="notes.txt: not readable as audio"):
        decode_audio(f)
    with pytest.raises(AudioError, match="<file>: empty"):
        decode_audio(io.BufferedReader(io.BytesIO(b"")))  # type: ignore[arg-type]
