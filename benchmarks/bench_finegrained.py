"""Fine-grained poolings on ELPV (published split): avg vs GeM vs bilinear vs WS-DAN at equal epochs.

Same backbone (random init: no pretrained weights offline), data, seed, epochs and one-cycle schedule for
every variant; accuracy and balanced accuracy on the published 25% test split. For WS-DAN the test-time
full+crop average is the reported number; its full-image-only accuracy is reported too.

    python benchmarks/bench_finegrained.py [--arch resnet18] [--size 64] [--epochs 6] [--bs 64] [--lr 3e-3]
        [--pools avg,gem,bilinear,wsdan] [--tiny] [--out results.json]
"""
import argparse, json, time
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner)
from fastcls.data.datasets import elpv_dls
from fastcls.learner import cls_learner
from fastcls.callback.wsdan import wsdan_learner
from fastcls.test_utils import synth_dls

def make(kind, dls, arch, seed):
    torch.manual_seed(seed)
    if kind == 'wsdan': return wsdan_learner(dls, arch, M=32, pretrained=False, seed=seed)
    return cls_learner(dls, arch, pool=kind, pretrained=False)

def scores(learn):
    with learn.no_bar(): p,y = learn.get_preds()
    p = p.argmax(1)
    return dict(acc=accuracy_score(y, p), bal_acc=balanced_accuracy_score(y, p))

def run(kind, dls, args):
    learn = make(kind, dls, args.arch, args.seed)
    t = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(args.epochs, args.lr)
    res = dict(pool=kind, train_s=round(time.perf_counter() - t, 1), n_params=sum(p.numel() for p in learn.model.parameters()),
               **scores(learn))
    if kind == 'gem': res['gem_p'] = learn.model[1][0].p.item()
    if kind == 'wsdan':
        learn.wsdan.test_crop = False
        res.update({f'{k}_full_only': v for k,v in scores(learn).items()})
    return res

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--arch', default='resnet18'); ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--epochs', type=int, default=6); ap.add_argument('--bs', type=int, default=64)
    ap.add_argument('--lr', type=float, default=3e-3); ap.add_argument('--seed', type=int, default=42)
    ap.add_argument('--pools', default='avg,gem,bilinear,wsdan'); ap.add_argument('--out', default=None)
    ap.add_argument('--tiny', action='store_true', help='synthetic data, 1 epoch: checks the script runs')
    args = ap.parse_args()
    if args.tiny: args.epochs, dls = 1, synth_dls(n=32, size=64, n_classes=2, bs=8)
    else: dls = elpv_dls(size=args.size, bs=args.bs, seed=args.seed)
    print(f"{args.arch} {args.size}px {args.epochs} epochs lr {args.lr} bs {args.bs} threads {torch.get_num_threads()}", flush=True)
    results = []
    for kind in args.pools.split(','):
        results.append(run(kind, dls, args))
        print(json.dumps(results[-1]), flush=True)
        if args.out: json.dump(dict(args=vars(args), results=results), open(args.out, 'w'), indent=1)
