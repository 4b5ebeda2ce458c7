#!/usr/bin/env python
"""Tiny-model training speed with 1 vs 2 torch threads, on a quiet machine and beside busy processes.

    python bench/bench_threads.py                 # -> bench/results/threads.json (about 2-4 min on 2 cores)
    python bench/bench_threads.py --steps 10 --threads 1,2 --busy 0,2

Why: `pmcvqa_sft/threads.py` picks 1 thread for the tiny model and on small CPU machines; this measures
that choice. Each case runs in its own process: the embedded tiny model, 8-bit base + LoRA (r 16, all
linear projections) as in `make demo`, batch 16 of bundled-sample rows, AdamW; steps/s over `--steps`
steps after 2 warm-up steps. "busy" cases start N `python -c "while 1: pass"` processes beside it (killed
after). A case is cut after `--max_s` seconds (its steps/s then covers the steps it finished).
The numbers depend on whatever else the machine runs: the machine and its load average are recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.results_io import write_results as write_json  # paths relative to the repository

WORKER = r"""
import json, sys, time, torch
threads, steps, max_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(threads)
from peft import get_peft_model
from pmcvqa_sft import prompts
from pmcvqa_sft.data.pmc_vqa import read_pmc_vqa_csv
from pmcvqa_sft.format.encoding import encode_conversation
from pmcvqa_sft.models.loading import load_model, load_tokenizer
from pmcvqa_sft.models.lora import lora_config
tok = load_tokenizer("tiny")
recs = read_pmc_vqa_csv("data/sample/train.csv")[0][:64]
rows = [encode_conversation(tok, prompts.create_conversation(r.question, r.choices, r.answer_label)) for r in recs]
model = get_peft_model(load_model("tiny", "8bit", device_map={"": "cpu"}), lora_config("tiny"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
def step(i):
    batch = [rows[(i * 16 + k) % len(rows)] for k in range(16)]
    w = max(len(a) for a, _ in batch)
    ids = torch.tensor([a + [tok.eos_token_id] * (w - len(a)) for a, _ in batch])
    lab = torch.tensor([b + [-100] * (w - len(b)) for _, b in batch])
    att = torch.tensor([[1] * len(a) + [0] * (w - len(a)) for a, _ in batch])
    model(input_ids=ids, attention_mask=att, labels=lab).loss.backward()
    opt.step(); opt.zero_grad()
for i in range(2):
    step(i)
t0, done = time.perf_counter(), 0
while done < steps and time.perf_counter() - t0 < max_s:
    step(done + 2); done += 1
secs = time.perf_counter() - t0
print(json.dumps({"threads": torch.get_num_threads(), "steps": done, "seconds": round(secs, 2),
                  "steps_per_s": round(done / secs, 3)}))
"""


def run_case(threads: int, busy: int, steps: int, max_s: float) -> dict:
    hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(busy)]
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=str(threads), PMCVQA_THREADS=str(threads))  # explicit: wins over threads.py's rule
        load0 = os.getloadavg()[0]
        res = subprocess.run([sys.executable, "-c", WORKER, str(threads), str(steps), str(max_s)], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=max_s + 600)
        if res.returncode:
            raise SystemExit(f"case threads={threads} busy={busy} failed: {res.stderr[-2000:]}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return {"busy_processes": busy, "load_avg_1min_before": round(load0, 2), **out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="comma list of torch thread counts to compare")
    p.add_argument("--busy", default="0,2", help="comma list of busy-process counts to run beside")
    p.add_argument("--steps", type=int, default=25, help="timed training steps per case")
    p.add_argument("--max_s", type=float, default=60.0, help="cut a case after this many seconds")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "threads.json"), help="results JSON")
    a = p.parse_args()
    from pmcvqa_sft.models.tiny import ensure_tiny
    ensure_tiny()
    cases = []
    for busy in [int(b) for b in a.busy.split(",")]:
        for threads in [int(t) for t in a.threads.split(",")]:
            c = run_case(threads, busy, a.steps, a.max_s)
            print(json.dumps(c), flush=True)
            cases.append(c)
    write_json(a.out, {"what": "tiny model, 8-bit base + LoRA, batch 16, training steps per second",
                       "cases": cases, "cpus": os.cpu_count(), "platform": platform.platform(),
                       "note": "machine shared with other jobs while measured; see load_avg_1min_before",
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
