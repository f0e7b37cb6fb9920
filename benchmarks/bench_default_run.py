"""One configuration of the default run (pretrained EfficientNet-Lite0 on ELPV, published split), as `fastcls train` builds it.

Prints top-1, balanced accuracy and per-class recalls of the plain predictions, of TTA (`--tta`: fastcls's deterministic
`tta_preds`, flip + four corner crops, as `report.html` shows it; runs before this change used fastai's random `learn.tta()`),
and of post-hoc logit adjustment of both (tau 1 is the theory's value; tau 0.5 is also printed, and choosing between them
on the reported set would be optimistic), plus the training wall seconds and CPU seconds (user+system, workers included: on 2 free cores wall ≈ CPU/2).

    flock /tmp/fastcls-cpu.lock python benchmarks/bench_default_run.py --size 160 --epochs 6 --loss ce --aug dihedral
"""
import argparse, time, json, os, warnings
import numpy as np, torch
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from fastai.callback.training import bn_types
from fastcls.cli.core import make_dls, loss_from_name, _with_sampler
from fastcls.data.datasets import elpv_df
from fastcls.learner import cls_learner
import fastcls.predict  # noqa: F401  (Learner.tta_preds)

p = argparse.ArgumentParser()
p.add_argument('--arch', default='tf_efficientnet_lite0'); p.add_argument('--pretrained', default='true')
p.add_argument('--size', type=int, default=128); p.add_argument('--bs', type=int, default=32)
p.add_argument('--epochs', type=int, default=4); p.add_argument('--freeze-epochs', type=int, default=1)
p.add_argument('--lr', type=float, default=2e-3); p.add_argument('--loss', default='ce'); p.add_argument('--sampler', default='none')
p.add_argument('--aug', default='basic', choices=['basic', 'dihedral', 'flips'], help="'flips': only the 8 flips/90° rotations (fastai `Dihedral`), no zoom, warp or lighting"); p.add_argument('--tta', action='store_true')
p.add_argument('--seed', type=int, default=42); p.add_argument('--threads', type=int, default=2)
p.add_argument('--head', default='fastai'); p.add_argument('--pool', default='avg')
p.add_argument('--probe-epochs', type=int, default=0, help='LP-FT: `linear_probe` this many epochs (frozen body in eval mode) before `--epochs` unfrozen ones')
p.add_argument('--probe-lr', type=float, default=1e-2)
p.add_argument('--bn-eval', action='store_true', help='LP-FT: the BatchNorm layers stay in eval mode in the unfrozen epochs (the statistics the probe saw)')
p.add_argument('--probe-cache', action='store_true', help='`linear_probe(cache=True)`: features computed once, without augmentation')
p.add_argument('--no-channels-last', action='store_true', help="keep PyTorch's default memory format (fastcls train uses channels-last on the CPU)")
p.add_argument('--table', help='print the markdown table of a JSON-lines file of earlier runs and exit')
a = p.parse_args()
if a.table:
    print('| size | schedule | head, pool | lr | loss | channels-last | top-1 / balanced | recalls | TTA: top-1 / balanced | post-hoc LA τ=1 | seed | train s (CPU s) |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for l in open(a.table):
        r = json.loads(l); c = r['config']; k = 'tta' if 'tta' in r else 'plain'
        cl = 'no' if c.get('no_channels_last', True) else 'yes'
        tta = f"{r['tta']['top1']} / {r['tta']['balanced']}" + (' (fastai `tta`)' if 'no_channels_last' not in c else '') if 'tta' in r else '–'
        la = r[f'{k}+la1.0']
        if c.get('probe_epochs'):
            sched = f"probe {c['probe_epochs']}{' cached' if c.get('probe_cache') else ' (augmented)'}" + (f" + {c['epochs']} unfrozen" if c['epochs'] else '')
            sched += (' (BatchNorm in eval mode' + (', flips and 90° rotations only)' if c.get('aug') == 'flips' else ')')) if c.get('bn_eval') else ''
        else: sched = f"fine_tune {c['freeze_epochs']} + {c['epochs']}"
        lr = (f"{c['probe_lr']} then {c['lr']}" if c['epochs'] else str(c['probe_lr'])) if c.get('probe_epochs') else c['lr']
        print(f"| {c['size']} | {sched} | {c.get('head', 'fastai')}, {c.get('pool', 'avg')} | {lr} | {c['loss']} | {cl} | "
              f"{r['plain']['top1']} / {r['plain']['balanced']} | {' / '.join(f'{x:.2f}' for x in r['plain']['recalls'])} | {tta} | "
              f"{la['top1']} / {la['balanced']}{' (TTA)' if k == 'tta' else ''} | {c['seed']} | {r['train_s']:.0f} ({r['train_cpu_s']:.0f}) |")
    raise SystemExit
torch.set_num_threads(a.threads)
warnings.filterwarnings('ignore')

class BnEval(Callback):
    "BatchNorm layers in eval mode while training: their running statistics stay those the probe's features were computed with"
    order = 1  # after TrainEvalCallback has put the model in training mode
    def before_train(self):
        for m in self.model.modules():
            if isinstance(m, bn_types): m.eval()

def scores(probs, y, n):
    pred = probs.argmax(1)
    rec = [float((pred[y == c] == c).float().mean()) for c in range(n)]
    return dict(top1=round(100*float((pred == y).float().mean()), 1), balanced=round(100*float(np.mean(rec)), 1), recalls=[round(r, 2) for r in rec])

set_seed(a.seed, reproducible=True)
df = elpv_df()
dls = make_dls(df, a.size, a.bs, a.seed, aug={'dihedral': 'dihedral', 'flips': False}.get(a.aug, True))
if a.aug == 'flips':
    from fastai.vision.augment import Dihedral
    dls.train.after_batch.add(Dihedral(p=1.))
dls = _with_sampler(a.sampler, dls, a.epochs + a.freeze_epochs, a.seed)
pre = {'true': True, 'false': False}.get(a.pretrained.lower(), a.pretrained)
learn = cls_learner(dls, a.arch, pretrained=pre, loss_func=loss_from_name(a.loss, dls), head=a.head, pool=a.pool)
if not a.no_channels_last:
    import fastai.callback.channelslast  # noqa: F401
    learn.to_channelslast(use_amp=False)
cpu = lambda: sum(os.times()[:4])  # user+system of this process and its reaped workers
start,cpu0 = time.time(),cpu()
with learn.no_bar(), learn.no_logging():
    if a.probe_epochs:
        import fastcls.ssl.learner  # noqa: F401  (Learner.linear_probe)
        learn.linear_probe(a.probe_epochs, a.probe_lr, cache=a.probe_cache)
        if a.epochs:
            learn.train_bn = not a.bn_eval; learn.unfreeze()
            learn.fit_one_cycle(a.epochs, slice(a.lr/100, a.lr), cbs=BnEval() if a.bn_eval else None)
    elif pre: learn.fine_tune(a.epochs, a.lr, freeze_epochs=a.freeze_epochs)
    else: learn.fit_one_cycle(a.epochs, a.lr)
train_s,train_cpu = time.time() - start,cpu() - cpu0
with learn.no_bar():
    probs, y = learn.get_preds()
    res = dict(plain=scores(probs, y, dls.c))
    if a.tta:
        t0 = time.time(); tp, _ = learn.tta_preds(); res['tta'] = scores(tp, y, dls.c); res['tta_s'] = round(time.time() - t0, 1)  # fastcls's deterministic TTA (flip + 4 crops), as the report
counts = torch.bincount(torch.tensor([int(t) for t in dls.train_ds.tls[-1]]), minlength=dls.c).float()
prior = (counts/counts.sum()).log()
for k in [k for k in ('plain', 'tta') if k in res]:
    pr = probs if k == 'plain' else tp
    for tau in (0.5, 1.):
        res[f'{k}+la{tau}'] = scores(pr.clamp_min(1e-12).log() - tau*prior, y, dls.c)
print(json.dumps(dict(config=vars(a), train_s=round(train_s, 1), train_cpu_s=round(train_cpu, 1), **res)))
