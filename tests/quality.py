"""Marks the tests that need a demo model good enough to transcribe the corpus.

The bundled model's card (``demo/demo-model.json``) says whether it meets its targets. While it
does not, these tests are expected to fail, and strictly: once a model that meets the targets is
installed with its card, they must pass, and a model whose card overstates it fails them.
"""

from __future__ import annotations

import json

import pytest

from demo.card import CARD_JSON


def demo_model_meets_targets() -> bool:
    try:
        return bool(json.loads(CARD_JSON.read_text())["meets_targets"])
    except (OSError, KeyError, ValueError):
        return False


needs_accurate_model = pytest.mark.xfail(
    not demo_model_meets_targets(),
    reason="the bundled demo model does not meet its card's targets yet (demo/demo-model.json)",
    strict=True,
)
