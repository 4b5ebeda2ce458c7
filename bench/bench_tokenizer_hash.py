#!/usr/bin/env python
"""How long `encoding.tokenizer_hash` takes on the real 128,256-token vocabulary (280k merges).

    python bench/bench_tokenizer_hash.py          # -> bench/results/tokenizer_hash.json

Training compares this hash with the dataset's on every start, so it must stay well under a second.
Needs the real-tokenizer fixture (../shared/fixtures beside the repo); says so and exits 0 without it.
Best and median of `--repeats` runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.results_io import write_results as write_json  # paths relative to the repository

FIXTURE = ROOT.parent / "shared" / "fixtures" / "deepseek_r1_distill_llama_8b_tokenizer"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default=str(FIXTURE), help="tokenizer folder (default: the real-tokenizer fixture)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "tokenizer_hash.json"), help="results JSON")
    a = p.parse_args()
    if not Path(a.tokenizer).is_dir():
        print(f"tokenizer folder {a.tokenizer} absent: nothing measured")
        return 0
    from pmcvqa_sft.format import encoding
    from pmcvqa_sft.models.loading import load_tokenizer
    tok = load_tokenizer(a.tokenizer)
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        encoding.tokenizer_hash(tok)
        times.append(time.perf_counter() - t0)
    res = {"vocab_size": len(tok), "best_s": round(min(times), 4), "median_s": round(statistics.median(times), 4),
           "repeats": a.repeats, "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}
    write_json(a.out, res)
    print(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
