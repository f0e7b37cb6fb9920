"""Self-supervised pretraining (issue 16): k-NN accuracy per SSL epoch per method, then fine-tuning vs training from scratch.

    flock /tmp/fastcls-cpu.lock python benchmarks/bench_ssl.py --data elpv --size 32 --ssl-epochs 2 --ft-epochs 2 --methods scratch,simclr,byol --out benchmarks/ssl/elpv.jsonl
    flock /tmp/fastcls-cpu.lock python benchmarks/bench_ssl.py --data digits10 --size 32 --ssl-epochs 2 --ft-epochs 2 --methods scratch,simclr,byol --out benchmarks/ssl/digits10.jsonl
    (all methods: --methods scratch,simclr,mocov2,byol,simsiam,dino; more epochs: --ssl-epochs/--ft-epochs)
    python benchmarks/bench_ssl.py --table benchmarks/ssl/*.jsonl

ELPV: the published split; pretraining sees the training images only, without their labels (`ssl_dls` of the labelled
DataLoaders). The k-NN metric (cosine, k=200, T=0.1) uses the training labels as its bank and the test split as queries.
digits10: SSL on all training images, labels of a stratified 10 % of them for k-NN and fine-tuning.
Rows: `scratch` = `cls_learner(pretrained=False).fit_one_cycle(ssl_epochs + ft_epochs)`; `METHOD` = `ssl_learner(METHOD)
.fit_one_cycle(ssl_epochs)` then `cls_learner(pretrained=ssl_learn).fine_tune(ft_epochs-1, freeze_epochs=1)`: the
same number of epochs in total (an SSL epoch costs more: two or more views, a teacher; wall seconds are recorded).
Rows (c)/(d) of the issue: `imagenet` = `cls_learner(pretrained=True).fine_tune(ssl_epochs + ft_epochs - 1, freeze_epochs=1)`
(the ImageNet weights of the installed source: use `--arch tf_efficientnet_lite0`); `imagenet+METHOD` = `ssl_learner(METHOD,
pretrained=True)` for `ssl_epochs` (domain-adaptive pretraining on ELPV from ImageNet weights), then the same fine-tuning as
`METHOD`. Run all rows with the same `--arch` to compare (a)-(d) on one network.
"""
import argparse, json, time, warnings
from pathlib import Path
import numpy as np, torch
from fastai.vision.all import set_seed, accuracy, ImageDataLoaders, Resize, aug_transforms
from fastcls.data.datasets import elpv_df, digits_df
from fastcls.ssl.data import ssl_dls
from fastcls.ssl.learner import ssl_learner
from fastcls.learner import cls_learner
from fastcls.metrics.longtail import balanced_acc

METHOD_KW = dict(simclr={}, mocov2={}, byol={}, simsiam={}, dino=dict(out_dim=4096))  # DINO: 4096 outputs instead of 65536 (CPU)

def make_dls(df, size, bs, aug, seed):
    return ImageDataLoaders.from_df(df, path='/', fn_col='fname', label_col='label', valid_col='is_valid', bs=bs, seed=seed,
                                    item_tfms=Resize(size), batch_tfms=aug_transforms() if aug else None)

def frames(data, seed):
    "(all images for SSL, labelled frame for k-NN/fine-tuning, augment?)"
    if data == 'elpv': df = elpv_df(); return df, df, True
    if data == 'digits10':
        df = digits_df(seed=seed)
        rng = np.random.default_rng(seed)
        keep = df.is_valid.copy()
        for _,g in df[~df.is_valid].groupby('label'): keep[rng.choice(g.index, max(1, round(len(g)*0.1)), replace=False)] = True
        return df, df[keep].reset_index(drop=True), False
    raise ValueError(f"--data {data!r}: elpv or digits10")

def scores(learn):
    with learn.no_bar(): p,t = learn.get_preds()
    return dict(top1=float((p.argmax(1) == t).float().mean()), balanced=float(balanced_acc(p, t)))

def main(a):
    torch.set_num_threads(a.threads)
    allf,lab,aug = frames(a.data, a.seed)
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    def emit(row):
        row = dict(data=a.data, arch=a.arch, size=a.size, bs=a.bs, ssl_epochs=a.ssl_epochs, ft_epochs=a.ft_epochs, n_labelled=int((~lab.is_valid).sum()), **row)
        print(json.dumps(row), flush=True)
        with open(out, 'a') as f: f.write(json.dumps(row) + '\n')
    for m in a.methods.split(','):
        set_seed(a.seed, reproducible=True)
        t0 = time.time()
        if m == 'imagenet':  # (c): ImageNet weights, fine-tuned for the whole budget
            learn = cls_learner(make_dls(lab, a.size, a.bs, aug, a.seed), a.arch, pretrained=True, metrics=accuracy)
            with learn.no_bar(), learn.no_logging(): learn.fine_tune(a.ssl_epochs + a.ft_epochs - 1, a.lr, freeze_epochs=1)
            emit(dict(method='imagenet', **scores(learn), wall_s=round(time.time()-t0)))
            continue
        init, _, meth = m.rpartition('+')  # 'imagenet+simclr': (d), SSL from the ImageNet weights
        if init not in ('', 'imagenet'): raise ValueError(f"--methods {m!r}: METHOD or imagenet+METHOD")
        if m == 'scratch':
            learn = cls_learner(make_dls(lab, a.size, a.bs, aug, a.seed), a.arch, pretrained=False, metrics=accuracy)
            with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(a.ssl_epochs + a.ft_epochs, a.lr)
            emit(dict(method='scratch', **scores(learn), wall_s=round(time.time()-t0)))
            continue
        knn = make_dls(lab, a.size, a.bs, False, a.seed)
        sdls = ssl_dls(make_dls(allf, a.size, a.bs, False, a.seed), size=a.size, bs=a.bs, seed=a.seed)
        sl = ssl_learner(sdls, a.arch, meth, knn_dls=knn, pretrained=init == 'imagenet', **METHOD_KW[meth])
        with sl.no_bar(), sl.no_logging(): sl.fit_one_cycle(a.ssl_epochs, a.ssl_lr)
        t1 = time.time()
        knn_curve = [round(v[3], 4) for v in sl.recorder.values]
        std_curve = [round(v[2], 3) for v in sl.recorder.values]
        clf = cls_learner(make_dls(lab, a.size, a.bs, aug, a.seed), a.arch, pretrained=sl, metrics=accuracy)
        with clf.no_bar(), clf.no_logging(): clf.fine_tune(a.ft_epochs - 1, a.lr, freeze_epochs=1)
        emit(dict(method=m, **scores(clf), knn_per_epoch=knn_curve, emb_std_per_epoch=std_curve,
                  ssl_loss=round(sl.recorder.values[-1][0], 4), ssl_wall_s=round(t1-t0), wall_s=round(time.time()-t0)))

def table(files):
    for fn in files:
        rows = [json.loads(l) for l in open(fn)]
        if not rows: continue
        r0 = rows[0]
        print(f"\n{r0['data']}, {r0['arch']} {r0['size']} px, {r0['ssl_epochs']} SSL + {r0['ft_epochs']} fine-tune epochs ({r0['n_labelled']} labelled training images)\n")
        print('| run | k-NN acc. per SSL epoch | emb_std per epoch | fine-tuned top-1 | balanced acc. | wall s (SSL) |\n|---|---|---|---|---|---|')
        for r in rows:
            knn = ' → '.join(f'{v:.1%}' for v in r.get('knn_per_epoch', [])) or '–'
            std = ' → '.join(f'{v:.2f}' for v in r.get('emb_std_per_epoch', [])) or '–'
            print(f"| {r['method']} | {knn} | {std} | {r['top1']:.1%} | {r['balanced']:.1%} | {r['wall_s']} ({r.get('ssl_wall_s', '–')}) |")

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--data', default='elpv'); p.add_argument('--methods', default='scratch,simclr,mocov2,byol,simsiam,dino')
    p.add_argument('--arch', default='resnet18'); p.add_argument('--size', type=int, default=48); p.add_argument('--bs', type=int, default=64)
    p.add_argument('--ssl-epochs', type=int, default=3); p.add_argument('--ft-epochs', type=int, default=3)
    p.add_argument('--lr', type=float, default=2e-3); p.add_argument('--ssl-lr', type=float, default=1e-3)
    p.add_argument('--seed', type=int, default=42); p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', default='benchmarks/ssl/elpv.jsonl'); p.add_argument('--table', nargs='*')
    a = p.parse_args()
    if a.table: table(a.table)
    else:
        warnings.filterwarnings('ignore')
        main(a)
