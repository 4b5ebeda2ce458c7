"""verify_installation.py --smoke: the real pipeline on the embedded tiny model, in miniature (~30 s).

Build (or reuse) the tiny model, encode a few sample rows with the training format, load the base 8-bit
through bitsandbytes, attach LoRA, take a few optimizer steps (the loss must fall) and generate greedily.
"""
from __future__ import annotations

import time

from ..core.paths import SAMPLE_DIR
from .checks import FAIL, INSTALL_FIX, PASS, Check

SAMPLE_TRAIN = SAMPLE_DIR / "train.csv"

SMOKE_ROWS, SMOKE_STEPS, SMOKE_LR = 4, 10, 2e-3


def _smoke_batch(tokenizer, n_rows: int):
    """The first sample rows through the real prompt and encoding; padded right, padding masked by position."""
    import torch

    from .. import prompts
    from ..data.pmc_vqa import read_pmc_vqa_csv
    from ..format import encoding
    records, _ = read_pmc_vqa_csv(SAMPLE_TRAIN)
    records = records[:n_rows]
    encoded = [encoding.encode_conversation(tokenizer, prompts.create_conversation(
        r.question, r.choices, r.answer_label, r.caption)) for r in records]
    width = max(len(ids) for ids, _ in encoded)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    batch = {"input_ids": torch.tensor([pad(ids, tokenizer.eos_token_id) for ids, _ in encoded]),
             "labels": torch.tensor([pad(labels, encoding.IGNORE_INDEX) for _, labels in encoded]),
             "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in encoded])}
    return batch, records


def run_smoke(progress=lambda msg: None) -> list[Check]:
    """Tiny model, 8-bit + LoRA, a few optimizer steps (the loss must fall), one greedy generation."""
    import warnings

    from transformers.utils import logging as hf_logging

    from ..core.notices import quiet_bitsandbytes
    quiet_bitsandbytes()
    hf_logging.disable_progress_bar()  # the weight-loading bar would break the table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers API
        return _smoke(progress)


def _smoke(progress) -> list[Check]:
    from peft import get_peft_model, prepare_model_for_kbit_training
    import torch

    from .. import prompts
    from ..format import encoding
    from ..models import loading as modeling
    from ..models import tiny
    from ..models.lora import lora_config
    start = time.monotonic()
    folder = tiny.ensure_tiny(log=progress)
    tokenizer = modeling.load_tokenizer(str(folder))
    batch, records = _smoke_batch(tokenizer, SMOKE_ROWS)
    model = modeling.load_model(str(folder), "8bit")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(tiny.TINY_ALIAS))
    device = next(p for p in model.parameters() if p.requires_grad).device
    batch = {k: v.to(device) for k, v in batch.items()}
    rows = [Check("smoke: tiny model", PASS, f"{folder.name}: 8-bit + LoRA loaded, "
                  f"{len(records)} sample rows encoded")]
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=SMOKE_LR)
    model.train()
    losses = []
    for _ in range(SMOKE_STEPS):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    fell = losses[-1] < losses[0] and all(map(lambda v: v == v, losses))  # v == v: not NaN
    rows.append(Check("smoke: training", PASS if fell else FAIL,
                      f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {SMOKE_STEPS} steps",
                      "" if fell else f"the loss did not fall: check the versions above, then {INSTALL_FIX}"))
    model.eval()
    r = records[0]
    prompt = encoding.render_prompt(tokenizer, prompts.create_conversation(r.question, r.choices, caption=r.caption))
    ids = torch.tensor([encoding.encode_text(tokenizer, prompt)], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:]
    text = " ".join(tokenizer.decode(new, skip_special_tokens=True).split())
    rows.append(Check("smoke: generation", PASS if len(new) else FAIL,
                      f"greedy, {len(new)} tokens: {text[:60]!r} ({time.monotonic() - start:.0f} s in all)",
                      "" if len(new) else INSTALL_FIX))
    return rows


