"""Shared fixtures: the bundled demo model, the sample corpus, a real S3 server (tests.s3server)."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.s3server", "tests.pgserver", "tests.serveserver"]

os.environ.setdefault("NEMO_LOGGING_LEVEL", "ERROR")


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin has set up its base folder
def pytest_configure(config: pytest.Config) -> None:
    """Every temporary file of the session, this process's and its children's (Ray's session
    folders, Ray Train's Lightning checkpoints, SeaweedFS's sockets and logs, torch's caches),
    goes under pytest's own base folder: after the suite, /tmp holds nothing the tests made.
    The name is short: Ray's unix sockets live below it (at most 107 bytes a path)."""
    import tempfile

    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None or hasattr(config, "workerinput"):
        return
    folder = factory.getbasetemp() / "t"
    folder.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # tempfile caches the folder it chose: choose again


@pytest.fixture(scope="session")
def engine():
    """The bundled demo model, loaded once for the whole session."""
    from asr.engine import Transcriber

    return Transcriber.load("demo", device="cpu")


@pytest.fixture(scope="session")
def corpus() -> list[dict]:
    """The sample corpus manifest (short clips and long recordings), paths made absolute."""
    from demo.corpus import load_manifest

    return [entry.to_dict() for entry in load_manifest()]


@pytest.fixture(scope="session")
def short_clips(corpus) -> list[tuple[dict, object]]:
    """(manifest row, decoded 16 kHz audio) for every short clip of the corpus."""
    from asr.audio import decode_audio

    return [(row, decode_audio(row["audio_filepath"])) for row in corpus if "sentences" not in row]
