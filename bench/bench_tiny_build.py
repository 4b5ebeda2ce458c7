#!/usr/bin/env python
"""tiny-reasoning's pretraining step: one padded batch through `model(labels=...)` vs `tiny._split_loss`.

    OMP_NUM_THREADS=1 python bench/bench_tiny_build.py          # -> bench/results/tiny_build.json (~1 min)
    python bench/bench_tiny_build.py --steps 40 --batch_size 16

Both compute the same loss (mean cross-entropy over every trained token; tests/test_tiny_reasoning.py checks
value and gradients). The split one sends fact sentences and drill rows through the model as two batches
(no sentence padded to a drill's width) and applies the head only at trained positions. Each step here is
forward + backward + AdamW on the same random batches of the build's mix (half drills), the two methods
interleaved step by step in one process, so a busy machine slows both alike; the ratio is the point.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.results_io import write_results  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps per method")
    p.add_argument("--batch_size", type=int, default=16, help="rows per step (the build uses 16)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "tiny_build.json"), help="results JSON")
    a = p.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pmcvqa_sft.core.threads import configure_threads
    from pmcvqa_sft.data import samples
    from pmcvqa_sft.models import tiny

    configure_threads(tiny.TINY_ALIAS)
    tok = tiny.build_reasoning_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                                         **tiny.MODEL_KW))
    rng = random.Random(0)
    drills = tiny._drills(tok)(rng)
    rows = tiny.sentence_rows(tok, samples.pretraining_sentences())
    share = tiny.REASONING_PRETRAIN["drill_share"]
    batches = [[rng.choice(drills) if rng.random() < share else rng.choice(rows) for _ in range(a.batch_size)]
               for _ in range(a.steps + 2)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def whole(batch):
        ids, attn, labels = tiny._pad(batch, tok.eos_token_id)
        return model(input_ids=ids, attention_mask=attn, labels=labels).loss

    def split(batch):
        return tiny._split_loss(model, batch, tok.eos_token_id)

    times = {"whole_batch": [], "split": []}
    for i, batch in enumerate(batches):
        for name, fn in (("whole_batch", whole), ("split", split)):
            t = time.perf_counter()
            fn(batch).backward()
            opt.step()
            opt.zero_grad()
            if i >= 2:  # 2 warm-up steps
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = {"whole_batch": statistics.mean(a.batch_size * max(len(r) for r, _ in b) for b in batches),
              "split": statistics.mean(sum(len(part) * max(len(r) for r, _ in part) for part in tiny.split_parts(b))
                                       for b in batches)}
    res = {"what": "tiny-reasoning pretraining step (forward + backward + AdamW), median seconds",
           "batch_size": a.batch_size, "steps": a.steps, "threads": torch.get_num_threads(),
           "median_step_s": {k: round(v, 4) for k, v in med.items()},
           "mean_positions_through_the_model": {k: round(v, 1) for k, v in tokens.items()},
           "speedup": round(med["whole_batch"] / med["split"], 2),
           "load_avg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), "platform": platform.platform(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(res)
    write_results(a.out, res)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
