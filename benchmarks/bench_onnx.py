"""CPU latency: ONNX Runtime (the `export_onnx` graph) vs PyTorch eager vs `torch.compile`, batch 1 and 32, one process.

All three run the same `DeployModel` (uint8 input -> scaling, normalisation, model, softmax) of a `cls_learner`
(random init, 1000 classes as ImageNet models, `--size` px). Median of `--iters` timed calls after warm-up, interleaved
per round. Also prints the largest probability difference ORT vs eager.

    flock /tmp/fastcls-cpu.lock python benchmarks/bench_onnx.py [--archs resnet18,mobilenetv3_large_100,efficientnet_b0] [--size 224]
"""
import argparse, statistics, tempfile, time, warnings
from pathlib import Path
import numpy as np, torch
from fastcls.learner import cls_learner
from fastcls.test_utils import synth_dls
from fastcls.onnx import DeployModel
from fastcls.runtime import OnnxClassifier
from fastai.vision.all import Resize

def bench(fns:dict, iters:int) -> dict:
    for f in fns.values(): f(); f()
    ts = {k: [] for k in fns}
    for _ in range(iters):
        for k,f in fns.items(): t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k,v in ts.items()}

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--archs', default='resnet18,mobilenetv3_large_100,efficientnet_b0'); p.add_argument('--size', type=int, default=224)
    p.add_argument('--bss', default='1,32'); p.add_argument('--iters', type=int, default=10); p.add_argument('--no-compile', action='store_true')
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; size {a.size}; median of {a.iters}")
    print('| arch | batch | eager ms | torch.compile ms | ORT ms | ORT / eager | compile / eager | max abs diff |')
    print('|---|---|---|---|---|---|---|---|')
    for arch in a.archs.split(','):
        dls = synth_dls(n=16, size=32, item_tfms=Resize(a.size))
        learn = cls_learner(dls, arch, pretrained=False, head='linear', n_out=1000)
        learn.model.eval()
        fn = learn.export_onnx(Path(tempfile.mkdtemp())/'m.onnx')
        clf,dm = OnnxClassifier(fn),DeployModel.from_learner(learn).eval()
        comp = None if a.no_compile else torch.compile(dm)
        for bs in map(int, a.bss.split(',')):
            x = torch.randint(0, 256, (bs, 3, a.size, a.size), dtype=torch.uint8)
            xn = x.numpy()
            def eager():
                with torch.no_grad(): return dm(x)
            def compiled():
                with torch.no_grad(): return comp(x)
            fns = {'eager': eager, 'ort': lambda: clf(xn)}
            if comp is not None: fns['compile'] = compiled
            t = bench(fns, a.iters if bs == 1 else max(3, a.iters//3))
            diff = float(np.abs(clf(xn) - eager().numpy()).max())
            tc = t.get('compile')
            print(f"| {arch} | {bs} | {t['eager']*1e3:.1f} | {'-' if tc is None else format(tc*1e3, '.1f')} | {t['ort']*1e3:.1f} | "
                  f"{t['ort']/t['eager']:.2f} | {'-' if tc is None else format(tc/t['eager'], '.2f')} | {diff:.1e} |", flush=True)

if __name__ == '__main__': main()
