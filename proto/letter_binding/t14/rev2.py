"""Reverse recall (x_j -> x_{j-1}) mixed with forward recall (x_j -> x_{j+1}), marker token says which."""
import sys, math, random, time, torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
from pmcvqa_sft.models import tiny
lr = float(sys.argv[1]); steps = int(sys.argv[2]); theta = float(sys.argv[3]) if len(sys.argv) > 3 else None
kw = dict(tiny.MODEL_KW)
if theta: kw["rope_theta"] = theta
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=1030, **kw))
opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
g = torch.Generator().manual_seed(0)
t0=time.time()
B, N, Q = 32, 12, 8
for s in range(steps):
    x = torch.randint(10, 1000, (B, N), generator=g)
    x = torch.cat([x, x[:, :1]], 1)  # wrap so j+1 exists
    j = torch.randint(1, N, (B, Q), generator=g)
    rev = torch.rand(B, Q, generator=g) < 0.5
    qs = torch.gather(x, 1, j)
    ans = torch.where(rev, torch.gather(x, 1, j - 1), torch.gather(x, 1, j + 1))
    mark = torch.where(rev, 5, 6)
    qa = torch.stack([qs, mark, ans], 2).view(B, -1)
    ids = torch.cat([x, qa], 1)
    lab = torch.full_like(ids, -100)
    pos = [N + 1 + q * 3 + 2 for q in range(Q)]
    lab[:, pos] = ids[:, pos]
    out = m(input_ids=ids, labels=lab)
    out.loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); sched.step(); opt.zero_grad()
    if (s+1) % 100 == 0:
        with torch.no_grad():
            pred = out.logits[:, [p - 1 for p in pos]].argmax(-1)
            ok = pred == ids[:, pos]
            print(s+1, round(out.loss.item(),3), "fwd acc", round(ok[~rev].float().mean().item(), 3), "rev acc", round(ok[rev].float().mean().item(), 3), f"{time.time()-t0:.0f}s", flush=True)
