import sys, math, random, time, torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
from pmcvqa_sft.models import tiny
lr = float(sys.argv[1]); kw = dict(tiny.MODEL_KW)
if len(sys.argv) > 2: kw["rope_theta"] = float(sys.argv[2])
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=1030, **kw))
opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
steps=400
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
g = torch.Generator().manual_seed(0)
t0=time.time()
for s in range(steps):
    x = torch.randint(10, 1000, (32, 12), generator=g)
    ids = torch.cat([x, x], 1)
    lab = ids.clone(); lab[:, :13] = -100
    loss = m(input_ids=ids, labels=lab).loss
    loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); sched.step(); opt.zero_grad()
    if (s+1) % 50 == 0: print(s+1, round(loss.item(),3), f"{time.time()-t0:.0f}s", flush=True)
