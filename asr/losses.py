"""A vectorised RNN-T loss for CPU training of the demo model.

NeMo's default RNN-T loss (numba) takes ~5 s per batch of 16 three-second clips on two CPU
cores, ten times the rest of the step; its "pytorch" loss loops over every (t, u) in Python.
This one walks the lattice one anti-diagonal at a time (T + U steps of tensor ops over the whole
batch) and lets autograd do the backward pass. It matches NeMo's loss to float precision (see
tests/test_demo_training.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A finite "minus infinity": logaddexp(-inf, -inf) has a NaN gradient, this has none.
_NEG = -1.0e30


def rnnt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
) -> torch.Tensor:
    """Per-utterance negative log-likelihood, shape [B].

    Args:
        logits: joint output before softmax, [B, T, U + 1, V].
        targets: label ids, [B, U] (padded).
        logit_lengths: valid frames per utterance, [B].
        target_lengths: valid labels per utterance, [B].
        blank: id of the blank symbol.
    """
    log_probs = logits.float().log_softmax(dim=-1)
    batch, frames, u1, _ = log_probs.shape
    blank_lp = log_probs[..., blank]  # [B, T, U+1]
    idx = targets.long().clamp(min=0)[:, None, :, None].expand(batch, frames, u1 - 1, 1)
    emit_lp = log_probs[:, :, :-1, :].gather(-1, idx).squeeze(-1)  # [B, T, U]
    emit_lp = F.pad(emit_lp, (0, 1), value=_NEG)  # [B, T, U+1], emit at u=U impossible

    t_idx = torch.arange(frames, device=logits.device)
    neg_inf = torch.tensor(_NEG, device=logits.device)
    diagonals = []
    # alpha on diagonal d, indexed by t (u = d - t).
    alpha = torch.where(t_idx == 0, torch.zeros((), device=logits.device), neg_inf).expand(batch, frames)
    diagonals.append(alpha)
    for d in range(1, frames + u1 - 1):
        u = d - t_idx  # [T]
        # from (t-1, u) by blank
        u_b = u.clamp(0, u1 - 1)
        prev_t = torch.cat([neg_inf.expand(batch, 1), alpha[:, :-1]], dim=1)
        blank_prev = torch.cat([neg_inf.expand(batch, 1), blank_lp[:, t_idx[:-1], u_b[1:]]], dim=1)
        from_blank = prev_t + blank_prev
        # from (t, u-1) by emitting label u-1
        u_e = (u - 1).clamp(0, u1 - 1)
        from_emit = alpha + emit_lp[:, t_idx, u_e]
        from_emit = torch.where((u - 1 >= 0)[None, :], from_emit, neg_inf)
        alpha = torch.logaddexp(from_blank, from_emit)
        alpha = torch.where(((u >= 0) & (u < u1))[None, :], alpha, neg_inf)
        diagonals.append(alpha)

    stacked = torch.stack(diagonals, dim=0)  # [D, B, T]
    last_t = logit_lengths.long() - 1
    last_u = target_lengths.long()
    b_idx = torch.arange(batch, device=logits.device)
    final_alpha = stacked[last_t + last_u, b_idx, last_t]
    final_blank = blank_lp[b_idx, last_t, last_u]
    return -(final_alpha + final_blank)
