"""Benchmark: `--evaluate --method score` vs one-question-at-a-time generation, same model, same questions.

    python bench/bench_eval.py                      # tiny model + a quickly trained LoRA adapter
    python bench/bench_eval.py --adapter outputs/tiny-sft --num_samples 200

Methods timed in one run (after a warm-up):
- score: batched log-likelihood of each choice (`pmcvqa_sft.evaluate.accuracy`, one forward pass per batch);
- generate (batched): greedy, left-padded, `--batch_size` questions at a time, then answer extraction;
- generate (sequential): the seed's way - per question apply the template, greedy `model.generate`
  up to `--max_new_tokens` or EOS, parse the letter.
Reports questions/s, accuracy, and the agreement of score with sequential generation. Goal: score at
least 20x faster with at least 99 % agreement. Writes bench/results/eval.json.

Without --adapter it trains a small LoRA on the bundled sample (`train_quick_adapter`, cached under
artifacts/, also used by the tests; pmcvqa_sft/train/quick_adapter.py): r 16, alpha 32, all linear layers, lr 1e-3, batch 16, fp32.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.results_io import write_results as write_json  # paths relative to the repository
from pmcvqa_sft.train.quick_adapter import sample_rows, train_quick_adapter
def sequential_generate(model, tokenizer, rows, max_new_tokens: int) -> list[str | None]:
    """The seed's evaluation: one question at a time, template, greedy generate, parse."""
    import torch

    from pmcvqa_sft import prompts
    from pmcvqa_sft.format.answers import extract_answer
    from pmcvqa_sft.format.encoding import render_prompt
    preds = []
    for r in rows:
        msgs = prompts.create_conversation(r["question"], r["choices"])
        prompt = render_prompt(tokenizer, msgs)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, temperature=1.0,
                                 top_p=1.0, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        preds.append(extract_answer(prompts.THINK_OPEN + text, r["choices"]).strict_letter)
    return preds


def bench(model, tok, rows, batch_size: int, max_new_tokens: int) -> dict:
    """Time the three methods on `rows`; agreement of score with sequential generation."""
    from pmcvqa_sft.evaluate.accuracy import evaluate_model
    evaluate_model(model, tok, rows[:4], "score", progress=False)  # warm-up
    sequential_generate(model, tok, rows[:2], max_new_tokens)
    results = {}
    preds_s, m = evaluate_model(model, tok, rows, "score", batch_size=batch_size, progress=False)
    results["score"] = {"seconds": m["seconds"], "accuracy": m["accuracy"], "accuracy_norm": m["accuracy_norm"]}
    preds_b, m = evaluate_model(model, tok, rows, "generate", batch_size=batch_size,
                                max_new_tokens=max_new_tokens, progress=False)
    results["generate_batched"] = {"seconds": m["seconds"], "accuracy": m["accuracy"],
                                   "unparseable_rate": m["unparseable_rate"]}
    t0 = time.perf_counter()
    preds_q = sequential_generate(model, tok, rows, max_new_tokens)
    secs = time.perf_counter() - t0
    n, gold = len(rows), [r["answer_label"] for r in rows]
    results["generate_sequential"] = {"seconds": secs, "accuracy": sum(a == b for a, b in zip(preds_q, gold)) / n,
                                      "unparseable_rate": sum(x is None for x in preds_q) / n}
    for v in results.values():
        v["questions_per_s"] = n / v["seconds"]
    return {"questions": n, "methods": results,
            "speedup_score_vs_sequential": secs / results["score"]["seconds"],
            "agreement_score_vs_sequential": sum(a["pred"] == b for a, b in zip(preds_s, preds_q)) / n,
            "agreement_score_vs_batched_generate": sum(a["pred"] == b["pred"] for a, b in zip(preds_s, preds_b)) / n}


def print_table(title: str, r: dict) -> None:
    print(f"\n{title}: {r['questions']} questions")
    print(f"{'method':<22}{'questions/s':>12}{'seconds':>10}{'accuracy':>10}")
    for k, v in r["methods"].items():
        print(f"{k:<22}{v['questions_per_s']:>12.1f}{v['seconds']:>10.2f}{100 * v['accuracy']:>9.1f}%")
    print(f"score vs sequential generation: {r['speedup_score_vs_sequential']:.1f}x faster, agreement "
          f"{100 * r['agreement_score_vs_sequential']:.1f}% (vs batched generation "
          f"{100 * r['agreement_score_vs_batched_generate']:.1f}%)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- model ----
    p.add_argument("--adapter", default=None, help="training output folder (default: a quick LoRA on tiny)")
    p.add_argument("--model", default=None, help="base model override (default: the adapter's base)")
    p.add_argument("--steps", type=int, default=600, help="quick-adapter training steps (default: %(default)s)")
    p.add_argument("--known_n", type=int, default=16,
                   help="also bench an adapter trained until it answers the first N test questions "
                        "(the tests' adapter; 0 = skip) (default: %(default)s)")
    # ---- benchmark ----
    p.add_argument("--num_samples", type=int, default=96, help="questions from data/sample/test.csv (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=256, help="questions per batch (default: %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="generation limit (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "eval.json"), help="results JSON")
    args = p.parse_args(argv)

    import torch

    from pmcvqa_sft.models.adapters import load_for_inference
    from pmcvqa_sft.models.tiny import ensure_tiny
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
              "goal": {"speedup": 20, "agreement": 0.99}}
    adapter = args.adapter or str(train_quick_adapter(ensure_tiny(), args.steps))
    loaded = load_for_inference(args.model, adapter, "none", log=lambda *_: None)
    r = bench(loaded.model, loaded.tokenizer, sample_rows("test")[:args.num_samples], args.batch_size,
              args.max_new_tokens)
    report["sample_adapter"] = {"adapter": adapter, "model": loaded.base, **r}
    print_table(f"adapter trained on the sample ({adapter})", r)
    if args.known_n:
        known = sample_rows("test")[:args.known_n]
        kadapter = str(train_quick_adapter(ensure_tiny(), 400, rows=known, lr=3e-3))
        kl = load_for_inference(args.model, kadapter, "none", log=lambda *_: None)
        r = bench(kl.model, kl.tokenizer, known, args.batch_size, args.max_new_tokens)
        report["known_answers_adapter"] = {"adapter": kadapter, **r}
        print_table(f"adapter that answers its {args.known_n} questions directly ({kadapter})", r)
    write_json(args.output, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
