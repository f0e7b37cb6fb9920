"""The default run's search, one more recipe family (issue 19): fine-tune the top stages of the pretrained network on cached activations.

    flock /tmp/fastcls-cpu.lock env PYTHONPATH=. python benchmarks/bench_partial_ft.py --out benchmarks/default_run/partial_ft.jsonl
    python benchmarks/bench_partial_ft.py --table benchmarks/default_run/partial_ft.jsonl

The cached probe (the default run, BENCHMARKS.md §8) trains only the head on frozen features; a fine-tune of the whole network fits
about 3 epochs at 300 px into the 10-minute budget. In between: the ELPV cells of the default run's DataLoaders (300 px, validation
transforms, ImageNet tf_efficientnet_lite0) go once through the frozen stem and the first `cut` block stages, and the activations
(stride 16, fp16) are kept; then the remaining stages (`blocks[cut:]`, `conv_head`, `bn2`, BatchNorm statistics updated) and a
fresh fastai head (catavgmax) train on them, `fit_one_cycle(epochs, slice(lr_body, lr_head))`. Each training map is flipped and
rotated by a random element of the dihedral group (the cells are symmetric; this acts on the activations, not the image, so it is an
approximation of image augmentation). `cut` 6 trains the last block stage (320 channels) and `conv_head`, `cut` 5 also the stage before
it. Scores as `bench_probe_features.py` (plain, post-hoc LA τ = 1, ordinal median). One JSON line per (cut, loss, seed).
"""
import argparse, time, warnings
from pathlib import Path
import numpy as np, torch
from torch import nn
from fastai.vision.all import Callback, DataLoaders, Learner, TfmdDL, CrossEntropyLossFlat, set_seed
from fastcls.cli.core import make_dls
from fastcls.data.datasets import elpv_df
from fastcls.learner import cls_learner
from fastcls.losses.longtail import losses
from bench_probe_features import scores, read_rows, score_cell, recall_cell, grouped, emitter

warnings.filterwarnings('ignore')
ARCH = 'tf_efficientnet_lite0'

def dihedral(x, k:int):
    "The k-th of the 8 flips/rotations of the last two dims of `x`"
    return torch.rot90(x.flip(-1) if k >= 4 else x, k % 4, (-2, -1))

class RandomDihedral(Callback):
    "A random dihedral flip/rotation of each training map"
    def before_batch(self):
        if not self.training: return
        ks = torch.randint(8, (len(self.xb[0]),))
        self.learn.xb = (torch.stack([dihedral(x, int(k)) for x,k in zip(self.xb[0], ks)]),)

def pretrained(size, seed):
    "The default run's DataLoaders and a fresh `cls_learner` over them (ImageNet lite0, catavgmax, fastai's head)"
    set_seed(seed, reproducible=True)
    dls = make_dls(elpv_df(), size, 32, 42, aug='dihedral')
    return dls, cls_learner(dls, ARCH, pretrained=True, pool='catavgmax', head='fastai')

@torch.no_grad()
def activations(size, cut):
    "fp16 activations after the stem and `blocks[:cut]` of the frozen net, and the targets, of the training and validation cells"
    dls,learn = pretrained(size, 42)
    tm = learn.model[0].model.eval()
    lower = nn.Sequential(tm.conv_stem, tm.bn1, *tm.blocks[:cut]).to(memory_format=torch.channels_last)
    res = {}
    for split,dl in (('train', dls.test_dl(dls.train_ds.items, with_labels=True, bs=64)), ('valid', dls.valid.new(bs=64))):
        xs,ys = zip(*((lower(xb.as_subclass(torch.Tensor).contiguous(memory_format=torch.channels_last)).half(), yb.as_subclass(torch.Tensor)) for xb,yb in dl))
        res[split] = torch.cat(xs),torch.cat(ys)
    return res, list(dls.vocab)

def fit_top(acts, cut, cached_cut, size, seed, loss, epochs, lr_body, lr_head, bs=32):
    "Train `blocks[cut:]`, `conv_head`, `bn2` and a fresh head on the cached activations; the validation logits"
    dls,learn = pretrained(size, seed)
    tm = learn.model[0].model
    mid = nn.Sequential(*tm.blocks[cached_cut:cut]).eval()  # frozen stages between the cache and the trained ones
    with torch.no_grad(): (xt,yt),(xv,yv) = [(torch.cat([mid(x[i:i+128].float()) for i in range(0, len(x), 128)]), y) for x,y in (acts['train'], acts['valid'])]
    top = nn.Sequential(nn.Sequential(*tm.blocks[cut:], tm.conv_head, tm.bn2), learn.model[1])
    fdls = DataLoaders(TfmdDL(list(zip(xt, yt)), bs=bs, shuffle=True, drop_last=True), TfmdDL(list(zip(xv, yv)), bs=128))
    flearn = Learner(fdls, top, loss_func=losses[loss](dls) if loss != 'ce' else CrossEntropyLossFlat(),
                     splitter=lambda m: [list(m[0].parameters()), list(m[1].parameters())], cbs=RandomDihedral())
    t0 = time.time()
    with flearn.no_bar(), flearn.no_logging(): flearn.fit_one_cycle(epochs, slice(lr_body, lr_head))
    train_s = time.time() - t0
    top.eval()
    with torch.no_grad(): return torch.cat([top(xv[i:i+128]) for i in range(0, len(xv), 128)]), yt, yv, train_s

def table(files):
    rows = read_rows(files)
    for r in rows:
        if r['kind'] == 'activations': print(f"activations after blocks[:{r['cut']}] at {r['size']} px: {r['seconds']} s for train + valid")
    print('\n| trained | loss | epochs | lr body / head | top-1 / balanced (mean ± sd) | recalls (mean) | + post-hoc LA τ=1 | LA recalls (mean) | ordinal median | train s (mean) | seeds |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    groups = grouped(rows, 'top', lambda r: (r['cut'], r['loss'], r['epochs'], r['lr_body'], r['lr_head']))
    for (cut,loss,ep,lb,lh),rs in groups.items():
        cell,rec = (lambda k: score_cell(rs, k)),(lambda k: recall_cell(rs, k))
        print(f"| blocks[{cut}:] + conv_head + head | {loss} | {ep} | {lb:g} / {lh:g} | {cell('plain')} | {rec('plain')} | {cell('la')} | {rec('la')} | "
              f"{cell('median')} | {np.mean([r['train_s'] for r in rs]):.0f} | {', '.join(str(r['seed']) for r in rs)} |")

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', type=int, default=300); p.add_argument('--cuts', default='6,5'); p.add_argument('--seeds', default='42,1,2')
    p.add_argument('--losses', default='ce'); p.add_argument('--epochs', type=int, default=5)
    p.add_argument('--lr-body', type=float, default=1e-3); p.add_argument('--lr-head', type=float, default=1e-2)
    p.add_argument('--out', default='benchmarks/default_run/partial_ft.jsonl'); p.add_argument('--table', nargs='*')
    a = p.parse_args()
    if a.table is not None: return table(a.table)
    torch.set_num_threads(2)
    emit = emitter(Path(a.out))
    cuts = [int(c) for c in a.cuts.split(',')]
    t0 = time.time(); acts,vocab = activations(a.size, min(cuts))
    emit(dict(kind='activations', arch=ARCH, size=a.size, cut=min(cuts), seconds=round(time.time() - t0, 1), shape=list(acts['train'][0].shape), vocab=vocab))
    for cut in cuts:
        for loss in a.losses.split(','):
            for seed in (int(s) for s in a.seeds.split(',')):
                logits,yt,yv,train_s = fit_top(acts, cut, min(cuts), a.size, seed, loss, a.epochs, a.lr_body, a.lr_head)
                prior = torch.bincount(yt, minlength=len(vocab)).float(); prior /= prior.sum()
                emit(dict(kind='top', arch=ARCH, size=a.size, cut=cut, loss=loss, seed=seed, epochs=a.epochs, lr_body=a.lr_body, lr_head=a.lr_head,
                          train_s=round(train_s, 1), **scores(logits, yv, prior)))

if __name__ == '__main__': main()
