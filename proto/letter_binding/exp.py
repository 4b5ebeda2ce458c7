"""t14b: merged letter+first-word tokens (`C. Aorta` = one added token) -> does the letter become learnable?

    cd /work/main && OMP_NUM_THREADS=1 PYTHONPATH=/work/main:/work/scratch \
        .venv/bin/python /work/scratch/t14b/exp.py base --steps 1000
    ... exp.py sft --steps 600
Reuses t14/exp.py (drill rows, row encoding, loss) and the main package's tiny tokenizer, PromptEncoder and
exact_match; only the tokenizer gets the merged added tokens.
"""
from __future__ import annotations
import argparse, csv, json, math, random, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from tokenizers import AddedToken
from pmcvqa_sft import prompts
from pmcvqa_sft.models import tiny
from pmcvqa_sft.format.encoding import PromptEncoder
from pmcvqa_sft.format.answers import exact_match
from t14.exp import ANSWERS, drill_rows, encode_rows, lm_loss

OUT = Path(__file__).resolve().parent
MAIN = Path("/work/main")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a):
    print(*a, flush=True)


def first_words():
    return sorted({t.split()[0] for t in ANSWERS})


def make_tok(merge=True):
    tok = tiny.build_tokenizer(tiny._tokenizer_texts())
    if merge:
        # one added token per (letter, first word of a choice text): `C. Aorta`, matched on raw text,
        # single_word so `C. Aort` never matches inside `C. Aortic`
        tok.add_tokens([AddedToken(f"{L}. {w}", single_word=True, normalized=False)
                        for w in first_words() for L in prompts.LETTERS])
    return tok


def merged_ids(tok):
    return {tok.convert_tokens_to_ids(f"{L}. {w}"): (L, w) for w in first_words() for L in prompts.LETTERS}


def check_tok(tok, enc, rows):
    mids = merged_ids(tok)
    P, T = encode_rows(enc, rows)
    for r, p, t in zip(rows, P, T):
        full = enc.prompt_text(prompts.format_user_prompt(r["question"], r["choices"]))
        ids = tok(full, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == full, (tok.decode(ids), full)
        n_prompt = sum(i in mids for i in p)
        n_target = sum(i in mids for i in t)
        assert n_prompt == len(r["choices"]) and n_target == 1, (n_prompt, n_target)
        g = [i for i in t if i in mids][0]
        assert mids[g] == (r["label"], r["choices"][r["label"]].split()[0])
        assert g in p  # the answer token is literally present in the prompt
    for s in tiny._tokenizer_texts()[:500] + [prompts.answer_line("C", "Hematoxylin and eosin")]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
    log(f"tokenizer ok: vocab {len(tok)}, {len(mids)} merged tokens, round trip exact on {len(rows)} rows")


def letter_pos(mids, t):
    return next(i for i, x in enumerate(t) if x in mids)


@torch.no_grad()
def letter_acc(model, tok, enc, rows, mids):
    """Teacher-forced argmax over the full vocab at the merged-token position (= greedy's choice there)."""
    model.eval()
    P, T = encode_rows(enc, rows)
    ok = okw = okt = 0
    for s in range(0, len(rows), 70):
        batch = [(p + t, len(p) + letter_pos(mids, t)) for p, t in zip(P[s:s + 70], T[s:s + 70])]
        width = max(len(i) for i, _ in batch)
        ids = torch.tensor([i + [tok.eos_token_id] * (width - len(i)) for i, _ in batch])
        attn = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        lg = model(input_ids=ids, attention_mask=attn).logits
        for b, (i, lp) in enumerate(batch):
            pred = lg[b, lp - 1].argmax().item()
            ok += int(pred == i[lp])
            okw += int(pred in mids and mids[pred][1] == mids[i[lp]][1])  # right word, any letter
            rest = lg[b, lp:len(i) - 1].argmax(-1).tolist()
            okt += int(rest == i[lp + 1:])
    model.train()
    n = len(rows)
    return ok / n, okw / n, okt / n


@torch.no_grad()
def generate_eval(model, tok, enc, rows, max_new_tokens=24):
    model.eval()
    P = enc.prompt_ids([prompts.format_user_prompt(r["question"], r["choices"]) for r in rows])
    recs = []
    for s in range(0, len(rows), 70):
        chunk = P[s:s + 70]
        w = max(map(len, chunk))
        ids = torch.tensor([[tok.eos_token_id] * (w - len(p)) + p for p in chunk])
        attn = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in chunk])
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, top_k=None, top_p=None,
                             temperature=None)
        for j, g in enumerate(gen[:, w:]):
            g = g.tolist()
            n = g.index(tok.eos_token_id) + 1 if tok.eos_token_id in g else len(g)
            text = tok.decode(g[:n], skip_special_tokens=True)
            r = rows[s + j]
            m = exact_match(prompts.THINK_OPEN + text, r["choices"], r["label"])
            m["text"] = text
            recs.append(m)
    model.train()
    k = len(recs)
    res = {key: 100 * sum(bool(m[src]) for m in recs) / k
           for key, src in (("strict", "strict"), ("letter", "letter_ok"), ("text", "text_ok"), ("parsed", "parsed"))}
    return res, recs


# ---------------------------------------------------------------------------------------------- data
def _clean(cell):
    cell = " ".join(cell.replace("\u00a0", " ").split())
    return cell[2:].strip() if cell[1:2] == ":" and cell[:1] in prompts.LETTERS else cell


def sample_rows():
    """Same split as grpo/proto/exp.py: test.csv (210); train.csv minus 42 validation rows (seed 0)."""
    out = {}
    for split in ("train", "test"):
        with open(MAIN / "data/sample" / f"{split}.csv", newline="") as f:
            rows = list(csv.reader(f))
        h = rows[0]
        out[split] = [{"question": r[h.index("Question")],
                       "choices": {L: _clean(r[h.index(f"Choice {L}")]) for L in prompts.LETTERS},
                       "label": r[h.index("Answer_label")].strip()} for r in rows[1:]]
    rng = random.Random(0)
    idx = list(range(len(out["train"])))
    rng.shuffle(idx)
    out["validation"] = [out["train"][i] for i in idx[:42]]
    out["train"] = [out["train"][i] for i in idx[42:]]
    return out


def shuffled(row, rng):
    texts = list(row["choices"].values())
    gold = row["choices"][row["label"]]
    rng.shuffle(texts)
    ch = dict(zip(prompts.LETTERS, texts))
    return {**row, "choices": ch, "label": next(k for k, v in ch.items() if v == gold)}


# ---------------------------------------------------------------------------------------------- base
@torch.no_grad()
def factor_init(model, mids):
    """Init every merged token's input AND output row as (letter vector + word vector)/sqrt(2), both random
    N(0, 0.02): the four `X. Aorta` tokens share their word part, the 70 `C. *` tokens their letter part."""
    g = torch.Generator().manual_seed(1)
    h = model.config.hidden_size
    for W in (model.model.embed_tokens.weight, model.lm_head.weight):
        Lv = {L: torch.randn(h, generator=g) * 0.02 for L in prompts.LETTERS}
        Wv = {w: torch.randn(h, generator=g) * 0.02 for w in first_words()}
        for i, (L, w) in mids.items():
            W[i] = (Lv[L] + Wv[w]) / math.sqrt(2)


def base(a):
    from transformers import LlamaConfig, LlamaForCausalLM
    t0 = time.time()
    torch.manual_seed(0)
    tok = make_tok(merge=not a.nomerge)
    enc = PromptEncoder(tok)
    held = drill_rows(210, random.Random(99))
    mids = merged_ids(tok)
    if not a.nomerge:
        check_tok(tok, enc, held + sample_rows()["test"])
    p, t = encode_rows(enc, held[:1])
    log(tok.convert_ids_to_tokens(p[0][-22:]), tok.convert_ids_to_tokens(t[0]))
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id, **tiny.MODEL_KW)
    model = LlamaForCausalLM(cfg)
    if a.factor:
        factor_init(model, mids)
    from pmcvqa_sft.data import samples
    sents = [[tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
             for s in samples.pretraining_sentences()]
    rng = random.Random(0)
    rows = drill_rows(6000, rng)
    P, T = encode_rows(enc, rows)
    drills = [(p + t, [-100] * len(p) + t, None) for p, t in zip(P, T)]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / a.steps)))
    model.train()
    hist = []
    for step in range(a.steps):
        batch = [rng.choice(drills) if rng.random() < a.share else (lambda s: (s, s, None))(rng.choice(sents))
                 for _ in range(16)]
        loss = lm_loss(model, batch, tok.eos_token_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad()
        if (step + 1) % a.eval_every == 0:
            la, lw, lt = letter_acc(model, tok, enc, held, mids)
            hist.append((step + 1, la, lw, lt, time.time() - t0))
            log(f"step {step+1} loss {loss.item():.3f} merged-token(letter) {100*la:.1f} word-any-letter {100*lw:.1f} "
                f"text-rest {100*lt:.1f} t={time.time()-t0:.0f}s")
    secs = time.time() - t0
    res, recs = generate_eval(model, tok, enc, held)
    log(f"BASE drill greedy: {res}  sample {recs[0]['text']!r}")
    out = OUT / "cache" / f"base-{a.name}"
    model.save_pretrained(out); tok.save_pretrained(out)
    (out / "build.json").write_text(json.dumps({"factor": a.factor, "share": a.share, "steps": a.steps, "seconds": secs, "hist": hist, "drill_greedy": res}))
    log(f"base {a.name}: {secs:.0f} s train")


# ---------------------------------------------------------------------------------------------- SFT
def sft(a):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.time()
    torch.manual_seed(0)
    d = OUT / "cache" / f"base-{a.base}"
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    enc = PromptEncoder(tok)
    data = sample_rows()
    if not a.nomerge:
        check_tok(tok, enc, data["test"][:50])
    test_p = enc.prompt_ids([prompts.format_user_prompt(r["question"], r["choices"]) for r in data["test"][:1]])
    log(tok.convert_ids_to_tokens(test_p[0][-20:]))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    steps, bs = a.steps, 16
    warm = max(1, steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = random.Random(0)
    model.train()
    order = []
    for step in range(steps):
        if len(order) < bs:
            order += rng.sample(range(len(data["train"])), len(data["train"]))
        idx, order = order[:bs], order[bs:]
        rows = [shuffled(data["train"][i], rng) for i in idx]
        P, T = encode_rows(enc, rows)  # empty think block, answer-only target
        loss = lm_loss(model, [(p + t, [-100] * len(p) + t, None) for p, t in zip(P, T)], tok.eos_token_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step(); opt.zero_grad()
        if step % 100 == 0:
            log(f"sft {step} loss {loss.item():.3f} t={time.time()-t0:.0f}s")
    secs = time.time() - t0
    res, recs = generate_eval(model, tok, enc, data["test"])
    log(f"SFT {a.name} ({secs:.0f} s train): TEST {res}")
    for m in recs[:4]:
        log("   sample:", repr(m["text"][:100]))
    (OUT / f"sft-{a.name}.json").write_text(json.dumps({"base": a.base, "steps": steps, "seconds": secs, "test": res}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("--name", default="merge")
    ap.add_argument("--base", default="merge")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--eval_every", type=int, default=200)
    ap.add_argument("--nomerge", action="store_true")
    ap.add_argument("--factor", action="store_true")
    a = ap.parse_args()
    base(a) if a.cmd == "base" else sft(a)


if __name__ == "__main__":
    main()
