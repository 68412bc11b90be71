"""The online API's pure parts: keys, languages, settings, the proxy's header filter, turn settings."""

from __future__ import annotations

import asyncio

import pytest

from asr.model import ModelInfo
from serve.auth import ApiKeys, KeyFileError, append_key, hash_key, read_key_file
from serve.proxy import StripClientTimeout
from serve.runtime import resolve_language
from serve.settings import ServeSettings
from serve.turns import RecentAudio, TurnConfig

INFO = ModelInfo(
    name="m",
    sha256="0" * 64,
    locales=("de-DE", "en-US", "es-ES", "fr-FR"),
    prompt_dictionary={"auto": 101, "de-DE": 1, "de": 1, "en-US": 2, "en": 2, "es-ES": 3, "fr-FR": 4},
    att_context_sizes=((56, 13), (56, 3)),
    default_att_context=(56, 13),
    frame_shift_s=0.08,
    sample_rate=16_000,
    uses_prompts=True,
)


def test_keys_are_stored_hashed_and_checked(tmp_path):
    path = tmp_path / "keys.txt"
    key = append_key(path, "ana")
    text = path.read_text()
    assert key not in text and hash_key(key) in text and "# ana" in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    keys = ApiKeys(read_key_file(path))
    assert keys.allows(key) and not keys.allows(key + "x") and not keys.allows(None)
    assert keys.key_of("Bearer " + key) == key
    assert keys.key_of(None, ["realtime", "openai-insecure-api-key." + key]) == key
    assert ApiKeys(()).allows(None), "no keys configured: loopback use needs none"


def test_a_bad_key_file_names_the_line_and_the_fix(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# team keys\nsha256:" + "a" * 64 + "\nem-plaintext-key\n")
    with pytest.raises(KeyFileError, match=r"keys.txt:3: expected 'sha256:<64 hex digits>'"):
        read_key_file(path)
    with pytest.raises(KeyFileError, match="cannot read the API key file.*earmark api-key"):
        read_key_file(tmp_path / "missing.txt")


def test_openai_languages_map_to_the_models_locales():
    assert resolve_language(INFO, None) == resolve_language(INFO, "") == resolve_language(INFO, "auto") == "auto"
    assert resolve_language(INFO, "de") == "de-DE"
    assert resolve_language(INFO, "es") == "es-ES"  # no alias in the model: matched by language
    assert resolve_language(INFO, "fr-FR") == "fr-FR"
    with pytest.raises(ValueError, match=r"language 'xx' .*ISO-639-1 \(de, en, es, fr\).*en-US"):
        resolve_language(INFO, "xx")


def test_settings_refuse_unknown_fields_and_bad_limits():
    from pydantic import ValidationError

    assert ServeSettings().max_sessions == 64
    with pytest.raises(ValidationError, match="max_sesions"):
        ServeSettings(max_sesions=3)
    with pytest.raises(ValidationError):
        ServeSettings(max_sessions=0)


def test_serve_run_arguments_get_their_types():
    from serve.app import _typed

    typed = _typed({"max_sessions": "8", "batching": "false", "api_key_hashes": "sha256:a,sha256:b"})
    settings = ServeSettings(**typed)
    assert settings.max_sessions == 8 and settings.batching is False
    assert settings.api_key_hashes == ("sha256:a", "sha256:b")


def test_the_proxy_filter_drops_a_clients_timeout_header():
    seen = {}

    async def app(scope, receive, send):
        seen["headers"] = scope["headers"]

    scope = {"type": "websocket", "headers": [(b"x-request-timeout-seconds", b"0"), (b"authorization", b"Bearer k")]}
    asyncio.run(StripClientTimeout(app)(scope, None, None))
    assert seen["headers"] == [(b"authorization", b"Bearer k")]


def test_turn_detection_settings_are_checked():
    assert TurnConfig.from_event({"type": "server_vad", "silence_duration_ms": 800}).silence_duration_ms == 800
    with pytest.raises(ValueError, match="semantic_vad"):
        TurnConfig.from_event({"type": "semantic_vad"})
    with pytest.raises(ValueError, match="threshold"):
        TurnConfig.from_event({"threshold": 2})


def test_recent_audio_keeps_the_prefix_before_a_turn():
    import numpy as np

    recent = RecentAudio(keep_ms=100)  # 1,600 samples
    for k in range(5):
        recent.push(np.full(1_000, k, np.float32), end=(k + 1) * 1_000)
    start, audio = recent.take_since(3_500)
    assert start == 3_500 and len(audio) == 1_500 and audio[0] == 3
    start, audio = recent.take_since(0)
    assert len(audio) == 0
