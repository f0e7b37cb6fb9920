"""Variants of the default run's cached probe (issue 19): multi-stage features, bigger EfficientNet-Lites, class-balanced sampling.

    flock /tmp/fastcls-cpu.lock env PYTHONPATH=. python benchmarks/bench_probe_features.py --out benchmarks/default_run/probe_features.jsonl
    flock /tmp/fastcls-cpu.lock env PYTHONPATH=. python benchmarks/bench_probe_features.py --archs tf_efficientnet_lite0 --samplers instance --size 448 --out benchmarks/default_run/probe_features.jsonl
    python benchmarks/bench_probe_features.py --table benchmarks/default_run/probe_features.jsonl

The default run (`fastcls train`, BENCHMARKS.md §8) trains fastai's head 10 epochs (lr 1e-2, batches of 64, CE) on the
catavgmax-pooled features of the frozen ImageNet tf_efficientnet_lite0 at 300 px, computed once with the validation transforms
(`linear_probe(10, cache=True)`). For each backbone of `--archs` this script runs the default run's DataLoaders (`make_dls`,
ELPV published split, `--size` px) through the frozen network once, keeping the head's input (`last`: the last stage after
`conv_head`, catavgmax-pooled, exactly what the cached probe trains on) and the catavgmax-pooled outputs of the stride-16 (`s16`) and
stride-8 (`s8`) stages. Then, per feature set, per sampler and per seed, it trains the same head the same way and scores the
validation cells (top-1, balanced accuracy, recalls; also after post-hoc logit adjustment τ = 1, and with the ordinal median
decision: the classes are ordered defect probabilities, and the median class of the predicted distribution is the choice of least
expected class distance). Feature sets: `last` (the default
run, reproduced), `last+s16`, `last+s16+s8`, and the `last` features of all `--archs` concatenated. Samplers: `instance` (the
default: every cell once per epoch) and `class_balanced` (cRT's sampler: each class drawn equally often, fastcls's `ClassSamplerDL`
with q = 0, the same number of draws per epoch). One JSON line per (backbone, feature set, sampler, seed) is appended to `--out`;
extraction times are lines of kind 'features'.
"""
import argparse, json, time, warnings
from pathlib import Path
import numpy as np, torch
import fastai.callback.channelslast  # noqa: F401  (Learner.to_channelslast)
from fastai.vision.all import DataLoaders, Learner, TfmdDL, CrossEntropyLossFlat, set_seed
from fastcls.cli.core import make_dls
from fastcls.data.datasets import elpv_df
from fastcls.data.samplers import ClassSamplerDL
from fastcls.layers.heads import heads
from fastcls.learner import cls_learner
from fastcls.models import _classifier

warnings.filterwarnings('ignore')

def catavgmax(x): return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)

def extract(arch, size, seed):
    "{'last', 's16', 's8'} features and the targets of the training and validation cells of the default run's DataLoaders"
    set_seed(seed, reproducible=True)
    dls = make_dls(elpv_df(), size, 32, seed, aug='dihedral')
    learn = cls_learner(dls, arch, pretrained=True, pool='catavgmax', head='fastai')
    learn.to_channelslast(use_amp=False)
    timm_model = learn.model[0].model
    stage = {f['reduction']: f['module'] for f in timm_model.feature_info}
    res, t0 = {}, time.time()
    for split, dl in (('train', dls.test_dl(dls.train_ds.items, with_labels=True, bs=dls.valid.bs)), ('valid', dls.valid)):
        feats = {k: [] for k in ('last', 's16', 's8')}
        hooks = [_classifier(learn.model)[1].register_forward_hook(lambda m,i,o: feats['last'].append(i[0].detach().float()))]
        for k,r in (('s16', 16), ('s8', 8)):
            hooks.append(timm_model.get_submodule(stage[r]).register_forward_hook(lambda m,i,o,k=k: feats[k].append(catavgmax(o.detach().float()))))
        try:
            with learn.no_bar(): _,y = learn.get_preds(dl=dl)
        finally:
            for h in hooks: h.remove()
        res[split] = {k: torch.cat(v) for k,v in feats.items()}, y
    return res, round(time.time() - t0, 1), list(dls.vocab)

def argmax(logits): return logits.argmax(1)
def ordinal_median(logits):
    "The median class of the predicted distribution: the classes are ordered (defect probability 0, 1/3, 2/3, 1), and the median is the decision of least expected |class distance|"
    return (logits.softmax(1).cumsum(1) < 0.5).sum(1).clamp(max=logits.shape[1] - 1)

def scores(logits, y, prior):
    out = {}
    la = logits.log_softmax(1) - prior.log()
    for k,lg,decide in (('plain', logits, argmax), ('la', la, argmax), ('median', logits, ordinal_median), ('la_median', la, ordinal_median)):
        pred = decide(lg)
        rec = [float((pred[y == c] == c).float().mean()) for c in range(len(prior))]
        out[k] = dict(top1=round(100*float((pred == y).float().mean()), 1), balanced=round(100*float(np.mean(rec)), 1),
                      recalls=[round(r, 2) for r in rec])
    return out

def fit_head(xt, yt, xv, yv, sampler, seed, epochs=10, lr=1e-2, bs=64):
    "fastai's head trained as `linear_probe(cache=True)` trains it, with `sampler`'s training order; the validation logits"
    set_seed(seed, reproducible=True)
    trn, val = list(zip(xt, yt)), list(zip(xv, yv))
    train_dl = ClassSamplerDL(trn, labels=yt, q=0., seed=seed, bs=bs, shuffle=True, drop_last=True) if sampler == 'class_balanced' \
               else TfmdDL(trn, bs=bs, shuffle=True, drop_last=True)
    dls = DataLoaders(train_dl, TfmdDL(val, bs=bs))
    learn = Learner(dls, heads['fastai'](xt.shape[1], int(yt.max()) + 1), loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    learn.model.eval()
    with torch.no_grad(): return learn.model(xv)

def read_rows(files): return [json.loads(l) for f in files for l in Path(f).read_text().splitlines() if l.strip()]
def mean_sd(v): return f"{np.mean(v):.1f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.1f}"
def score_cell(rs, k): return f"{mean_sd([r[k]['top1'] for r in rs])} / {mean_sd([r[k]['balanced'] for r in rs])}"
def recall_cell(rs, k): return ' / '.join(f'{x:.2f}' for x in np.mean([r[k]['recalls'] for r in rs], 0))
def grouped(rows, kind, key):
    "The rows of `kind`, grouped by `key(row)` in order of appearance"
    groups = {}
    for r in rows:
        if r['kind'] == kind: groups.setdefault(key(r), []).append(r)
    return groups

def emitter(out:Path):
    "A function printing a result as a JSON line and appending it to `out`"
    out.parent.mkdir(parents=True, exist_ok=True)
    def emit(d):
        print(json.dumps(d), flush=True)
        with open(out, 'a') as f: f.write(json.dumps(d) + '\n')
    return emit

def table(files):
    rows = read_rows(files)
    for r in rows:
        if r['kind'] == 'features': print(f"features of {r['arch']} at {r['size']} px: {r['seconds']} s for train + valid")
    print('\n| backbone | size | features | dims | sampler | top-1 / balanced (seeds 42, 1, 2 mean ± sd) | recalls (mean) | + post-hoc LA τ=1 | LA recalls (mean) | ordinal median | LA + ordinal median |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    groups = grouped(rows, 'probe', lambda r: (r['arch'], r.get('size', 300), r['features'], r['sampler']))
    for (arch, size, fs, smp), rs in groups.items():
        cell,rec = (lambda k: score_cell(rs, k)),(lambda k: recall_cell(rs, k))
        opt = lambda k: cell(k) if k in rs[0] else '–'
        print(f"| {arch} | {size} | {fs} | {rs[0]['dims']} | {smp} | {cell('plain')} | {rec('plain')} | {cell('la')} | {rec('la')} | {opt('median')} | {opt('la_median')} |")

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--archs', default='tf_efficientnet_lite0,tf_efficientnet_lite2'); p.add_argument('--size', type=int, default=300)
    p.add_argument('--seeds', default='42,1,2'); p.add_argument('--samplers', default='instance,class_balanced')
    p.add_argument('--out', default='benchmarks/default_run/probe_features.jsonl'); p.add_argument('--table', nargs='*')
    a = p.parse_args()
    if a.table is not None: return table(a.table)
    torch.set_num_threads(2)
    emit = emitter(Path(a.out))
    archs, seeds = a.archs.split(','), [int(s) for s in a.seeds.split(',')]
    feats = {}
    for arch in archs:
        feats[arch], secs, vocab = extract(arch, a.size, seeds[0])
        emit(dict(kind='features', arch=arch, size=a.size, seconds=secs, vocab=vocab))
    sets = [(arch, fs, [(arch, k) for k in fs.split('+')]) for arch in archs for fs in ('last', 'last+s16', 'last+s16+s8')]
    if len(archs) > 1: sets.append(('+'.join(archs), 'last', [(arch, 'last') for arch in archs]))
    for name, fs, parts in sets:
        get = lambda split: torch.cat([feats[arch][split][0][k] for arch,k in parts], 1)
        xt, xv = get('train'), get('valid')
        yt, yv = feats[parts[0][0]]['train'][1], feats[parts[0][0]]['valid'][1]
        prior = torch.bincount(yt, minlength=int(yt.max()) + 1).float(); prior /= prior.sum()
        for smp in a.samplers.split(','):
            for seed in seeds:
                t0 = time.time()
                logits = fit_head(xt, yt, xv, yv, smp, seed)
                emit(dict(kind='probe', arch=name, features=fs, dims=xt.shape[1], sampler=smp, seed=seed, size=a.size,
                          head_s=round(time.time() - t0, 1), **scores(logits, yv, prior)))

if __name__ == '__main__': main()
