"""Training step on the CPU: channels-last memory format (fastai's `to_channelslast(use_amp=False)`) vs PyTorch's default, one process.

The same `cls_learner` (pretrained tf_efficientnet_lite0 of the installed package, unfrozen, ELPV-sized 4-class head), the
same batches (random, `--bs` x 3 x `--size`²), Adam step included; interleaved rounds, median step time. Depthwise
convolutions (EfficientNet, MobileNet) gain the most.

    python benchmarks/bench_channels_last.py [--archs tf_efficientnet_lite0,resnet18] [--size 128] [--bs 32] [--steps 5] [--rounds 3]
"""
import argparse, statistics, time, warnings
import torch
from fastcls.learner import cls_learner
from fastcls.test_utils import synth_dls

def step_times(learn, xb, yb, steps):
    "Median seconds of `steps` training steps (forward, loss, backward, optimizer step) of `learn`"
    model,opt = learn.model.train(),learn.opt
    ts = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = learn.loss_func(model(xb), yb); loss.backward(); opt.step(); opt.zero_grad()
        ts.append(time.perf_counter() - t)
    return ts[1:]

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--archs', default='tf_efficientnet_lite0,resnet18'); p.add_argument('--size', type=int, default=128)
    p.add_argument('--bs', type=int, default=32); p.add_argument('--steps', type=int, default=5); p.add_argument('--rounds', type=int, default=3)
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.size} px, batch {a.bs}; median of {a.steps*a.rounds} steps")
    print('| arch | default ms | channels-last ms | channels-last / default |\n|---|---|---|---|')
    dls = synth_dls(n=16, size=32, n_classes=4)
    xb,yb = torch.randn(a.bs, 3, a.size, a.size), torch.randint(0, 4, (a.bs,))
    for arch in a.archs.split(','):
        learns = {}
        for k in ('default', 'channels_last'):
            learn = cls_learner(dls, arch, pretrained=arch == 'tf_efficientnet_lite0')
            learn.unfreeze(); learn.create_opt()
            if k == 'channels_last': learn.model.to(memory_format=torch.channels_last)  # what fastai's ChannelsLast does in before_fit
            learns[k] = learn
        ts = {k: [] for k in learns}
        for _ in range(a.rounds):
            for k,l in learns.items(): ts[k] += step_times(l, xb, yb, a.steps)
        d,c = statistics.median(ts['default']), statistics.median(ts['channels_last'])
        print(f"| {arch} | {d*1000:.0f} | {c*1000:.0f} | {c/d:.2f} |", flush=True)

if __name__ == '__main__': main()
