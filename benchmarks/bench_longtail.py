"""Long-tail methods side by side: same backbone, size, epochs and schedule; accuracy, balanced accuracy, per-class recall.

    python benchmarks/bench_longtail.py --data elpv --epochs 8 --size 96 --out benchmarks/longtail/elpv96.jsonl
    python benchmarks/bench_longtail.py --data digits10 --epochs 8 --size 32 --bs 16 --out benchmarks/longtail/digits10.jsonl
    python benchmarks/bench_longtail.py --data digits50 --epochs 8 --size 32 --bs 16 --out benchmarks/longtail/digits50.jsonl
    python benchmarks/bench_longtail.py --table benchmarks/longtail/*.jsonl   # markdown tables
    python benchmarks/bench_longtail.py --design-table FILES                  # the design's Backbone | Attn | Loss | Top-1 | Balanced table

Every method trains `--arch` (default `resnet18`) from scratch (`pretrained=False`) with `fit_one_cycle(epochs, lr)` and the data's
default augmentation (ELPV: fastai's `aug_transforms`). With `--pretrained` (e.g. `--arch tf_efficientnet_lite0 --pretrained`, the
ImageNet weights of the installed package) every method fine-tunes instead: `fine_tune(epochs - 1, lr, freeze_epochs=1)`, the
setting decoupling, LA and BBN were designed for; the `fastai` peer is then skipped (fastai's `vision_learner` can only get
timm weights from the hub, unreachable offline). `label_smoothing` is CE with label smoothing 0.1. `crt`, `lws`, `tau_norm*` and `posthoc_la` start from
the plain-CE model of the same run (`ce` must run first): cRT and LWS add `--crt-epochs` head-only epochs at `--crt-lr` (class-balanced sampler); τ-norm and
post-hoc LA add no training. `tau_norm_val` searches τ on the validation set it is scored on (optimistic).
`X_sampler` is plain CE on a training set drawn by `samplers['X']`.
`--attn NAME` inserts that attention (fastcls `attn=`) into the backbone of every method (the `fastai` peer is then skipped).
`fastai` is the peer: fastai's own `vision_learner` with its default loss, the issue's baseline recipe.
BBN does two forward/backward passes per step (uniform + reversed batch). One line of JSON per method is
appended to `--out` as soon as it finishes.
"""
import argparse, json, time, warnings
import torch
from fastai.vision.all import set_seed, accuracy, CrossEntropyLossFlat, vision_learner
from fastcls.data.datasets import elpv_dls, digits_dls
from fastcls.learner import cls_learner
from fastcls.losses.longtail import losses, class_counts
from fastcls.data.samplers import samplers
from fastcls.metrics.longtail import class_recall, balanced_acc
from fastcls.callback.longtail import DRW, bbn_learner, CumulativeLearning

ARCH, PRETRAINED, ATTN = 'resnet18', False, None
ALL = 'fastai,ce,label_smoothing,posthoc_la,tau_norm,tau_norm_val,crt,lws,balanced_softmax,ldam_drw,bbn,logit_adjusted,cb,focal,class_balanced_sampler,sqrt_sampler'

def get_dls(data, size, bs):
    if data == 'elpv': return elpv_dls(size=size, bs=bs)
    if data.startswith('digits'): return digits_dls(size=size, bs=bs, imbalance=float(data[6:]))
    raise ValueError(f"unknown --data {data!r}: elpv, digits10, digits50, ...")

def train(dls, method, epochs, lr):
    "A trained learner for a method that trains from scratch"
    if method == 'fastai':  # the peer: plain fastai, the baseline recipe
        learn = vision_learner(dls, ARCH, pretrained=PRETRAINED, metrics=accuracy)
        cbs = []
    kw = dict(pretrained=PRETRAINED, attn=ATTN, metrics=accuracy)
    if method == 'fastai': pass
    elif method == 'bbn':
        learn = bbn_learner(dls, ARCH, **kw)
        cbs = [CumulativeLearning()]
    elif method == 'ldam_drw':
        learn = cls_learner(dls, ARCH, head='normed_linear', loss_func=losses['ldam'](dls), **kw)
        cbs = [DRW()]
    elif method.endswith('_sampler'):  # plain CE, training set drawn by a sampler of `fastcls.samplers`
        learn = cls_learner(samplers[method[:-len('_sampler')]](dls, seed=42), ARCH, **kw)
        cbs = []
    elif method == 'label_smoothing':
        learn = cls_learner(dls, ARCH, loss_func=CrossEntropyLossFlat(label_smoothing=0.1), **kw)
        cbs = []
    else:
        learn = cls_learner(dls, ARCH, loss_func=None if method == 'ce' else losses[method](dls), **kw)
        cbs = []
    with learn.no_bar(), learn.no_logging():
        if PRETRAINED: learn.fine_tune(epochs - 1, lr, freeze_epochs=1, cbs=cbs)
        else: learn.fit_one_cycle(epochs, lr, cbs=cbs)
    return learn

def from_ce(dls, method, ce_state, a):
    "A method applied to the plain-CE model"
    learn = cls_learner(dls, ARCH, pretrained=PRETRAINED, attn=ATTN, metrics=accuracy)
    learn.model.load_state_dict(ce_state)
    learn.unfreeze()
    with learn.no_bar(), learn.no_logging():
        if method == 'posthoc_la': learn.posthoc_la(1.)
        elif method == 'tau_norm': learn.tau_norm(1., force=True)
        elif method == 'tau_norm_val': learn.tau_norm(None, force=True)
        elif method == 'crt': learn.crt(a.crt_epochs, a.crt_lr, force=True, seed=a.seed)
        elif method == 'lws': learn.lws(a.crt_epochs, a.crt_lr, force=True, seed=a.seed)
        else: raise ValueError(method)
    return learn

def evaluate(learn, dls):
    with learn.no_bar(): preds,targs = learn.get_preds(dl=dls.valid)
    r = class_recall(preds, targs, len(dls.vocab))
    return dict(acc=float((preds.argmax(1) == targs).float().mean()), bal_acc=float(balanced_acc(preds, targs)),
                recall=[round(float(x), 3) for x in r])

def run(a):
    global ARCH, PRETRAINED, ATTN
    ARCH, PRETRAINED, ATTN = a.arch, a.pretrained, a.attn
    if (PRETRAINED or ATTN) and 'fastai' in a.methods.split(','): a.methods = ','.join(m for m in a.methods.split(',') if m != 'fastai')
    torch.set_num_threads(a.threads)
    warnings.filterwarnings('ignore')
    dls = get_dls(a.data, a.size, a.bs)
    counts = class_counts(dls).tolist()
    ce_state = None
    for m in a.methods.split(','):
        set_seed(a.seed)
        t = time.time()
        if m in ('posthoc_la', 'tau_norm', 'tau_norm_val', 'crt', 'lws'):
            if ce_state is None: raise SystemExit(f"{m} needs 'ce' earlier in --methods")
            learn = from_ce(dls, m, ce_state, a)
        else: learn = train(dls, m, a.epochs, a.lr)
        if m == 'ce': ce_state = {k: v.clone() for k,v in learn.model.state_dict().items()}
        res = dict(data=a.data, method=m, arch=ARCH, attn=ATTN, pretrained=PRETRAINED, size=a.size, bs=a.bs, epochs=a.epochs, lr=a.lr, seed=a.seed, crt_epochs=a.crt_epochs, crt_lr=a.crt_lr,
                   vocab=list(map(str, dls.vocab)), train_counts=counts, **evaluate(learn, dls), seconds=round(time.time() - t))
        if m == 'tau_norm_val': res['tau'] = learn.model[1][1][-1].tau if hasattr(learn.model[1][1][-1], 'tau') else None
        print(json.dumps(res), flush=True)
        if a.out:
            with open(a.out, 'a') as f: f.write(json.dumps(res) + '\n')

def table(paths):
    rows = [json.loads(l) for p in paths for l in open(p) if l.strip()]
    setup = lambda r: (r['data'], r['arch'], r.get('attn'), r.get('pretrained', False), r['size'], r.get('bs', 64), r['epochs'], r['lr'], r['seed'])  # one table per setup
    for key in dict.fromkeys(map(setup, rows)):
        rs = [r for r in rows if setup(r) == key]
        r0 = rs[0]
        how = 'pretrained, `fine_tune(%d, freeze_epochs=1)`' % (r0['epochs'] - 1) if r0.get('pretrained') else "from scratch, %d epochs `fit_one_cycle`" % r0['epochs']
        print(f"\n**{r0['data']}** ({r0['arch']}{' + ' + r0['attn'] if r0.get('attn') else ''} {how}, {r0['size']} px, bs {r0.get('bs', 64)}, lr {r0['lr']}, seed {r0['seed']}; "
              f"train counts {dict(zip(r0['vocab'], r0['train_counts']))})\n")
        peer = next((r for r in rs if r['method'] == 'fastai'), None)  # ratios against plain fastai when it ran
        vs = lambda r, k: f"{r[k]/peer[k]:.2f}" if peer else '–'
        print('| method | accuracy | balanced acc. | per-class recall | min recall | accuracy / fastai | balanced / fastai | time (s) |')
        print('|---|---|---|---|---|---|---|---|')
        for r in rs:
            print(f"| {r['method']}{' (τ=%.1f)' % r['tau'] if r.get('tau') is not None else ''} | {r['acc']*100:.1f} | {r['bal_acc']*100:.1f} | "
                  f"{', '.join(f'{x:.2f}' for x in r['recall'])} | {min(r['recall']):.2f} | {vs(r, 'acc')} | {vs(r, 'bal_acc')} | {r['seconds']} |")

def design_table(paths):
    "The design document's results table: one row per (backbone, attention, loss) of the given runs"
    rows = [json.loads(l) for p in paths for l in open(p) if l.strip()]
    print('| Backbone | Attn | Loss / method | Top-1 | Balanced | min recall | epochs, px |\n|---|---|---|---|---|---|---|')
    for r in rows:
        bb = f"{r['arch']}{' (ImageNet)' if r.get('pretrained') else ' (scratch)'}"
        print(f"| {bb} | {r.get('attn') or '–'} | {r['method']} | {r['acc']*100:.1f} | {r['bal_acc']*100:.1f} | {min(r['recall']):.2f} | {r['epochs']}, {r['size']} |")

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--data', default='elpv'); p.add_argument('--methods', default=ALL)
    p.add_argument('--arch', default=ARCH); p.add_argument('--pretrained', action='store_true')
    p.add_argument('--attn', default=None, help='attention inserted into the backbone of every method (fastcls `attn=`)')
    p.add_argument('--epochs', type=int, default=8); p.add_argument('--size', type=int, default=96)
    p.add_argument('--bs', type=int, default=64); p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--crt-epochs', type=int, default=2); p.add_argument('--crt-lr', type=float, default=1e-2); p.add_argument('--seed', type=int, default=42)
    p.add_argument('--threads', type=int, default=2); p.add_argument('--out', default=None)
    p.add_argument('--design-table', nargs='+', default=None, help='print the Backbone | Attn | Loss table from these files and exit')
    p.add_argument('--table', nargs='+', default=None, help='print a markdown table from these JSON-lines files and exit')
    a = p.parse_args()
    design_table(a.design_table) if a.design_table else table(a.table) if a.table else run(a)
