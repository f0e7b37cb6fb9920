"""Batch prediction (`learn.predict_files`) vs the one-image `learn.predict` loop of the old `fastcls predict`, one process.

Same learner (`--arch`, resnet18 by default, from scratch, as `fastcls train` builds it; 96 px; exported and reloaded with `load_learner`, as
the CLI does), the 656 ELPV validation images of the published split. Reports seconds and the ratio, and checks that both
give the same labels. Also times `predict_files(tta=True)` (flip + four corner crops), and the same model exported with
`export_onnx` and run by onnxruntime (`OnnxClassifier.predict_files`, the path of `fastcls predict --model model.onnx`: on a thread pool,
Pillow decodes and resizes each file once, no torch).

    flock /tmp/fastcls-cpu.lock python benchmarks/bench_predict.py [--arch resnet18] [--size 96] [--bs 64] [--n 656]

`--bs` defaults to what the library picks (`cpu_batch_size` of the input size: 2**19 pixels, 56 images at 96 px, 5 at 300 px);
`--before` also times the previous `predict_files` (batches of 64, contiguous weights), alternating with today's `--rounds` times
(the fastest of each is compared), and the ONNX path at 64, in the same process.

The loop pays fastai's per-call overhead on every image; the batched paths pay the model's forward passes and one decode per
file. So the speed-up is bounded by (loop time) / (batched forward time): the script also times the model alone on the
decoded, batched images (eager PyTorch, and the ONNX graph in onnxruntime) and prints those ceilings.
"""
import argparse, time, tempfile, warnings
from pathlib import Path
import numpy as np, torch
from fastai.learner import load_learner
from fastai.vision.core import PILImage
from fastcls.cli.core import make_dls
from fastcls.data.datasets import elpv_df
from fastcls.learner import cls_learner
import contextlib
import fastcls.predict, fastcls.onnx  # noqa: F401
from fastcls.predict import cpu_channels_last
from fastcls.runtime import OnnxClassifier, cpu_batch_size

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', default='resnet18'); p.add_argument('--size', type=int, default=96); p.add_argument('--bs', type=int, default=None); p.add_argument('--before', action='store_true'); p.add_argument('--rounds', type=int, default=3); p.add_argument('--n', type=int, default=656)
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    df = elpv_df()
    learn = cls_learner(make_dls(df, a.size, 64), a.arch, pretrained=False)
    d = Path(tempfile.mkdtemp()); learn.export(d/'export.pkl')
    learn = load_learner(d/'export.pkl', cpu=True)
    files = df.fname[df.is_valid].tolist()[:a.n]
    bs = cpu_batch_size((a.size, a.size)) if a.bs is None else a.bs
    print(f"{len(files)} ELPV validation images, {a.arch} at {a.size} px, torch threads {torch.get_num_threads()}")
    with learn.no_bar():
        learn.predict(PILImage.create(files[0])); learn.predict_files(files[:bs], bs=a.bs)  # warm-up
        t = time.perf_counter(); loop = [str(learn.predict(PILImage.create(f))[0]) for f in files]; t_loop = time.perf_counter() - t
        t = time.perf_counter(); res = learn.predict_files(files, bs=a.bs); t_batch = time.perf_counter() - t
        t = time.perf_counter(); learn.predict_files(files, bs=a.bs, tta=True); t_tta = time.perf_counter() - t
        if a.before:  # the previous predict_files (batches of 64, the weights as the learner holds them), alternating with today's
            def previous():
                real,fastcls.predict.cpu_channels_last = fastcls.predict.cpu_channels_last,lambda m: contextlib.nullcontext()
                try: t = time.perf_counter(); learn.predict_files(files, bs=64); return time.perf_counter() - t
                finally: fastcls.predict.cpu_channels_last = real
            def today(): t = time.perf_counter(); learn.predict_files(files, bs=a.bs); return time.perf_counter() - t
            t_before,t_again = zip(*[(previous(), today()) for _ in range(a.rounds)])
    learn.export_onnx(d/'model.onnx'); clf = OnnxClassifier(d/'model.onnx')
    clf.predict_files(files[:bs], bs=a.bs)  # warm-up
    t = time.perf_counter(); ores = clf.predict_files(files, bs=a.bs); t_onnx = time.perf_counter() - t
    if a.before: t = time.perf_counter(); clf.predict_files(files, bs=64); t_onnx_before = time.perf_counter() - t
    dl = learn.dls.test_dl(files, bs=bs); xbs = [b[0] for b in dl]  # decoded, resized, normalised: what the model sees
    learn.model.eval()
    with torch.no_grad(), cpu_channels_last(learn.model):
        learn.model(xbs[0])  # warm-up
        t = time.perf_counter()
        for xb in xbs: learn.model(xb)
        t_model = time.perf_counter() - t
    oxs = [np.stack([clf.load(f)[0] for f in files[i:i+bs]]) for i in range(0, len(files), bs)]  # decoded, resized
    t = time.perf_counter()
    for x in oxs: clf(x)
    t_ort = time.perf_counter() - t
    same = float(np.mean(np.array(loop) == res.label.values))
    print(f"one-image loop (old fastcls predict) : {t_loop:7.2f} s  ({len(files)/t_loop:6.1f} img/s)")
    print(f"predict_files bs={bs:<3}               : {t_batch:7.2f} s  ({len(files)/t_batch:6.1f} img/s)  speed-up {t_loop/t_batch:.1f}x")
    if a.before:
        print(f"  alternating {a.rounds} rounds, previous (bs=64, contiguous): {' / '.join(f'{x:.2f}' for x in t_before)} s, today's: "
              f"{' / '.join(f'{x:.2f}' for x in t_again)} s; fastest: {t_loop/min(t_before):.1f}x against {t_loop/min(t_again):.1f}x the loop, "
              f"today's {min(t_before)/min(t_again):.2f}x faster")
    print(f"predict_files tta=True (6 passes)    : {t_tta:7.2f} s  ({t_tta/t_batch:.1f}x the plain batch run)")
    print(f"ONNX Runtime predict_files bs={bs:<3}  : {t_onnx:7.2f} s  ({len(files)/t_onnx:6.1f} img/s)  speed-up {t_loop/t_onnx:.1f}x")
    if a.before: print(f"ONNX Runtime predict_files bs=64   : {t_onnx_before:7.2f} s  speed-up {t_loop/t_onnx_before:.1f}x")
    print(f"the model alone, eager channels-last, bs={bs:<3}: {t_model:7.2f} s  (ceiling of predict_files: {t_loop/t_model:.1f}x the loop)")
    print(f"the ONNX graph alone, bs={bs:<3}       : {t_ort:7.2f} s  (ceiling of the ONNX path: {t_loop/t_ort:.1f}x the loop)")
    print(f"same labels: predict_files {same:.1%}, ONNX Runtime {np.mean(np.array(loop) == ores.label.values):.1%}")

if __name__ == '__main__': main()
