"""A small LoRA adapter on the embedded tiny model, trained in seconds and cached: for the tests and benches.

`train_quick_adapter(tiny_dir, steps, rows=..., lr=...)` runs a plain PEFT loop (r 16, alpha 32, all linear
layers, batch 16, fp32) and caches the result under artifacts/quick-adapters/ (keyed by recipe, tiny
build, steps, lr and rows), so a machine trains it once. The folder looks like a training output:
adapter_config.json + adapter_model.safetensors, the tokenizer with its chat template, run_card.json.
`sample_rows(split)` reads the bundled sample as evaluation rows.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
import time

from ..core.atomic import atomic_dir
from ..core.paths import ROOT

SAMPLE = ROOT / "data" / "sample"
CACHE = ROOT / "artifacts" / "quick-adapters"
QUICK_RECIPE = dict(version=1, r=16, alpha=32, lr=1e-3, batch_size=16, warmup=20, seed=0)


def sample_rows(split: str = "test") -> list[dict]:
    """The bundled v1 sample as evaluation rows (question, choices, answer_label)."""
    from ..data.pmc_vqa import read_pmc_vqa_csv
    records, _ = read_pmc_vqa_csv(SAMPLE / f"{split}.csv")
    return [{"question": r.question, "choices": dict(r.choices), "answer_label": r.answer_label,
             "source_file": r.source_file, "source_row": r.source_row} for r in records]


def _key(tiny_dir: Path, *parts) -> str:
    stamp = (tiny_dir / "tiny_build.json").read_text() if (tiny_dir / "tiny_build.json").exists() else str(tiny_dir)
    blob = json.dumps([QUICK_RECIPE, stamp, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_quick_adapter(tiny_dir, steps: int = 400, rows=None, lr: float | None = None, out_dir=None,
                        log=print) -> Path:
    """A LoRA adapter on the tiny model (cached); returns its folder.

    `rows` (question/choices/answer_label dicts) default to data/sample/train.csv. The folder looks like
    a training output: adapter_config.json + adapter_model.safetensors, the tokenizer with its chat
    template, run_card.json.
    """
    import random

    from peft import get_peft_model
    import torch
    from transformers import AutoModelForCausalLM

    from .. import prompts
    from ..format.encoding import encode_conversation, template_hash
    from ..models import loading as modeling
    from ..models.lora import lora_config

    tiny_dir = Path(tiny_dir)
    rows = rows if rows is not None else sample_rows("train")
    lr = lr or QUICK_RECIPE["lr"]
    out = Path(out_dir) if out_dir else CACHE / f"tiny-{steps}-{_key(tiny_dir, steps, lr, rows)}"
    if (out / "adapter_model.safetensors").exists():
        return out
    cfg = QUICK_RECIPE
    torch.manual_seed(cfg["seed"])
    tok = modeling.load_tokenizer(str(tiny_dir))
    rows = [encode_conversation(tok, prompts.create_conversation(r["question"], r["choices"], r["answer_label"]))
            for r in rows]
    from ..core.threads import configure_threads
    configure_threads(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    model = get_peft_model(model, lora_config(str(tiny_dir), r=cfg["r"], alpha=cfg["alpha"], dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]))
    rng, order, t0 = random.Random(cfg["seed"]), [], time.perf_counter()
    model.train()
    for step in range(steps):
        if len(order) < cfg["batch_size"]:
            order += rng.sample(range(len(rows)), len(rows))
        batch, order = [rows[i] for i in order[:cfg["batch_size"]]], order[cfg["batch_size"]:]
        width = max(len(ids) for ids, _ in batch)
        pad = tok.eos_token_id
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])  # padding masked by position
        attn = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
    log(f"quick LoRA: {steps} steps in {time.perf_counter() - t0:.0f} s, last loss {loss.item():.3f}")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "run_card.json").write_text(json.dumps(
            {"base_model": str(tiny_dir), "steps": steps, "final_loss": loss.item(), "rows": len(rows),
             "template_hash": template_hash(tok), **cfg, "lr": lr}, indent=2))
    return out
