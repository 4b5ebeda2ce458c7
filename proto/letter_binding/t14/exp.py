"""t14 experiments: does the tiny base learn letter binding? (tokenizer split, loss weight, mix)"""
from __future__ import annotations
import argparse, json, math, random, time, sys
import torch
torch.set_num_threads(1)
from tokenizers import Regex, pre_tokenizers
from pmcvqa_sft import prompts
from pmcvqa_sft.models import tiny
from pmcvqa_sft.data import samples
from pmcvqa_sft.format.encoding import PromptEncoder

def log(*a): print(*a, flush=True)

def make_tok(split):
    tok = tiny.build_tokenizer(tiny._tokenizer_texts()) if not split else None
    if split:
        from tokenizers import Tokenizer
        # rebuild with a split pre-tokenizer: a choice letter before '.' is its own token everywhere
        import pmcvqa_sft.models.tiny as T
        def patched(texts):
            from tokenizers import AddedToken, Tokenizer, decoders, models, processors, trainers
            from transformers import PreTrainedTokenizerFast
            tk = Tokenizer(models.BPE())
            if split == 2:
                gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
                tk.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(r"(?<![^\s])[A-D]\.(?=\s|$)"), behavior="isolated"),
                    pre_tokenizers.Split(Regex(r"^[A-D]\.$|" + gpt2), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            else:
                tk.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(r"\b[A-D](?=\.)"), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
            tk.decoder = decoders.ByteLevel()
            tr = trainers.BpeTrainer(vocab_size=1024, special_tokens=[T.BOS, T.EOS, T.PAD_LIKE],
                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
            tk.train_from_iterator(texts, tr)
            tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in (T.USER, T.ASSISTANT, T.THINK, T.END_THINK)])
            tk.post_processor = processors.TemplateProcessing(single=f"{T.BOS} $A", pair=f"{T.BOS} $A {T.BOS} $B",
                                                              special_tokens=[(T.BOS, tk.token_to_id(T.BOS))])
            f = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=T.BOS, eos_token=T.EOS, pad_token=T.EOS,
                                        model_max_length=1024)
            f.chat_template = T.CHAT_TEMPLATE
            return f
        tok = patched(tiny._tokenizer_texts())
    return tok

ANSWERS = sorted({a for _c, a, _p in samples.FACTS})

def drill_rows(n, rng, texts=ANSWERS, k=4, rev=0.0, kmin=None):
    rows = []
    for _ in range(n):
        kk = rng.randint(kmin, k) if kmin else k
        ch = rng.sample(texts, kk)
        g = rng.randrange(kk)
        L = prompts.LETTERS[g]
        q = f"What is choice {L}?" if rng.random() < rev else f"Which choice is {ch[g]}?"
        rows.append({"question": q, "choices": dict(zip(prompts.LETTERS, ch)), "label": L})
    return rows

SCAN = False
def scan_think(r):
    out = []
    for L, t in r["choices"].items():
        out.append(f"{L}. {t}")
        if L == r["label"]:
            break
    return "\n".join(out)

def encode_rows(enc, rows):
    P = enc.prompt_ids([prompts.format_user_prompt(r["question"], r["choices"]) for r in rows])
    T = enc.target_ids([prompts.assistant_content(r["label"], r["choices"][r["label"]], scan_think(r) if SCAN else "") for r in rows])
    return P, T

def letter_pos(tok, t):
    """index in target t of the letter token (the first token that decodes to a letter A-D after 'Answer:')"""
    s = ""
    for i, x in enumerate(t):
        piece = tok.decode([x])
        if s.endswith("Answer:") or s.endswith("Answer: "):
            if piece.strip() in tuple(prompts.LETTERS):
                return i
        s += piece
    raise ValueError(tok.decode(t))

def lm_loss(model, batch, pad, w_letter=1.0):
    width = max(len(i) for i, _, _ in batch)
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _, _ in batch])
    labels = torch.tensor([l + [-100] * (width - len(l)) for _, l, _ in batch])
    attn = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _, _ in batch])
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    tgt = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100, reduction="none").view(tgt.shape)
    w = (tgt != -100).float()
    for b, (_, _, lp) in enumerate(batch):
        if lp is not None:
            w[b, lp - 1] *= w_letter
    return (ce * w).sum() / w.sum()

@torch.no_grad()
def letter_acc(model, tok, enc, rows):
    model.eval()
    P, T = encode_rows(enc, rows)
    ok = 0; okt = 0
    for s in range(0, len(rows), 70):
        batch = []
        for p, t in zip(P[s:s+70], T[s:s+70]):
            batch.append((p + t, len(p) + letter_pos(tok, t)))
        width = max(len(i) for i, _ in batch)
        ids = torch.tensor([i + [tok.eos_token_id] * (width - len(i)) for i, _ in batch])
        attn = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        lg = model(input_ids=ids, attention_mask=attn).logits
        for b, (i, lp) in enumerate(batch):
            ok += int(lg[b, lp - 1].argmax().item() == i[lp])
            # text: all following tokens right (teacher forced) up to eos
            pred = lg[b, lp:len(i) - 1].argmax(-1).tolist()
            okt += int(pred == i[lp + 1:])
    model.train()
    return ok / len(rows), okt / len(rows)

@torch.no_grad()
def gen_acc(model, tok, enc, rows):
    from pmcvqa_sft.format.answers import exact_match
    model.eval()
    P = enc.prompt_ids([prompts.format_user_prompt(r["question"], r["choices"]) for r in rows])
    ok = okl = 0
    for s in range(0, len(rows), 70):
        chunk = P[s:s + 70]; w = max(map(len, chunk))
        ids = torch.tensor([[tok.eos_token_id] * (w - len(p)) + p for p in chunk])
        attn = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in chunk])
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=48, do_sample=False,
                             pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        for j, g in enumerate(gen[:, w:]):
            text = tok.decode(g, skip_special_tokens=True)
            r = rows[s + j]
            m = exact_match(prompts.THINK_OPEN + text, r["choices"], r["label"])
            ok += bool(m.get("strict")); okl += bool(m.get("letter_ok"))
            if s + j == 0: log(repr(text))
    model.train()
    return okl / len(rows), ok / len(rows)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", type=int, default=1)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--w_letter", type=float, default=1.0)
    ap.add_argument("--eval_every", type=int, default=100)
    ap.add_argument("--save", default=None)
    ap.add_argument("--rev", type=float, default=0.0)
    ap.add_argument("--scan", type=int, default=0)
    ap.add_argument("--kmin", type=int, default=None)
    a = ap.parse_args()
    global SCAN; SCAN = bool(a.scan)
    t0 = time.time()
    torch.manual_seed(0)
    tok = make_tok(a.split)
    enc = PromptEncoder(tok)
    p, t = encode_rows(enc, drill_rows(1, random.Random(5)))
    log([tok.convert_ids_to_tokens(x) for x in p[0][-25:]], [tok.convert_ids_to_tokens(x) for x in t[0]])
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id, **tiny.MODEL_KW)
    model = LlamaForCausalLM(cfg)
    sents = [[tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
             for s in samples.pretraining_sentences()]
    rng = random.Random(0)
    rows = drill_rows(6000, rng, rev=a.rev, kmin=a.kmin)
    P, T = encode_rows(enc, rows)
    drills = [(p + t, [-100] * len(p) + t, len(p) + letter_pos(tok, t)) for p, t in zip(P, T)]
    held = drill_rows(210, random.Random(99))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / a.steps)))
    model.train()
    for step in range(a.steps):
        batch = []
        for _ in range(a.bs):
            if rng.random() < a.share:
                batch.append(rng.choice(drills))
            else:
                s = rng.choice(sents); batch.append((s, s, None))
        loss = lm_loss(model, batch, tok.eos_token_id, a.w_letter)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad()
        if (step + 1) % a.eval_every == 0:
            la, ta = (gen_acc if SCAN else letter_acc)(model, tok, enc, held)
            log(f"step {step+1} loss {loss.item():.3f} letter {100*la:.1f} text {100*ta:.1f} t={time.time()-t0:.0f}s")
    if a.save:
        model.save_pretrained(a.save); tok.save_pretrained(a.save)

if __name__ == "__main__":
    main()
