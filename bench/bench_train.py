#!/usr/bin/env python
"""Training throughput: our Trainer setup vs TRL's `SFTTrainer` (the popular recipe), same process.

    pip install -r bench/requirements-bench.txt      # trl (bench-only)
    OMP_NUM_THREADS=1 python bench/bench_train.py --threads 1   # both data sets -> bench/results/train.json
    python bench/bench_train.py --steps 10 --rounds 1 --datasets pmcvqa_like   # quicker

Two data sets, each run for both trainers:
- `pmcvqa_like` (the headline): rows generated here (seeded) with PMC-VQA's spread of lengths: questions
  of 5-60 words, choices of 1-20 words, and for 40 % of the rows a v2-style caption of 5-300 words (word
  counts lognormal, so a long right tail), written as a v2 CSV with words from the bundled sample's
  vocabulary and preprocessed by our `run_preprocess` (`include_caption=True`) with the model's tokenizer.
- `sample`: the bundled sample (narrow lengths), kept for comparison.
Each run trains on exactly steps x effective-batch rows, so both trainers see every row once: the same
rows, the same real tokens, only the batching differs.

Both train the embedded tiny model (`--model tiny`, 8-bit base by default) with the same LoRA (r 16,
alpha 32, dropout 0.05, all linear projections), learning rate, cosine schedule, seed, effective batch
(8 x 2 accumulation), number of optimizer steps and gradient checkpointing (on: both projects' default),
on the same tokens (TRL gets the identical input_ids with `completion_mask` = the trained positions, so
both compute the same loss on the same targets).
TRL is configured as it is typically used, with its defaults: `SFTConfig` (padding_free False, packing
False, random sampling: no length grouping, its own collator, entropy/accuracy metrics), `peft_config`
passed to `SFTTrainer`, which prepares the quantized base itself; the exact arguments are in the JSON.
Measured per trainer: real (non-pad) tokens per second of `train()` and the share of computed tokens that
are real (both counted from the attention mask of every training batch). The trainers alternate for
`--rounds` rounds (the machine may be shared); the headline speedup is the median of the per-round
ratios, the per-trainer numbers are each one's best round.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.results_io import write_results as write_json  # paths relative to the repository
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args():
    p = argparse.ArgumentParser(description="Training throughput: ours vs TRL SFTTrainer.")
    # ---- data / model ----
    p.add_argument("--model", default="tiny", help="base model (default: the embedded tiny model)")
    p.add_argument("--quantization", default="8bit", help="8bit, 4bit or none (same for both)")
    p.add_argument("--datasets", default="pmcvqa_like,sample",
                   help="comma list of data sets to run: pmcvqa_like (generated, PMC-VQA length spread), "
                        "sample (the bundled sample)")
    p.add_argument("--data_seed", type=int, default=20261127, help="seed of the generated pmcvqa_like rows")
    # ---- run ----
    p.add_argument("--steps", type=int, default=30,
                   help="optimizer steps per trainer per round (rows used: steps x batch x accum)")
    p.add_argument("--batch", type=int, default=8, help="per-device batch size")
    p.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (median paired ratio reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    # ---- output ----
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"), help="results JSON")
    return p.parse_args()


def count_tokens(collate, counter):
    """Wrap a collator so every batch's real and computed tokens are counted (training only)."""
    def wrapped(features):
        batch = collate(features)
        mask = batch["attention_mask"]
        counter["real"] += int(mask.sum())
        counter["computed"] += mask.numel()
        return batch
    return wrapped


# ---- data ----

def _word_pool() -> list[str]:
    """Distinct words of the bundled sample (the tiny tokenizer was trained on them: sensible splits)."""
    import re

    from pmcvqa_sft.data import samples as sample_data
    words = {w for t in sample_data.all_text() for w in re.findall(r"[A-Za-z][A-Za-z'-]*", t)}
    return sorted(words)


def _lognormal_words(rng, median, sigma, lo, hi) -> int:
    return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))


def pmcvqa_like_rows(n: int, seed: int) -> list[list[str]]:
    """`n` v2 CSV rows with PMC-VQA's spread of lengths (word counts; the letters are random)."""
    import random
    rng = random.Random(seed)
    pool = _word_pool()

    def text(k, end=""):
        return " ".join(rng.choice(pool) for _ in range(k)).capitalize() + end

    rows = []
    for i in range(n):
        question = text(_lognormal_words(rng, 12, 0.55, 5, 60), "?")
        choices = [f"{L}:{text(_lognormal_words(rng, 3, 0.8, 1, 20))}" for L in "ABCD"]
        # 60 % without a caption (v1-style rows), 40 % with a long-tailed v2 caption
        caption = text(_lognormal_words(rng, 45, 0.9, 5, 300), ".") if rng.random() < 0.4 else ""
        rows.append([str(i), f"PMC{1000000 + i}_F1.jpg", caption, question, *choices, rng.choice("ABCD"), "train"])
    return rows


def make_dataset(name: str, a, work: Path, rows: int) -> tuple[Path, dict, str]:
    """(folder, preprocess report, description): `rows` train rows preprocessed with the model's tokenizer."""
    import csv

    from pmcvqa_sft.data.pmc_vqa import V2_COLUMNS
    from pmcvqa_sft.models.loading import resolve_name
    from pmcvqa_sft.preprocess.run import run_preprocess
    out = work / f"data_{name}"
    if name == "sample":
        report = run_preprocess(data=str(ROOT / "data" / "sample"), tokenizer_name=resolve_name(a.model),
                                output_dir=str(out), max_samples=rows, val_size=0, progress=False)
        return out, report, "data/sample train.csv (first rows), preprocessed with the model's tokenizer"
    if name != "pmcvqa_like":
        raise SystemExit(f"error: unknown data set '{name}' (pmcvqa_like, sample)")
    src = work / f"src_{name}"
    src.mkdir()
    with open(src / "train_2.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(V2_COLUMNS)
        w.writerows(pmcvqa_like_rows(rows, a.data_seed))
    report = run_preprocess(data=str(src), tokenizer_name=resolve_name(a.model), output_dir=str(out),
                            val_size=0, include_caption=True, progress=False)
    return out, report, (f"generated v2 rows (seed {a.data_seed}): question 5-60 words (lognormal, median 12), "
                         "choices 1-20 words (median 3), 40 % with a caption of 5-300 words (median 45); "
                         "words from the sample's vocabulary; preprocessed with include_caption")


# ---- trainers ----

def run_ours(a, data_dir, work):
    from pmcvqa_sft.train.options import TrainOptions
    from pmcvqa_sft.train.run import setup_run
    o = TrainOptions(dataset_dir=str(data_dir), model=a.model, output_dir=str(work / "ours"), overwrite=True,
                     quantization=a.quantization, max_steps=a.steps, per_device_train_batch_size=a.batch,
                     gradient_accumulation_steps=a.accum, learning_rate=1e-3, warmup_steps=0,
                     eval_steps=10 ** 6, logging_steps=10, report_to="none",
                     progress=False, gradient_checkpointing=True)
    run = setup_run(o, log=lambda *_: None)
    t = run.trainer
    t0 = time.perf_counter()
    t.train()
    secs = time.perf_counter() - t0
    return dict(seconds=secs, real=t.real_tokens, computed=t.computed_tokens)


def trl_config(a, work):
    import torch
    from trl import SFTConfig

    from pmcvqa_sft.models.loading import compute_dtype
    # everything else is SFTConfig's default; these are the run's shape (same as ours) and housekeeping
    return dict(output_dir=str(work / "trl"), max_steps=a.steps, per_device_train_batch_size=a.batch,
                gradient_accumulation_steps=a.accum, learning_rate=1e-3, lr_scheduler_type="cosine",
                logging_steps=10, save_strategy="no", report_to="none", seed=42,
                bf16=compute_dtype() == torch.bfloat16, use_cpu=not torch.cuda.is_available(),
                disable_tqdm=True, max_length=1024), SFTConfig


def run_trl(a, data_dir, work):
    import torch
    from datasets import load_from_disk
    from trl import SFTTrainer

    from pmcvqa_sft.models.loading import device_map_for_process, load_model, load_tokenizer
    from pmcvqa_sft.models.lora import lora_config
    tok = load_tokenizer(a.model)
    ds = load_from_disk(str(data_dir))["train"]
    ds = ds.map(lambda r: {"completion_mask": [int(x != -100) for x in r["labels"]]},
                remove_columns=[c for c in ds.column_names if c != "input_ids"])
    torch.manual_seed(42)
    model = load_model(a.model, a.quantization, device_map=device_map_for_process())
    kwargs, SFTConfig = trl_config(a, work)
    counter = {"real": 0, "computed": 0}
    trainer = SFTTrainer(model=model, args=SFTConfig(**kwargs), train_dataset=ds, processing_class=tok,
                         peft_config=lora_config(16, 32, 0.05))
    trainer.data_collator = count_tokens(trainer.data_collator, counter)
    t0 = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t0
    return dict(seconds=secs, **counter)


# ---- results ----

def summarize(rounds):
    best = min(rounds, key=lambda r: r["seconds"] / max(r["real"], 1))
    return dict(real_tokens_per_s=round(best["real"] / best["seconds"], 1),
                real_token_share=round(best["real"] / best["computed"], 4), seconds=round(best["seconds"], 2),
                real_tokens=best["real"], computed_tokens=best["computed"],
                all_rounds_tokens_per_s=[round(r["real"] / r["seconds"], 1) for r in rounds])


def bench_dataset(a, name, work, rows):
    data_dir, report, desc = make_dataset(name, a, work, rows)
    n = report["splits"]["train"]
    if n != rows:
        raise SystemExit(f"error: data set '{name}' has {n} train rows, expected {rows}")
    ours, theirs = [], []
    for r in range(a.rounds):
        ours.append(run_ours(a, data_dir, work))
        theirs.append(run_trl(a, data_dir, work))
        print(f"[{name}] round {r + 1}: ours {ours[-1]['real'] / ours[-1]['seconds']:.0f} real tok/s, "
              f"TRL {theirs[-1]['real'] / theirs[-1]['seconds']:.0f} real tok/s", flush=True)
    res_ours, res_trl = summarize(ours), summarize(theirs)
    # same rows, each seen once by both: the real tokens must agree, or the comparison is not like for like
    if res_ours["real_tokens"] != res_trl["real_tokens"]:
        print(f"warning: [{name}] real tokens differ: ours {res_ours['real_tokens']}, TRL {res_trl['real_tokens']}",
              file=sys.stderr)
    # headline: the median of the per-round ratios (each round runs the two back to back, so a change in
    # the machine's load between rounds cancels out better than in best-of-each)
    paired = sorted((o["real"] / o["seconds"]) / (t["real"] / t["seconds"]) for o, t in zip(ours, theirs))
    ratio = paired[len(paired) // 2] if len(paired) % 2 else sum(paired[len(paired) // 2 - 1:][:2]) / 2
    return {"data": desc, "train_rows": n, "token_lengths": report["token_lengths"],
            "ours": res_ours, "trl_sfttrainer": res_trl, "speedup_real_tokens_per_s": round(ratio, 3),
            "speedup_per_round": [round(x, 3) for x in paired],
            "speedup_best_of_each": round(res_ours["real_tokens_per_s"] / res_trl["real_tokens_per_s"], 3)}


def main() -> int:
    a = parse_args()
    import importlib.metadata as md

    import torch
    try:
        import trl  # noqa: F401
    except ImportError:
        print("error: this benchmark needs TRL: pip install -r bench/requirements-bench.txt", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    names = [n.strip() for n in a.datasets.split(",") if n.strip()]
    rows = a.steps * a.batch * a.accum
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for name in names:
            results[name] = bench_dataset(a, name, Path(tmp), rows)
    trl_kwargs = {k: v for k, v in trl_config(a, Path("<tmp>"))[0].items() if k != "output_dir"}
    head = results[names[0]]
    result = {
        "config": dict(model=a.model, quantization=a.quantization, steps=a.steps, per_device_batch=a.batch,
                       grad_accum=a.accum, effective_batch=a.batch * a.accum, rows_per_run=rows,
                       lora="r16 alpha32 dropout0.05 all-linear", gradient_checkpointing=True, rounds=a.rounds,
                       threads=torch.get_num_threads(), load_average_before=[round(x, 2) for x in load_before],
                       trl="SFTConfig defaults except " + json.dumps(trl_kwargs)
                           + "; SFTTrainer(peft_config=LoRA, processing_class=tokenizer); dataset input_ids + "
                             "completion_mask (padding_free False, packing False, random sampler, "
                             "DataCollatorForLanguageModeling, entropy/token-accuracy metrics)"),
        "headline_dataset": names[0], "ours": head["ours"], "trl_sfttrainer": head["trl_sfttrainer"],
        "speedup_real_tokens_per_s": head["speedup_real_tokens_per_s"], "goal": ">= 1.3x",
        "datasets": results,
        "versions": {k: md.version(k) for k in ("torch", "transformers", "peft", "trl", "bitsandbytes")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
    }
    out = write_json(a.out, result)
    print(f"\n{'data':<13}{'trainer':<16}{'real tok/s':>11}{'computed':>10}{'real share':>11}{'seconds':>9}")
    for name, res in results.items():
        for who, r in (("ours", res["ours"]), ("TRL SFTTrainer", res["trl_sfttrainer"])):
            print(f"{name:<13}{who:<16}{r['real_tokens_per_s']:>11,.0f}{r['computed_tokens']:>10,}"
                  f"{r['real_token_share']:>11.1%}{r['seconds']:>9.1f}")
        print(f"{name:<13}speedup {res['speedup_real_tokens_per_s']:.2f}x (median of {a.rounds} paired rounds: "
              f"{', '.join(f'{x:.2f}' for x in res['speedup_per_round'])}; best-of-each "
              f"{res['speedup_best_of_each']:.2f}x)")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
