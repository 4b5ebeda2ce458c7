#!/usr/bin/env python
"""The image path's data cost: figure checks, the lazy collator, and a training step, same process.

    OMP_NUM_THREADS=1 python bench/bench_vision.py            # -> bench/results/vision.json (~1-2 min)
    python bench/bench_vision.py --pmc_figures 40 --steps 5   # quicker

Measured (each the best of `--rounds` rounds; the machine may be shared):
1. preprocessing's figure check (`figures.check_figure`: open + decode once, JPEGs at 1/8 scale),
   figures/s on one thread, and through `VisionPrep.check` (a thread pool) end to end:
   - the bundled sample's figures (112x112 PNGs in images_2.zip);
   - `pmc_like`: JPEG figures generated here (seeded) at PMC-like sizes, an assumption stated in the
     JSON: widths 300-1600 px and aspect ratios 0.5-2, both log-uniform, smooth content, quality 90,
     stored in a zip as the release's archives are;
   and the full decode without the 1/8-scale shortcut, for comparison.
2. the lazy collator (`VisionCollator`: load figure + image processor + placeholder expansion) per
   batch of `--batch_size` rows, figures/s: the sample at the tiny model's 112x112 cap, and the
   pmc_like figures at `--max_pixels` (448x448 by default: 256 tokens each).
3. one training step of the tiny Qwen2.5-VL (8-bit LM, LoRA r 16 on its linear layers + the merger
   trained, no gradient checkpointing: the vision demo's settings) on a batch of the sample: seconds per
   step against the collator's seconds per batch (the collator must not be the bottleneck).
4. real-token share (non-pad / computed positions) of batches with image tokens, random order vs the
   length-grouped sampler training uses: the sample, and the sample's text with pmc_like image sizes.
"""
from __future__ import annotations

import argparse
import io
from collections import Counter
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from bench.results_io import write_results as write_json  # paths relative to the repository

SAMPLE = ROOT / "data" / "sample_vision"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Image path: figure check, collator and training-step costs.")
    p.add_argument("--pmc_figures", type=int, default=120, help="generated PMC-like JPEG figures")
    p.add_argument("--batch_size", type=int, default=16, help="rows per collator batch / training step")
    p.add_argument("--max_pixels", type=int, default=448 * 448, help="pixel cap for the pmc_like collator run")
    p.add_argument("--steps", type=int, default=12, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per measurement (best is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="training step with gradient checkpointing (off: the vision demo's setting)")
    p.add_argument("--seed", type=int, default=20261129, help="seed of the generated figures")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vision.json"), help="result JSON")
    return p.parse_args(argv)


def pmc_like_zip(path: Path, n: int, seed: int) -> list[tuple[int, int]]:
    """n smooth JPEG figures at PMC-like sizes in a zip (under figures/); returns their sizes."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = random.Random(seed)
    sizes = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            w = int(math.exp(rng.uniform(math.log(300), math.log(1600))))
            h = max(50, int(w / math.exp(rng.uniform(math.log(0.5), math.log(2)))))
            small = np.random.default_rng(seed + i).integers(0, 255, (max(2, h // 32), max(2, w // 32), 3),
                                                              dtype=np.uint8)
            im = Image.fromarray(small).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            zf.writestr(f"figures/PMC{i:07d}_F1.jpg", buf.getvalue())
            sizes.append((w, h))
    return sizes


def best_rate(fn, items, rounds) -> float:
    """items/s of the best round."""
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        fn(items)
        best = min(best, time.perf_counter() - t)
    return round(len(items) / best, 1)


def bench_check(name, zip_path, rounds, proc) -> dict:
    from pmcvqa_sft.data import figures
    from pmcvqa_sft.data.pmc_vqa import MCQRecord
    from pmcvqa_sft.preprocess.media import VisionPrep

    src = figures.FigureSource(zip_path)
    refs = sorted(n for n in zipfile.ZipFile(zip_path).namelist() if not n.endswith("/"))
    one = lambda rs: [figures.check_figure(src.root, r, src.kind) for r in rs]  # noqa: E731
    full = lambda rs: [figures._decode(figures.read_bytes(src.root, r, src.kind), r) for r in rs]  # noqa: E731
    recs = [MCQRecord("b.csv", i, "q", {"A": "a", "B": "b"}, "A", "c", r.split("/", 1)[1])
            for i, r in enumerate(refs)]

    def through_prep(_):
        VisionPrep(str(zip_path), proc, log=lambda *_: None).check({"train": recs}, "local", Counter(), progress=False)
    return {"figures": len(refs), "check_figs_per_s_1thread": best_rate(one, refs, rounds),
            "full_decode_figs_per_s_1thread": best_rate(full, refs, rounds),
            "visionprep_check_figs_per_s": best_rate(through_prep, refs, rounds),
            "visionprep_threads": VisionPrep(str(zip_path), proc, log=lambda *_: None).workers,
            "name": name}


def bench_collator(rows, load, proc, max_pixels, batch_size, rounds) -> dict:
    from pmcvqa_sft.data.collate import VisionCollator
    from pmcvqa_sft.format.media import image_token_id
    coll = VisionCollator(proc.image_processor, image_token_id(proc), proc.tokenizer.pad_token_id, load,
                          max_pixels=max_pixels)
    batches = [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        for b in batches:
            coll(b)
        best = min(best, time.perf_counter() - t)
    n = len(batches) * batch_size
    return {"batches": len(batches), "batch_size": batch_size, "max_pixels": max_pixels,
            "s_per_batch": round(best / len(batches), 4), "figures_per_s": round(n / best, 1)}


def bench_step(batch, steps, gradient_checkpointing) -> dict:
    import torch
    from types import SimpleNamespace

    from pmcvqa_sft.train.run import build_model as build_vision_model
    o = SimpleNamespace(model="tiny-vision", quantization="8bit", gradient_checkpointing=gradient_checkpointing, lora_r=16,
                        lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", train_vision="merger")
    model, params = build_vision_model(o, log=lambda *_: None)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return {"s_per_step_median": round(statistics.median(times), 4), "s_per_step_min": round(min(times), 4),
            "steps": steps, "trainable_parameters": params["trainable"], "final_loss": round(loss.item(), 3),
            "setup": "8-bit LM, LoRA r16/alpha32 on the LM's linear layers, merger trained, AdamW lr 2e-3",
            "gradient_checkpointing": gradient_checkpointing}


def token_share(text_lens, image_tokens, batch_size, seed) -> dict:
    """Real-token share of batches: random order vs the training sampler's length grouping."""
    from pmcvqa_sft.data.collate import EpochLengthGroupedSampler
    lengths = [t - 1 + n for t, n in zip(text_lens, image_tokens)]
    order_random = list(range(len(lengths)))
    random.Random(seed).shuffle(order_random)
    order_grouped = list(iter(EpochLengthGroupedSampler(lengths, batch_size, seed)))

    def share(order):
        real = computed = 0
        for i in range(0, len(order), batch_size):
            b = [lengths[j] for j in order[i:i + batch_size]]
            real += sum(b)
            computed += max(b) * len(b)
        return round(real / computed, 4)
    return {"rows": len(lengths), "image_token_share_of_real": round(sum(image_tokens) / sum(lengths), 4),
            "tokens_min_mean_max": [min(lengths), round(sum(lengths) / len(lengths), 1), max(lengths)],
            "real_share_random": share(order_random), "real_share_length_grouped": share(order_grouped)}


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from datasets import load_from_disk

    from pmcvqa_sft.data import figures
    from pmcvqa_sft.preprocess.run import run_preprocess
    from pmcvqa_sft.preprocess.media import VisionPrep
    from pmcvqa_sft.models.loading import load_processor
    from pmcvqa_sft.format.media import num_image_tokens
    t_all = time.perf_counter()
    proc = load_processor("tiny-vision")
    res = {"args": vars(a), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                        "loadavg": os.getloadavg()}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pmc_zip = tmp / "pmc_like.zip"
        sizes = pmc_like_zip(pmc_zip, a.pmc_figures, a.seed)
        res["pmc_like_sizes"] = {"assumption": "widths 300-1600 px, aspect 0.5-2, log-uniform; JPEG q90",
                                 "mean_megapixels": round(sum(w * h for w, h in sizes) / len(sizes) / 1e6, 3)}
        res["check"] = {"sample": bench_check("sample", SAMPLE / "images_2.zip", a.rounds, proc),
                        "pmc_like": bench_check("pmc_like", pmc_zip, a.rounds, proc)}
        print("check", res["check"], flush=True)

        out = tmp / "ds"
        run_preprocess(data=str(SAMPLE), tokenizer_name="tiny-vision", output_dir=str(out), tokenizer=proc.tokenizer,
                       vision=VisionPrep(str(SAMPLE / "images_2.zip"), proc, log=lambda *_: None), progress=False)
        train = load_from_disk(str(out))["train"]
        rows = [dict(input_ids=r["input_ids"], labels=r["labels"], image=r["image"]) for r in train.select(range(160))]
        zroot = str((SAMPLE / "images_2.zip").resolve())
        load_sample = lambda ref: figures.load_figure(zroot, ref, "zip")  # noqa: E731
        pmc_refs = [f"figures/PMC{i:07d}_F1.jpg" for i in range(a.pmc_figures)]
        pmc_rows = [dict(rows[i % len(rows)], image=pmc_refs[i]) for i in range(a.pmc_figures)]
        load_pmc = lambda ref: figures.load_figure(str(pmc_zip), ref, "zip")  # noqa: E731
        res["collator"] = {
            "sample_112px": bench_collator(rows, load_sample, proc, None, a.batch_size, a.rounds),
            "pmc_like": bench_collator(pmc_rows, load_pmc, proc, a.max_pixels, a.batch_size, a.rounds)}
        print("collator", res["collator"], flush=True)

        from pmcvqa_sft.data.collate import VisionCollator
        from pmcvqa_sft.format.media import image_token_id
        batch = VisionCollator(proc.image_processor, image_token_id(proc), proc.tokenizer.pad_token_id,
                               load_sample, max_pixels=None)(rows[:a.batch_size])
        res["train_step"] = bench_step(batch, a.steps, a.gradient_checkpointing)
        step = res["train_step"]["s_per_step_median"]
        res["collator_vs_step"] = {
            "sample_batch_s": res["collator"]["sample_112px"]["s_per_batch"], "step_s": step,
            "ratio": round(res["collator"]["sample_112px"]["s_per_batch"] / step, 3),
            "pmc_like_batch_s_at_max_pixels": res["collator"]["pmc_like"]["s_per_batch"]}
        print("step", res["train_step"], res["collator_vs_step"], flush=True)

        text = [len(r["input_ids"]) for r in train]
        ip = proc.image_processor
        res["token_share"] = {
            "sample": token_share(text, [num_image_tokens(r["image_width"], r["image_height"], ip)
                                         for r in train], a.batch_size, a.seed),
            "sample_text_pmc_like_images": token_share(
                text, [num_image_tokens(*sizes[i % len(sizes)], ip, a.max_pixels) for i in range(len(text))],
                a.batch_size, a.seed)}
        print("token_share", res["token_share"], flush=True)
    res["wall_s"] = round(time.perf_counter() - t_all, 1)
    write_json(a.out, res)
    print(f"wrote {a.out} ({res['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
