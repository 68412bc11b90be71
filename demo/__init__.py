"""earmark's demo kit: the bundled demo model and sample corpus, espeak-ng speech synthesis,
from-scratch training of the demo model, and the accent sets of the demo loop.

Importing it is cheap; the engine finds the model through the ``earmark.checkpoints`` entry point
(``demo = "demo:MODEL"``) without importing this package itself.
"""

from __future__ import annotations

from pathlib import Path

from asr.model import BundledCheckpoint

DEMO_DIR = Path(__file__).parent
#: The bundled demo model (``--model demo``; see MODEL_CARD.md).
MODEL = BundledCheckpoint(name="earmark-demo", path=DEMO_DIR / "demo-model.nemo")
MODEL_PATH = MODEL.path
