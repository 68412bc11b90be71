"""Loading checkpoints: the bundled model, local paths, s3:// through the storage layer."""

from __future__ import annotations

import pytest

from asr.engine import Transcriber
from asr.model import ModelLoadError, resolve_checkpoint
from cluster.storage import localize, upload_file
from demo import MODEL_PATH as DEMO_MODEL_PATH

pytestmark = pytest.mark.slow


def test_names_resolve_to_files_or_hub_names(tmp_path):
    assert resolve_checkpoint("demo") == DEMO_MODEL_PATH
    assert resolve_checkpoint(str(DEMO_MODEL_PATH)) == DEMO_MODEL_PATH
    assert resolve_checkpoint("nvidia/nemotron-asr-3.5") == "nvidia/nemotron-asr-3.5"
    with pytest.raises(ModelLoadError, match="no such model file"):
        resolve_checkpoint(tmp_path / "missing.nemo")
    with pytest.raises(ModelLoadError, match="localize"):
        resolve_checkpoint("s3://bucket/model.nemo")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="expected a .nemo"):
        resolve_checkpoint(tmp_path / "notes.txt")


def test_a_corrupt_checkpoint_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.nemo"
    bad.write_bytes(b"not a tar archive")
    with pytest.raises(ModelLoadError, match="could not load the checkpoint"):
        Transcriber.load(bad, device="cpu")


def test_a_model_on_s3_loads_once_into_the_cache_and_transcribes_like_the_local_one(
    engine, s3_server, s3_bucket, short_clips, tmp_path
):
    uri = f"s3://{s3_bucket}/models/demo/1/model.nemo"
    upload_file(DEMO_MODEL_PATH, uri, s3_server.options())
    local = localize(uri, s3_server.options(), cache_dir=tmp_path / "cache")
    again = localize(uri, s3_server.options(), cache_dir=tmp_path / "cache")
    assert local == again and local.stat().st_size == DEMO_MODEL_PATH.stat().st_size

    remote_engine = Transcriber.load(local, device="cpu")
    assert remote_engine.info.sha256 == engine.info.sha256
    audios = [a for _, a in short_clips[:4]]
    assert [t.text_raw for t in remote_engine.transcribe(audios)] == [t.text_raw for t in engine.transcribe(audios)]
