"""What earmark's allocator settings (``cluster.runtime.ALLOCATOR_ENV``) do to CPU compute.

    .venv/bin/python benchmarks/allocator.py [--repeats 3] [--steps 6]

Each repeat runs, in fresh processes, once with glibc's defaults and once with earmark's
settings: (1) training steps of the demo model (forward, earmark's CPU RNN-T loss, backward, AdamW) on
batches of eight 5-second clips, one thread, as a fine-tuning worker on a 2-core machine runs;
(2) the engine transcribing the bundled corpus's short clips. It prints wall time, time spent
in the kernel and minor page faults per run, the medians and the ratio (default / earmark).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_steps(steps: int) -> None:
    import torch

    from asr.model import load_model
    from asr.train_settings import TrainSettings
    from asr.training import prepare_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = load_model("demo", device="cpu")
    prepare_model(model, TrainSettings(), on_gpu=False)  # train mode, earmark's CPU RNN-T loss
    batch, samples, tokens = 8, 16000 * 5, 20
    audio = torch.randn(batch, samples) * 0.1
    audio_len = torch.full((batch,), samples)
    targets = torch.randint(0, model.tokenizer.vocab_size, (batch, tokens))
    target_len = torch.full((batch,), tokens)
    prompts = torch.zeros(batch, dtype=torch.long)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        encoded, encoded_len = model.forward(input_signal=audio, input_signal_length=audio_len, prompt_indices=prompts)
        decoded, _, _ = model.decoder(targets=targets, target_length=target_len)
        joint = model.joint(encoder_outputs=encoded, decoder_outputs=decoded)
        loss = model.loss(log_probs=joint, targets=targets, input_lengths=encoded_len, target_lengths=target_len).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up, not timed
    measure(lambda: [step() for _ in range(steps)])


def transcribe_corpus(_: int) -> None:
    from asr.audio import decode_audio
    from asr.engine import Transcriber
    from demo.corpus import load_manifest

    engine = Transcriber.load("demo", device="cpu")
    audios = [decode_audio(r.audio_filepath) for r in load_manifest() if "sentences" not in r.extra]
    engine.transcribe(audios[:8])  # warm-up, not timed
    measure(lambda: engine.transcribe(audios))


def measure(work) -> None:  # noqa: ANN001
    import resource
    import time

    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    work()
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    result = {"wall": wall, "sys": after.ru_stime - before.ru_stime, "faults": after.ru_minflt - before.ru_minflt}
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--run", choices=["train", "transcribe"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        (train_steps if args.run == "train" else transcribe_corpus)(args.steps)
        return

    from cluster.runtime import ALLOCATOR_ENV

    plain = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV} | {"EARMARK_MALLOC": "system"}
    settings = {"glibc default": plain, "earmark": plain | ALLOCATOR_ENV}
    for work in ("train", "transcribe"):
        results: dict[str, list[dict]] = {name: [] for name in settings}
        for k in range(args.repeats):
            for name, env in settings.items():  # interleaved: drift on a noisy machine hits both
                cmd = [sys.executable, __file__, "--run", work, "--steps", str(args.steps)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
                results[name].append(json.loads(line[7:]))
                r = results[name][-1]
                print(f"{work:10s} repeat {k + 1} {name:14s} {r['wall']:6.2f} s wall, {r['sys']:5.2f} s kernel, "
                      f"{r['faults']:>9,} page faults", flush=True)  # fmt: skip
        med = {
            name: {m: statistics.median(r[m] for r in rs) for m in ("wall", "sys", "faults")}
            for name, rs in results.items()
        }
        d, e = med["glibc default"], med["earmark"]
        what = f"{args.steps} training steps" if work == "train" else "the corpus's short clips"
        print(f"\n{work}: {what}, median of {args.repeats}")
        for name, m in med.items():
            print(f"  {name:14s} {m['wall']:6.2f} s wall  {m['sys']:5.2f} s kernel  {m['faults']:>11,.0f} page faults")
        print(f"  speed-up with earmark's settings: {d['wall'] / e['wall']:.2f}x\n", flush=True)


if __name__ == "__main__":
    main()
