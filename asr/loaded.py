"""A loaded model and what every verb needs of it: the latency mode, the prompts, decoding set up
for earmark, and one lock.

The offline engine (:class:`asr.engine.Transcriber`) and streaming sessions
(:mod:`asr.streaming`) both run on a :class:`LoadedModel`; neither reaches into the other. The
encoder's latency mode is model-wide state, so whoever runs the model does it inside
:meth:`LoadedModel.running`, which holds the lock and sets the mode.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from asr.model import AUTO, ModelInfo, load_model

#: Token confidence: Tsallis entropy (alpha = 1/3) with exponential normalisation, the
#: entropy-based measure that separated correct from wrong RNN-T words best in NeMo's
#: confidence study (Laptev & Ginsburg, 2022); blanks are excluded, so a token's confidence is
#: that of the frame that emitted it.
CONFIDENCE_METHOD = {"name": "entropy", "entropy_type": "tsallis", "alpha": 0.33, "entropy_norm": "exp"}

_Self = TypeVar("_Self", bound="LoadedModel")


class LoadedModel:
    """One model on one device, decoding configured for earmark. Not thread-safe except through
    :meth:`running`: one per actor, worker or replica."""

    def __init__(self, model: Any, info: ModelInfo, *, device: str = "cpu") -> None:
        self.model = model
        self.info = info
        self.device = device
        self._lock = threading.Lock()
        self._configure_decoding()

    @classmethod
    def load(cls: type[_Self], spec: str | os.PathLike[str] = "demo", *, device: str | None = None) -> _Self:
        """Load ``demo``, a local ``.nemo`` path or a hub name; CUDA when available unless told."""
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, info = load_model(spec, device=device)
        return cls(model, info, device=device)

    @property
    def model_id(self) -> str:
        return self.info.model_id

    def _configure_decoding(self) -> None:
        from omegaconf import open_dict

        cfg = self.model.cfg.decoding
        with open_dict(cfg):
            cfg.strategy = "greedy_batch"
            cfg.compute_timestamps = False  # words are timed from token frames in asr.tokens
            cfg.strip_lang_tags = False  # tags are parsed in records.text; stripping misaligns confidences
            cfg.confidence_cfg = {
                "preserve_frame_confidence": True,
                "preserve_token_confidence": True,
                "preserve_word_confidence": False,
                "exclude_blank": True,
                "aggregation": "min",
                "method_cfg": dict(CONFIDENCE_METHOD),
            }
        self.model.change_decoding_strategy(cfg, verbose=False)

    # -- latency modes and prompts --------------------------------------------------------

    def resolve_att_context(self, att_context: Sequence[int] | None) -> tuple[int, int]:
        """``(left, right)`` checked against the model's modes; None -> the model's default."""
        if att_context is None:
            return self.info.default_att_context
        wanted = (int(att_context[0]), int(att_context[1]))
        if wanted not in self.info.att_context_sizes:
            modes = ", ".join(f"{a},{b}" for a, b in self.info.att_context_sizes)
            raise ValueError(
                f"att_context {wanted[0]},{wanted[1]} is not a mode of {self.info.name}; use one of {modes}"
            )
        return wanted

    @contextmanager
    def running(self, att_context: Sequence[int] | None) -> Iterator[tuple[int, int]]:
        """Hold the model in latency mode ``att_context`` (resolved; yielded) while the block runs."""
        resolved = self.resolve_att_context(att_context)
        with self._lock:
            if tuple(self.model.encoder.att_context_size) != resolved:
                self.model.encoder.set_default_att_context_size(list(resolved))
            yield resolved

    def prompt_indices(self, langs: Sequence[str]) -> list[int]:
        if not self.info.uses_prompts:
            bad = [lang for lang in langs if lang != AUTO]
            if bad:
                raise ValueError(f"{self.info.name} takes no language prompt; use lang 'auto' (got {bad[0]!r})")
            return [0] * len(langs)
        return [self.info.prompt_index(lang) for lang in langs]

    def requested_lang(self, lang: str) -> str:
        """The language a transcript reports as requested: ``de`` -> ``de-DE``; ``auto`` for models
        without prompts."""
        return self.info.canonical_lang(lang) if self.info.uses_prompts else AUTO
