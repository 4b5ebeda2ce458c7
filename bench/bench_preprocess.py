#!/usr/bin/env python
"""Preprocessing throughput: ours (read CSV -> validate -> encode -> save_to_disk) vs a seed-style baseline.

    python bench/bench_preprocess.py                  # 177,000 rows, writes bench/results/preprocess.json
    python bench/bench_preprocess.py --rows 20000     # quicker

Data: a generated v1-format CSV (questions of 10-25 words, 4 choices with unevenly spaced `A:` prefixes)
the size of PMC-VQA's train.csv, in a temp folder. Tokenizer: the 128,256-token fixture
(../shared/fixtures/deepseek_r1_distill_llama_8b_tokenizer); skipped with a message when absent.
Baseline, in the same process (seed-style): per row `apply_chat_template` on the whole conversation,
tokenize with padding to 2048, labels = a copy, `Dataset.from_list(...).save_to_disk` - end to end like
ours, timed on a 3,000-row subset before and after ours (the machine may be shared) and extrapolated.
Its tokenizing part alone is reported too (`tokenize_only_rows_per_s`).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURE = ROOT.parent / "shared" / "fixtures" / "deepseek_r1_distill_llama_8b_tokenizer"

WORDS = ("image shows lesion patient figure arrow tissue section stained marked region left right upper lower "
         "lobe liver kidney brain heart lung bone cell nucleus cytoplasm membrane contrast enhanced "
         "axial coronal sagittal scan imaging modality used finding most likely diagnosis abnormal "
         "normal mass nodule vessel artery vein wall thickening fluid collection the of in a an with "
         "which what is was by this that").split()
TERMS = ("Magnetic resonance imaging", "Computed tomography", "Ultrasound", "Positron emission tomography",
         "Hematoxylin and eosin", "Prussian blue", "Glioblastoma", "Meningioma", "Hepatocellular carcinoma",
         "Pulmonary embolism", "Pneumothorax", "Cardiomegaly", "Osteosarcoma", "Lipoma", "Red", "Blue",
         "Left lower lobe", "Right upper lobe", "Aorta", "Portal vein", "None of the above", "NA")


def parse_args():
    p = argparse.ArgumentParser(description="Preprocessing benchmark (ours vs seed-style baseline).")
    # ---- data ----
    p.add_argument("--rows", type=int, default=177_000, help="rows of the generated v1 CSV")
    p.add_argument("--baseline_rows", type=int, default=3_000, help="rows the baseline is timed on")
    # ---- output ----
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "preprocess.json"), help="results JSON")
    p.add_argument("--tokenizer", default=str(FIXTURE), help="tokenizer folder (default: the fixture)")
    return p.parse_args()


def write_csv(path: Path, n: int, seed: int = 0) -> None:
    import csv
    rng = random.Random(seed)
    pads = ("", " ", "  ")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
                    "Answer_label"])
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 25))).capitalize() + "?"
            texts = rng.sample(TERMS, 4)
            gold = rng.randrange(4)
            cells = [f"{rng.choice(pads)}{L}:{rng.choice(pads)}{t}{rng.choice(pads)}" for L, t in zip("ABCD", texts)]
            w.writerow([f"PMC{1000000 + i}_F{rng.randint(1, 9)}.jpg", q, texts[gold], *cells, "ABCD"[gold]])


def baseline(tok, csv_path: Path, n: int, work: Path, max_length: int = 2048):
    """Seed-style, end to end on the first `n` rows: pandas -> per row create_conversation ->
    apply_chat_template(whole conversation) -> tokenizer(padding='max_length') -> labels = a copy of
    input_ids -> Dataset.from_list -> save_to_disk. Timed as a whole and for the tokenizing part alone."""
    import shutil

    import pandas as pd
    from datasets import Dataset

    from pmcvqa_sft.prompts import create_conversation
    t0 = time.perf_counter()
    df = pd.read_csv(csv_path, nrows=n, dtype=str, keep_default_na=False)
    t1 = time.perf_counter()
    rows = []
    for _, r in df.iterrows():
        choices = {L: r[f"Choice {L}"].strip()[2:].strip() for L in "ABCD"}
        msgs = create_conversation(r["Question"], choices, r["Answer_label"])
        text = tok.apply_chat_template(msgs, tokenize=False)
        enc = tok(text, padding="max_length", max_length=max_length, truncation=True)
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                     "labels": list(enc["input_ids"])})
    t2 = time.perf_counter()
    out = work / f"baseline_{n}_{time.monotonic_ns()}"
    Dataset.from_list(rows).save_to_disk(str(out))
    t3 = time.perf_counter()
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out)
    return {"rows_timed": n, "seconds": round(t3 - t0, 3), "rows_per_s": round(n / (t3 - t0), 1),
            "tokenize_seconds": round(t2 - t1, 3), "tokenize_rows_per_s": round(n / (t2 - t1), 1),
            "bytes_per_row_on_disk": disk / n}


def main() -> int:
    args = parse_args()
    if not Path(args.tokenizer).is_dir():
        print(f"SKIP: tokenizer fixture absent ({args.tokenizer}); the benchmark needs the 128,256-token "
              f"DeepSeek tokenizer")
        return 0
    import datasets
    import tokenizers
    import transformers

    from pmcvqa_sft.models.loading import load_tokenizer
    from pmcvqa_sft.preprocess.run import run_preprocess
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        csv_path = tmp / "train.csv"
        t = time.perf_counter()
        write_csv(csv_path, args.rows)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t:.1f} s ({csv_path.stat().st_size / 1e6:.1f} MB)")
        t = time.perf_counter()
        tok = load_tokenizer(args.tokenizer)
        load_s = time.perf_counter() - t
        n_base = min(args.baseline_rows, args.rows)
        before = baseline(tok, csv_path, n_base, tmp)
        print(f"baseline (before): {n_base:,} rows in {before['seconds']} s -> {before['rows_per_s']} rows/s")
        t = time.perf_counter()
        # Ours end to end (read -> validate -> encode -> save), with the tokenizer already loaded, as the
        # baseline has it; its load time is reported beside.
        report = run_preprocess(data=str(csv_path), tokenizer_name=args.tokenizer, output_dir=str(tmp / "out"),
                                tokenizer=tok)
        wall = time.perf_counter() - t
        # The machine is shared: time the baseline again after ours and use both runs.
        after = baseline(tok, csv_path, n_base, tmp)
        print(f"baseline (after):  {n_base:,} rows in {after['seconds']} s -> {after['rows_per_s']} rows/s")
        secs = before["seconds"] + after["seconds"]
        tok_secs = before["tokenize_seconds"] + after["tokenize_seconds"]
        base = {"rows_timed": 2 * n_base, "seconds": round(secs, 3), "rows_per_s": round(2 * n_base / secs, 1),
                "runs_rows_per_s": [before["rows_per_s"], after["rows_per_s"]],
                "tokenize_only_rows_per_s": round(2 * n_base / tok_secs, 1),
                "bytes_per_row_on_disk": round(before["bytes_per_row_on_disk"], 1)}
    ours_rps = args.rows / wall
    base_bytes = int(base["bytes_per_row_on_disk"] * args.rows)  # measured on the subset, extrapolated
    result = {
        "rows": args.rows,
        "ours": {"seconds": round(wall, 2), "rows_per_s": round(ours_rps, 1), "kept": report["kept"],
                 "tokenizer_load_s": round(load_s, 2),
                 "rows_per_s_incl_tokenizer_load": round(args.rows / (wall + load_s), 1),
                 "stage_s": report["stage_s"], "prefix_cache": report["prefix_cache"],
                 "tokens": report["tokens"], "disk_bytes": report["disk_bytes"],
                 "disk_ratio_vs_token_bytes": report["disk_ratio"],
                 "token_lengths": report["token_lengths"]},
        "baseline": {**base, "extrapolated_seconds": round(args.rows / base["rows_per_s"], 1),
                     "disk_bytes_estimate": base_bytes,
                     "disk_ratio_vs_token_bytes": round(base_bytes / (report["tokens"] * 4), 1)},
        "speedup": round(ours_rps / base["rows_per_s"], 2),
        "speedup_vs_baseline_tokenize_only": round(ours_rps / base["tokenize_only_rows_per_s"], 2),
        "goals": {"rows_per_s>=6000": ours_rps >= 6000, "speedup>=8": ours_rps / base["rows_per_s"] >= 8,
                  "disk_ratio<=3": report["disk_ratio"] <= 3},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "versions": {"datasets": datasets.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    from bench.results_io import write_results
    out = write_results(args.out, result)  # paths relative to the repository
    print()
    print(f"{'':12}{'rows/s':>10}{'time (s)':>12}{'disk (MB)':>12}{'disk / token bytes':>20}")
    print(f"{'baseline':12}{base['rows_per_s']:>10,.0f}{result['baseline']['extrapolated_seconds']:>12}"
          f"{base_bytes / 1e6:>12,.0f}{result['baseline']['disk_ratio_vs_token_bytes']:>20}")
    print(f"{'ours':12}{ours_rps:>10,.0f}{wall:>12.1f}{report['disk_bytes'] / 1e6:>12,.1f}{report['disk_ratio']:>20}")
    print(f"baseline tokenizing alone (no read, no save): {base['tokenize_only_rows_per_s']:,.0f} rows/s "
          f"-> ours is {result['speedup_vs_baseline_tokenize_only']}x that")
    print(f"speedup {result['speedup']}x; goals: {result['goals']}; load avg {result['machine']['load_avg_1m']}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
