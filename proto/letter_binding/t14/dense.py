"""Dense binding drill: choices list, then query lines '<text>: <L>' (4 letter predictions per row)."""
import argparse, math, random, time, torch, os
K = int(os.environ.get("K", 4))
torch.set_num_threads(1)
from exp import make_tok, ANSWERS, log
from pmcvqa_sft import prompts
from pmcvqa_sft.models import tiny

def doc(rng, texts=ANSWERS, k=4, nq=4):
    k = K
    ch = rng.sample(texts, k)
    q = [rng.randrange(k) for _ in range(nq)]
    return ch, q

def encode(tok, ch, q, sep):
    head = prompts.format_choices(dict(zip(prompts.LETTERS, ch))) if not FWD else "\n".join(f" {t}{sep}{L}." for L, t in zip(prompts.LETTERS, ch))
    ids = [tok.bos_token_id] + tok(head + "\n", add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    lpos = []
    for g in q:
        a = tok(f"\n {ch[g]}{sep}", add_special_tokens=False)["input_ids"]
        b = tok(prompts.LETTERS[g] + ("." if a_split == 2 else ""), add_special_tokens=False)["input_ids"]
        assert len(b) == 1
        ids += a; labels += a
        lpos.append(len(ids)); ids += b; labels += b
    if a_split == 2: ids += tok("\n", add_special_tokens=False)["input_ids"]; labels = labels + [-100] * (len(ids) - len(labels))
    ids.append(tok.eos_token_id); labels.append(tok.eos_token_id)
    return ids, labels, lpos

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--sep", default=": ")
    ap.add_argument("--split", type=int, default=1)
    ap.add_argument("--single", type=int, default=0)
    ap.add_argument("--fwd", type=int, default=0)
    ap.add_argument("--nq", type=int, default=4)
    ap.add_argument("--bs", type=int, default=16)
    a = ap.parse_args()
    global a_split, FWD; a_split = a.split; FWD = a.fwd
    t0 = time.time(); torch.manual_seed(0)
    tok = make_tok(a.split)
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id, **tiny.MODEL_KW))
    texts = ANSWERS
    if a.single:
        texts = sorted({t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3})
        log(len(texts), texts[:10])
    global doc
    _doc = doc
    doc = lambda r: _doc(r, texts=texts, nq=a.nq)
    rng = random.Random(0)
    hrng = random.Random(99)
    held = [encode(tok, *doc(hrng), a.sep) for _ in range(100)]
    log([tok.convert_ids_to_tokens(x) for x in held[0][0]])
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / a.steps)))
    def batchify(b):
        w = max(len(i) for i, _, _ in b)
        ids = torch.tensor([i + [tok.eos_token_id] * (w - len(i)) for i, _, _ in b])
        lab = torch.tensor([l + [-100] * (w - len(l)) for _, l, _ in b])
        att = torch.tensor([[1] * len(i) + [0] * (w - len(i)) for i, _, _ in b])
        return ids, lab, att
    for step in range(a.steps):
        b = [encode(tok, *doc(rng), a.sep) for _ in range(a.bs)]
        ids, lab, att = batchify(b)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad()
        if (step + 1) % 100 == 0:
            with torch.no_grad():
                ids, lab, att = batchify(held)
                lg = model(input_ids=ids, attention_mask=att).logits
                ok = n = 0
                for r, (_, _, lp) in enumerate(held):
                    for p in lp:
                        ok += int(lg[r, p - 1].argmax().item() == ids[r, p].item()); n += 1
            log(f"step {step+1} loss {loss.item():.3f} letter {100*ok/n:.1f} t={time.time()-t0:.0f}s")

main()
