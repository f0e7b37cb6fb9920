"""ArcFace head vs softmax cross-entropy (linear head) on real data: accuracy and retrieval metrics side by side.

Same arch, data, epochs, seed and one-cycle schedule; random init (no weights can be downloaded here).
Retrieval: leave-one-out on the validation set, cosine similarity of the embedding (the margin head's BNNeck
output, the linear head's input).

    python benchmarks/bench_metric.py [--data digits|elpv] [--arch resnet18] [--epochs 3] [--size 32] [--bs 64]
"""
import argparse, time
import torch
from fastai.metrics import accuracy
from fastcls.learner import cls_learner
from fastcls.data.datasets import digits_dls, elpv_dls
from fastcls.metrics.retrieval import retrieval_scores

def run(dls, arch, head, epochs, lr, **kw):
    torch.manual_seed(0)
    learn = cls_learner(dls, arch, head=head, pretrained=False, metrics=accuracy, **kw)
    t = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    t = time.perf_counter() - t
    acc = float(learn.validate()[1])
    e,y = learn.get_embeddings()
    return {'accuracy': acc, **retrieval_scores(e, y, ks=(1, 5)), 'train_s': t}

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--data', default='digits'); p.add_argument('--arch', default='resnet18')
    p.add_argument('--epochs', type=int, default=3); p.add_argument('--size', type=int, default=32)
    p.add_argument('--bs', type=int, default=64); p.add_argument('--lr', type=float, default=3e-3)
    a = p.parse_args()
    dls = (digits_dls if a.data == 'digits' else elpv_dls)(size=a.size, bs=a.bs)
    res = {'softmax CE (linear head)': run(dls, a.arch, 'linear', a.epochs, a.lr),
           'ArcFace (m=0.5, s=30, embed 128)': run(dls, a.arch, 'arcface', a.epochs, a.lr, embed_dim=128, scale=30.)}
    print(f"{a.data}: {len(dls.train_ds)} train / {len(dls.valid_ds)} valid, {a.arch} random init, {a.size}px, bs {a.bs}, "
          f"{a.epochs} epochs one-cycle lr {a.lr}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    cols = list(next(iter(res.values())))
    print('| head | ' + ' | '.join(cols) + ' |'); print('|' + '---|'*(len(cols)+1))
    for k,v in res.items(): print(f'| {k} | ' + ' | '.join(f'{x:.3f}' if c != 'train_s' else f'{x:.0f}' for c,x in v.items()) + ' |')
