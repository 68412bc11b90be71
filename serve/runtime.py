"""What one replica holds: the model, the one thread that runs it, the keys, the open sessions.

A :class:`Runtime` is plain Python (no Ray): the Serve deployment (:mod:`serve.app`) makes one
per replica, and so can a test or a script that runs the FastAPI app (:func:`serve.api.make_app`)
under any ASGI server.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import TYPE_CHECKING

from serve.auth import ApiKeys, read_key_file
from serve.settings import ServeSettings

if TYPE_CHECKING:
    from asr.engine import Transcriber
    from asr.model import ModelInfo
    from asr.scheduler import StreamScheduler

log = logging.getLogger(__name__)


def expand_model(spec: str) -> str:
    """The model setting with ``$VAR``/``${VAR}`` expanded from this process's environment.

    >>> os.environ["EARMARK_DOCTEST_MODEL"] = "s3://models/a.nemo"
    >>> expand_model("${EARMARK_DOCTEST_MODEL}")
    's3://models/a.nemo'
    >>> expand_model("$EARMARK_NOT_SET_HERE")
    Traceback (most recent call last):
    ...
    ValueError: model $EARMARK_NOT_SET_HERE: EARMARK_NOT_SET_HERE is not set in the replica's environment (set it on every node, e.g. from a ConfigMap)
    """
    expanded = os.path.expandvars(spec)
    missing = re.findall(r"\$\{?(\w+)", expanded)
    if missing or not expanded:
        names = ", ".join(missing) or spec
        raise ValueError(
            f"model {spec}: {names} is not set in the replica's environment (set it on every node, e.g. from a ConfigMap)"
        )
    return expanded


class Runtime:
    def __init__(self, settings: ServeSettings, engine: Transcriber | None = None) -> None:
        from asr.engine import Transcriber
        from asr.scheduler import StreamScheduler
        from cluster.storage import is_remote, localize

        self.settings = settings
        self.started_at = time.time()
        if engine is None:
            model = expand_model(settings.model)
            spec = localize(model) if is_remote(model) else model
            engine = Transcriber.load(spec, device=settings.device)
        self.engine = engine
        self.scheduler: StreamScheduler = StreamScheduler(
            engine, batched=settings.batching, slots=settings.max_sessions
        )
        self.scheduler.start()
        hashes = settings.api_key_hashes
        if settings.api_keys_file:
            hashes += read_key_file(settings.api_keys_file)
        self.keys = ApiKeys(hashes)
        #: realtime sessions open on this replica (changed on the event loop only)
        self.sessions = 0
        log.info("serving %s on %s", engine.info.model_id, engine.device)

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    def close(self) -> None:
        self.scheduler.close()

    def resolve_language(self, value: str | None) -> str:
        """OpenAI's ``language`` (ISO-639-1 such as ``de``, or absent) or a locale (``de-DE``) ->
        the model's locale, or ``auto``. Unknown: ValueError naming what the model has."""
        return resolve_language(self.info, value)

    def resolve_att_context(self, value: object) -> tuple[int, int]:
        """``[56, 3]``, ``"56,3"`` or None -> a latency mode of the model (ValueError otherwise)."""
        if value is None or value == "":
            return self.info.default_att_context
        if isinstance(value, str):
            parts = value.replace(" ", "").strip("[]()").split(",")
        elif isinstance(value, list | tuple):
            parts = list(value)
        else:
            raise ValueError(f"att_context {value!r}: write it as [LEFT, RIGHT] or 'LEFT,RIGHT', e.g. [56, 3]")
        try:
            left, right = (int(p) for p in parts)
        except (TypeError, ValueError):
            raise ValueError(
                f"att_context {value!r}: write it as [LEFT, RIGHT] or 'LEFT,RIGHT', e.g. [56, 3]"
            ) from None
        return self.engine.resolve_att_context((left, right))


def resolve_language(info: ModelInfo, value: str | None) -> str:
    from asr.model import AUTO

    if value is None or not value.strip() or value.strip().lower() == AUTO:
        return AUTO
    value = value.strip()
    if not info.uses_prompts:
        raise ValueError(f"{info.name} detects the language itself and takes none; leave 'language' out")
    try:
        return info.canonical_lang(value)
    except ValueError:
        pass
    short = value.lower().split("-")[0].split("_")[0]
    matches = [loc for loc in info.locales if loc.lower().split("-")[0] == short]
    if len(value) <= 3 and matches:
        return matches[0]
    raise ValueError(
        f"language {value!r} is not one of {info.name}'s: use ISO-639-1 ({', '.join(sorted({m.split('-')[0] for m in info.locales}))}), "
        f"a locale ({', '.join(info.locales)}) or leave it out for automatic detection"
    )
