"""Training-step time of `cls_learner` against fastai's `vision_learner` and timm's built-in attention variant.

Same net, same batch, one process; the runs are interleaved and the median step time of each is kept.

    python benchmarks/bench_learner.py [--arch resnet50] [--bs 16] [--size 128] [--steps 10] [--device cpu|cuda] [--amp]
"""
import argparse, statistics, time
import torch
from fastai.vision.all import vision_learner
from fastcls.learner import cls_learner
from fastcls.test_utils import synth_dls

def step_time(learn, xb, yb, steps, amp):
    model, opt = learn.model, learn.opt
    model.train()
    times = []
    for i in range(steps + 2):
        if xb.is_cuda: torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(xb.device.type, enabled=amp, dtype=torch.bfloat16):
            loss = learn.loss_func(model(xb), yb)
        loss.backward(); opt.step(); opt.zero_grad()
        if xb.is_cuda: torch.cuda.synchronize()
        if i >= 2: times.append(time.perf_counter() - t)  # two warm-up steps
    return times

def make(kind, dls, arch, attn):
    if kind == 'cls':     return cls_learner(dls, arch, attn=attn, pool='catavgmax', pretrained=False)
    if kind == 'fastai':  return vision_learner(dls, arch, pretrained=False)
    if kind == 'timm':    return vision_learner(dls, arch, pretrained=False, block_args=dict(attn_layer=attn))

def compare(pairs, dls, arch, xb, yb, steps, rounds, amp, device):
    res = {}
    for name,(kind,attn) in pairs.items():
        learn = make(kind, dls, arch, attn); learn.model.to(device); learn.create_opt(); learn.unfreeze()
        res[name] = learn
    times = {k: [] for k in res}
    for _ in range(rounds):  # interleave so machine noise hits every variant alike
        for k,learn in res.items(): times[k] += step_time(learn, xb, yb, steps, amp)
    return {k: statistics.median(v) for k,v in times.items()}

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--arch', default='resnet50'); p.add_argument('--attn', default='se')
    p.add_argument('--bs', type=int, default=16); p.add_argument('--size', type=int, default=128)
    p.add_argument('--steps', type=int, default=5); p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--device', default='cpu'); p.add_argument('--amp', action='store_true')
    a = p.parse_args()
    torch.manual_seed(0)
    dls = synth_dls(n=64, size=a.size, n_classes=4, bs=a.bs)
    xb = torch.randn(a.bs, 3, a.size, a.size, device=a.device); yb = torch.randint(0, 4, (a.bs,), device=a.device)
    t = compare({'fastcls': ('cls', None), 'fastai vision_learner': ('fastai', None),
                 f'fastcls attn={a.attn}': ('cls', a.attn), f'timm attn_layer={a.attn}': ('timm', a.attn)},
                dls, a.arch, xb, yb, a.steps, a.rounds, a.amp, a.device)
    print(f"{a.arch}, batch {a.bs} at {a.size}px, {a.device}{' bf16 autocast' if a.amp else ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median step time of {a.steps*a.rounds} steps")
    for k,v in t.items(): print(f"  {k:28s} {v*1000:8.1f} ms")
    print(f"ratio cls_learner / vision_learner (same net):          {t['fastcls']/t['fastai vision_learner']:.3f}  (goal <= 1.03)")
    print(f"ratio cls_learner attn / timm block_args attn_layer:    {t[f'fastcls attn={a.attn}']/t[f'timm attn_layer={a.attn}']:.3f}  (goal <= 1.05)")
