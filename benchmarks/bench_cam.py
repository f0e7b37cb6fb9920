"""fastcls `learn.cam` vs pytorch-grad-cam `GradCAM` on the same timm resnet50, batch and target layer, one process.

Times one inference forward pass (eval, no_grad), fastcls Grad-CAM and pytorch-grad-cam 1.5.7 GradCAM, interleaved
over `--rounds` rounds (the order rotates each round) after one warm-up call of each; prints the medians and ratios.

    flock /tmp/fastcls_heavy.lock python benchmarks/bench_cam.py [--arch resnet50] [--bs 16] [--size 224] [--rounds 7] [--device cpu|cuda]
"""
import argparse, time, statistics, platform
import torch
from fastcls.learner import cls_learner
from fastcls.test_utils import synth_dls, pretrained_like
import fastcls.interpret
from pytorch_grad_cam import GradCAM

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', default='resnet50'); p.add_argument('--bs', type=int, default=16)
    p.add_argument('--size', type=int, default=224); p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--device', default='cpu')
    a = p.parse_args()
    torch.manual_seed(0)
    learn = cls_learner(synth_dls(n=32, size=32), a.arch, pretrained=False, head='linear', n_out=1000)
    model = pretrained_like(learn.model).to(a.device).eval()  # non-zero residual branches, as a trained model
    x = torch.randn(a.bs, 3, a.size, a.size, device=a.device)
    sync = torch.cuda.synchronize if a.device.startswith('cuda') else (lambda: None)
    pgc = GradCAM(model, [model[0].model.layer4])
    def forward():
        with torch.no_grad(): model(x)
    runs = {'forward': forward, 'fastcls gradcam': lambda: learn.cam(x), 'pytorch-grad-cam GradCAM': lambda: pgc(x, targets=None)}
    times = {k: [] for k in runs}
    names = list(runs)
    for k in names: runs[k]()  # warm-up
    for r in range(a.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            sync(); t = time.perf_counter(); runs[k](); sync()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k,v in times.items()}
    print(f"{a.arch}, batch {a.bs} at {a.size} px, {a.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, median of {a.rounds} interleaved rounds")
    for k,v in med.items(): print(f"  {k:26s} {v:7.3f} s   (min {min(times[k]):.3f}, max {max(times[k]):.3f})")
    f,c,g = med['forward'], med['fastcls gradcam'], med['pytorch-grad-cam GradCAM']
    print(f"  fastcls / forward          {c/f:7.2f}x   (goal <= 1.25x)")
    print(f"  pytorch-grad-cam / fastcls {g/c:7.2f}x   (goal >= 3x)")
    # both give the same maps
    ref,ours = pgc(x[:2], targets=None), learn.cam(x[:2]).cpu().numpy()
    print(f"  max |fastcls - pytorch-grad-cam| on 2 images: {abs(ref - ours).max():.4f}")

if __name__ == '__main__': main()
