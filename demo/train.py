"""Train the bundled demo model from scratch on espeak-ng speech (CPU is enough).

    python -m demo.train --work /tmp/earmark-demo --minutes 120

Stages, each skipped when its output already exists in ``--work``:

1. synthesize ``--train`` utterances (one to three sentences, four locales, code-switching in
   some, random espeak-ng voice variant, speed and pitch) into one int16 file plus an index;
2. train a 256-piece BPE tokenizer in which each ``<xx-XX>`` language tag is one piece;
3. train with the RNN-T loss plus an auxiliary CTC loss on the encoder output (weight 0.5; the
   CTC head is thrown away before saving). RNN-T alone stays collapsed for a long time when a
   small model starts from scratch; CTC gives the encoder an alignment signal early.

Prompts follow the real model's contract: ``auto`` (index 101) -> the tags say which language
was heard, sentence by sentence; a forced locale -> every tag is that locale, even when the
audio is in another language (10 % of the clips are trained that way, so a forced prompt is
obeyed). Every ``--eval-every`` steps the held-out set is decoded in ``auto`` mode and the best
model so far is saved to ``<work>/best.nemo`` with its metrics in ``<work>/best.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from asr.losses import rnnt_loss
from demo import architecture, speech
from records.text import split_tagged, word_errors

log = logging.getLogger("demo.train")

TRAIN_SEED = 1234
#: The held-out set's seed; tests and the model card rebuild the same clips from it.
HELDOUT_SEED = 98765
AUTO = architecture.PROMPT_DICTIONARY["auto"]


@dataclass(frozen=True, slots=True)
class Item:
    offset: int
    length: int
    texts: tuple[str, ...]
    locales: tuple[str, ...]

    def target(self, forced: str | None) -> str:
        return " ".join(f"{t} <{forced or loc}>" for t, loc in zip(self.texts, self.locales, strict=True))


def utterances(seed: int, count: int) -> list[speech.Utterance]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        max_sentences = 1 if rng.random() < 0.7 else rng.choice([2, 3])
        out.append(
            speech.random_utterance(rng, rng.choice(speech.DEMO_LOCALES), max_sentences=max_sentences, switch_prob=0.6)
        )
    return out


def heldout_utterances(count: int = 400) -> list[speech.Utterance]:
    """The held-out set: the same clips on every machine with the same espeak-ng."""
    return utterances(HELDOUT_SEED, count)


def _render(utt: speech.Utterance) -> np.ndarray:
    return (np.clip(speech.render(utt), -1, 1) * 32767).astype(np.int16)


def synthesize_set(utts: list[speech.Utterance], path: Path, processes: int = 2) -> list[Item]:
    items, offset = [], 0
    with open(path.with_suffix(".int16"), "wb") as f, Pool(processes) as pool:
        for utt, audio in zip(utts, pool.imap(_render, utts, chunksize=32), strict=True):
            f.write(audio.tobytes())
            items.append(
                Item(
                    offset,
                    len(audio),
                    tuple(s.text for s in utt.sentences),
                    tuple(s.voice.locale for s in utt.sentences),
                )
            )
            offset += len(audio)
    path.with_suffix(".jsonl").write_text("".join(json.dumps(_item_row(it)) + "\n" for it in items))
    return items


def _item_row(it: Item) -> dict:
    return {"offset": it.offset, "length": it.length, "texts": list(it.texts), "locales": list(it.locales)}


def load_set(path: Path) -> tuple[np.ndarray, list[Item]]:
    rows = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
    items = [Item(r["offset"], r["length"], tuple(r["texts"]), tuple(r["locales"])) for r in rows]
    return np.memmap(path.with_suffix(".int16"), dtype=np.int16, mode="r"), items


def batches(items: list[Item], rng: random.Random, max_seconds: float) -> list[list[int]]:
    """Shuffle, then group clips of similar length so padding stays small."""
    order = list(range(len(items)))
    rng.shuffle(order)
    out = []
    for start in range(0, len(order), 512):
        window = sorted(order[start : start + 512], key=lambda i: items[i].length)
        cur: list[int] = []
        for i in window:
            longest = max([items[j].length for j in cur] + [items[i].length])
            if cur and longest * (len(cur) + 1) > max_seconds * speech.SAMPLE_RATE:
                out.append(cur)
                cur = []
            cur.append(i)
        if cur:
            out.append(cur)
    rng.shuffle(out)
    return out


def collate(audio: np.ndarray, items: list[Item], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([items[i].length for i in idx])
    x = torch.zeros(len(idx), int(lengths.max()))
    for row, i in enumerate(idx):
        it = items[i]
        x[row, : it.length] = torch.from_numpy(audio[it.offset : it.offset + it.length].astype(np.float32) / 32767)
    return x, lengths


def choose_prompt(rng: random.Random, item: Item) -> str | None:
    """None means auto; otherwise the forced locale."""
    r = rng.random()
    if r < 0.45:
        return None
    if r < 0.9:
        return item.locales[0]
    return rng.choice([loc for loc in speech.DEMO_LOCALES if loc != item.locales[0]])


def evaluate(model, audio: np.ndarray, items: list[Item], batch: int = 32, device: str = "cpu") -> dict:
    """WER (tags removed, normalised) and sentence-language accuracy in auto mode."""
    model.eval()
    errors = words = tags_ok = tags = 0
    with torch.inference_mode():
        for start in range(0, len(items), batch):
            idx = list(range(start, min(start + batch, len(items))))
            x, xl = collate(audio, items, idx)
            enc, enc_len = model.forward(
                input_signal=x.to(device),
                input_signal_length=xl.to(device),
                prompt_indices=torch.full((len(idx),), AUTO, device=device),
            )
            hyps = model.decoding.rnnt_decoder_predictions_tensor(
                encoder_output=enc, encoded_lengths=enc_len, return_hypotheses=True
            )
            for i, hyp in zip(idx, hyps, strict=True):
                ref = items[i]
                sentences = split_tagged(hyp.text)
                e, n = word_errors(" ".join(ref.texts), " ".join(s.text for s in sentences))
                errors, words = errors + e, words + n
                got = [s.lang for s in sentences]
                tags += len(ref.locales)
                tags_ok += sum(1 for k, loc in enumerate(ref.locales) if k < len(got) and got[k] == loc)
    model.train()
    return {"wer": errors / max(words, 1), "lang_acc": tags_ok / max(tags, 1), "clips": len(items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--train", type=int, default=14000)
    parser.add_argument("--heldout", type=int, default=400)
    parser.add_argument("--minutes", type=float, default=120)
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--batch-seconds", type=float, default=48)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, default=2, help="processes synthesizing speech")
    parser.add_argument(
        "--init-from", type=Path, default=None, help="continue from a .nemo (its tokenizer and features)"
    )
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--vocab",
        type=int,
        default=256,
        help="BPE pieces: 256 pieces shared across words let a small model learn (1024, one per word, plateaued)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)

    if not (work / "train.jsonl").exists():
        t0 = time.time()
        synthesize_set(utterances(TRAIN_SEED, args.train), work / "train", args.processes)
        synthesize_set(heldout_utterances(args.heldout), work / "heldout", args.processes)
        log.info("synthesized %d + %d clips in %.0f s", args.train, args.heldout, time.time() - t0)
    train_audio, train_items = load_set(work / "train")
    test_audio, test_items = load_set(work / "heldout")

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.model").exists():
        architecture.build_tokenizer(
            [it.target(None) for it in train_items], tok_dir, list(speech.DEMO_LOCALES), args.vocab
        )
    model = architecture.build_model(tok_dir, d_model=args.d_model, n_layers=args.layers)
    model.train()
    architecture.center_features(
        model,
        [
            collate(train_audio, train_items, [i])[0][0].numpy()
            for i in range(0, len(train_items), max(1, len(train_items) // 300))
        ],
    )
    model = model.to(args.device)
    vocab = model.tokenizer.vocab_size
    ctc_head = torch.nn.Linear(model.cfg.model_defaults.enc_hidden, vocab + 1).to(args.device)
    params = list(model.parameters()) + list(ctc_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-3)
    warmup = max(1, args.max_steps // 15)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        # cosine decay over whichever runs out first: steps or the time budget
        by_time = (time.time() - t_start) / (args.minutes * 60)
        progress = min(1.0, max((step - warmup) / max(1, args.max_steps - warmup), by_time))
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = random.Random(0)
    step, best, t_start = 0, None, time.time()
    model.train()
    done = False
    while not done:
        for idx in batches(train_items, rng, args.batch_seconds):
            prompts = [choose_prompt(rng, train_items[i]) for i in idx]
            texts = [train_items[i].target(p) for i, p in zip(idx, prompts, strict=True)]
            tokens = [model.tokenizer.text_to_ids(t) for t in texts]
            y = torch.zeros(len(idx), max(map(len, tokens)), dtype=torch.long)
            for row, ids in enumerate(tokens):
                y[row, : len(ids)] = torch.tensor(ids)
            yl = torch.tensor([len(t) for t in tokens])
            x, xl = collate(train_audio, train_items, idx)
            p = torch.tensor([AUTO if pr is None else architecture.PROMPT_DICTIONARY[pr] for pr in prompts])
            x, xl, y, yl, p = (t.to(args.device) for t in (x, xl, y, yl, p))

            enc, enc_len = model.forward(input_signal=x, input_signal_length=xl, prompt_indices=p)
            dec, _, _ = model.decoder(targets=y, target_length=yl)
            model.joint.log_softmax = False  # rnnt_loss normalises; on CPU NeMo would do it twice
            joint = model.joint(encoder_outputs=enc, decoder_outputs=dec)
            model.joint.log_softmax = None
            loss_rnnt = rnnt_loss(joint, y, enc_len, yl, blank=vocab)
            ctc_lp = ctc_head(enc.transpose(1, 2)).log_softmax(-1).transpose(0, 1)
            loss_ctc = F.ctc_loss(ctc_lp, y, enc_len, yl, blank=vocab, reduction="none", zero_infinity=True)
            loss = (loss_rnnt + 0.5 * loss_ctc).mean()
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % 25 == 0:
                log.info(
                    "step %d loss %.2f (rnnt %.2f ctc %.2f) lr %.2e %.2f s/step",
                    step,
                    loss.item(),
                    loss_rnnt.mean().item(),
                    loss_ctc.mean().item(),
                    lr_at(step),
                    (time.time() - t_start) / step,
                )
            out_of_time = time.time() - t_start > args.minutes * 60
            if step % args.eval_every == 0 or step >= args.max_steps or out_of_time:
                metrics = evaluate(model, test_audio, test_items, device=args.device)
                metrics.update(step=step, minutes=round((time.time() - t_start) / 60, 1))
                log.info("eval %s", metrics)
                with open(work / "evals.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if best is None or metrics["wer"] + (1 - metrics["lang_acc"]) < best["wer"] + (1 - best["lang_acc"]):
                    best = metrics
                    model.to("cpu").save_to(str(work / "best.nemo"))
                    model.to(args.device)
                    (work / "best.json").write_text(json.dumps(best, indent=2))
            if step >= args.max_steps or out_of_time:
                done = True
                break
    log.info("done: best %s", best)


if __name__ == "__main__":
    main()
