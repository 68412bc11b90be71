"""The bundled demo model meets its card, and its training parts are sound."""

from __future__ import annotations

import json

import pytest
import torch

from asr.losses import rnnt_loss
from demo import card
from tests.quality import needs_accurate_model


@pytest.fixture(scope="module")
def measured(engine):
    """Rebuild the held-out set from its seed and transcribe it in auto mode."""
    written = json.loads(card.CARD_JSON.read_text())
    return written, card.evaluate(engine, count=written["heldout"]["clips"])


@pytest.mark.slow
def test_the_card_states_what_the_bundled_model_does(engine, measured):
    written, got = measured
    assert written["sha256"] == engine.info.sha256, "the card belongs to another model file"
    assert got["wer"] == pytest.approx(written["heldout"]["wer"], abs=0.01)
    assert got["lang_acc"] == pytest.approx(written["heldout"]["lang_acc"], abs=0.01)
    assert written["meets_targets"] == (got["wer"] <= card.TARGET_WER and got["lang_acc"] >= card.TARGET_LANG_ACC)


@pytest.mark.slow
@needs_accurate_model
def test_the_demo_model_meets_its_targets(measured):
    _, got = measured
    assert got["wer"] <= card.TARGET_WER
    assert got["lang_acc"] >= card.TARGET_LANG_ACC


def test_the_vectorised_rnnt_loss_matches_nemos_loss():
    from nemo.collections.asr.losses.rnnt import RNNTLoss

    torch.manual_seed(0)
    batch, frames, labels, vocab = 3, 12, 5, 20
    logits = torch.randn(batch, frames, labels + 1, vocab, requires_grad=True)
    targets = torch.randint(0, vocab - 1, (batch, labels))
    frame_lens, label_lens = torch.tensor([12, 9, 7]), torch.tensor([5, 3, 0])
    ours = rnnt_loss(logits, targets, frame_lens, label_lens, blank=vocab - 1)
    nemo = RNNTLoss(num_classes=vocab - 1, reduction=None)(
        log_probs=logits.log_softmax(-1), targets=targets, input_lengths=frame_lens, target_lengths=label_lens
    )
    assert torch.allclose(ours, nemo, atol=1e-4)
    (g1,) = torch.autograd.grad(ours.sum(), logits)
    (g2,) = torch.autograd.grad(nemo.sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-4)
