"""Overhead of `CutMixUp` per training step, against no mixing, fastai's `CutMix`/`MixUp` and timm's `Mixup`.

Same net, same batch, one process. Each method's overhead is the time of what it adds to a step (mixing the
inputs, and the loss it needs instead of plain cross-entropy) measured on its own over many repetitions; the
step is forward + loss + backward + optimiser step without mixing. Runs are interleaved; medians are kept.

    python benchmarks/bench_mixup.py [--arch resnet18] [--bs 32] [--size 128] [--steps 5] [--reps 50] [--rounds 3] [--device cpu|cuda]
"""
import argparse, statistics, time
import torch
from torch import nn
from fastai.vision.all import Learner, CrossEntropyLossFlat, CutMix, MixUp
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from fastcls.learner import cls_learner
from fastcls.callback.mixup import CutMixUp
from fastcls.test_utils import synth_dls

def sync(x):
    if x.is_cuda: torch.cuda.synchronize()

def timed(f, x, n):
    "Median seconds of `f()` over `n` calls (after one warm-up)"
    f(); ts = []
    for _ in range(n):
        sync(x); t = time.perf_counter(); f(); sync(x); ts.append(time.perf_counter() - t)
    return ts

def step_times(learn, xb, yb, steps):
    model,opt = learn.model,learn.opt
    def step():
        loss = learn.loss_func(model(xb), yb); loss.backward(); opt.step(); opt.zero_grad()
    return timed(step, xb, steps)

def fastai_overhead(cb, dls, xb, yb, pred):
    "fastai callback: `before_batch` (mixes `learn.xb`) + its loss on `pred`"
    learn = Learner(dls, nn.Linear(1, 1), loss_func=CrossEntropyLossFlat())  # holds xb/yb/loss_func for the hooks
    learn.training,learn.pct_train = True,0.
    cb.learn = learn; cb.before_train()
    def f():
        learn.xb,learn.yb = (xb,),(yb,)  # fastai's CutMix pastes into `xb` in place; harmless for timing
        cb.before_batch(); return learn.loss_func(pred, *learn.yb)
    return f

def timm_overhead(mix, xb, yb, pred):
    "timm: `Mixup(x, y)` (in place on `x`, soft targets) + `SoftTargetCrossEntropy`"
    lf = SoftTargetCrossEntropy()
    def f():
        x,y = mix(xb, yb); return lf(pred, y)
    return f

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--arch', default='resnet18'); p.add_argument('--bs', type=int, default=32)
    p.add_argument('--size', type=int, default=128); p.add_argument('--steps', type=int, default=5)
    p.add_argument('--reps', type=int, default=50); p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--device', default='cpu')
    a = p.parse_args()
    torch.manual_seed(0)
    C = 10
    dls = synth_dls(n=64, size=32, n_classes=C, bs=a.bs)
    learn = cls_learner(dls, a.arch, pretrained=False, n_out=C); learn.model.to(a.device); learn.create_opt(); learn.unfreeze()
    learn.model.train()
    xb = torch.randn(a.bs, 3, a.size, a.size, device=a.device); yb = torch.randint(0, C, (a.bs,), device=a.device)
    pred = torch.randn(a.bs, C, device=a.device)
    ce = CrossEntropyLossFlat()
    methods = {
        'plain CE (no mixing)':           lambda: ce(pred, yb),
        'CutMixUp batch':                 fastai_overhead(CutMixUp(mixup_alpha=0.8, cutmix_alpha=1.), dls, xb, yb, pred),
        'CutMixUp elem':                  fastai_overhead(CutMixUp(mixup_alpha=0.8, cutmix_alpha=1., mode='elem'), dls, xb, yb, pred),
        'CutMixUp batch + smoothing 0.1': fastai_overhead(CutMixUp(mixup_alpha=0.8, label_smoothing=0.1), dls, xb, yb, pred),
        'fastai CutMix':                  fastai_overhead(CutMix(1.), dls, xb, yb, pred),
        'fastai MixUp':                   fastai_overhead(MixUp(0.4), dls, xb, yb, pred),
        'timm Mixup batch':               timm_overhead(Mixup(0.8, 1., num_classes=C, label_smoothing=0.1), xb.clone(), yb, pred),
        'timm Mixup elem':                timm_overhead(Mixup(0.8, 1., mode='elem', num_classes=C, label_smoothing=0.1), xb.clone(), yb, pred),
    }
    steps,over = [],{k: [] for k in methods}
    for _ in range(a.rounds):  # interleave so machine noise hits every variant alike
        steps += step_times(learn, xb, yb, a.steps)
        for k,f in methods.items(): over[k] += timed(f, xb, a.reps)
    step = statistics.median(steps)
    base = statistics.median(over['plain CE (no mixing)'])
    print(f"{a.arch}, batch {a.bs} at {a.size}px, {C} classes, {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"training step without mixing (median of {len(steps)}): {step*1000:.1f} ms")
    print(f"{'method':32s} {'mix + loss':>11s} {'overhead':>10s} {'% of step':>10s}")
    for k,v in over.items():
        m = statistics.median(v)
        print(f"{k:32s} {m*1000:9.3f}ms {(m-base)*1000:8.3f}ms {100*(m-base)/step:9.2f}%")
    print("overhead = (mix + loss) - plain CE; goal for CutMixUp: <= 2% of a step")
