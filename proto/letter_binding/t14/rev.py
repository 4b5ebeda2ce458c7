import sys, math, random, time, torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
from pmcvqa_sft.models import tiny
lr = float(sys.argv[1]); gap = int(sys.argv[2])  # gap: filler tokens between query and answer
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=1030, **tiny.MODEL_KW))
opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
steps=int(sys.argv[3]) if len(sys.argv) > 3 else 400
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
g = torch.Generator().manual_seed(0)
t0=time.time()
B, N, Q = 32, 12, 8
for s in range(steps):
    x = torch.randint(10, 1000, (B, N), generator=g)
    j = torch.randint(1, N, (B, Q), generator=g)
    qs = torch.gather(x, 1, j); ans = torch.gather(x, 1, j - 1)
    fill = torch.full((B, Q, gap), 5)
    qa = torch.cat([qs[..., None], fill, ans[..., None]], 2).view(B, -1)
    ids = torch.cat([x, qa], 1)
    lab = torch.full_like(ids, -100)
    for q in range(Q):
        p = N + q * (gap + 2) + gap + 1
        lab[:, p] = ids[:, p]
    out = m(input_ids=ids, labels=lab)
    out.loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); sched.step(); opt.zero_grad()
    if (s+1) % 50 == 0: print(s+1, round(out.loss.item(),3), f"{time.time()-t0:.0f}s", flush=True)
