"Train a tiny fastcls learner; launched by tests/test_distributed.py alone (1 process) or under `torchrun` (DDP on CPU)."
import argparse, json, os
import torch
from fastai.vision.all import TfmdDL, Callback, set_seed, rank_distrib, num_distrib
from fastcls.learner import cls_learner
from fastcls.test_utils import synth_dls
import fastcls.distributed  # noqa: F401  (ClsLearner.to_distributed)

def labels(ds): return [int(ds.tls[1][i]) for i in range(len(ds))]

class GroupBalancedDL(TfmdDL):
    "A batch-level sampler: every `group` consecutive indices hold `group/c` items of each class"
    group = 8
    def get_idxs(self):
        ys = labels(self.dataset)
        by_cls = [[i for i,y in enumerate(ys) if y == c] for c in sorted(set(ys))]
        return [self.rng.choice(by_cls[j % len(by_cls)]) for j in range(self.n)]

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--out', required=True); p.add_argument('--bs', type=int, default=8)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--kd-ema', action='store_true', help='train with a KDCallback teacher and EMA; save the EMA weights per rank')
    p.add_argument('--nan-rank', type=int, default=None, help="make this rank's loss NaN at epoch 0, batch 1 (inside `learn.resumable`)")
    a = p.parse_args()
    if a.nan_rank is not None: return nan_run(a)
    if a.kd_ema: return kd_ema_run(a)
    set_seed(0)
    dls = synth_dls(n=65, size=32, n_classes=2, bs=a.bs, seed=0, device='cpu')
    dls.train = dls.train.new(cls=GroupBalancedDL)
    learn = cls_learner(dls, 'test_convnext', head='linear', pretrained=False)
    seen = []
    class Record(Callback):
        order = 20
        def before_train(self):
            dl, get = self.learn.dl, self.learn.dl.get_idxs
            def rec():
                r = get(); seen.append([int(i) for i in r]); del dl.get_idxs; return r
            dl.get_idxs = rec
    init = {k: v.clone() for k,v in learn.model.state_dict().items()}
    with learn.no_bar(), learn.distrib_ctx():
        learn.fit(a.epochs, 1e-3, cbs=Record())
        values = [list(map(float, v)) for v in learn.recorder.values]
        preds, targs = learn.get_preds()
    y = labels(learn.dls.train_ds)
    ys = [[y[i] for i in ep] for ep in seen]
    res = dict(rank=rank_distrib(), world=num_distrib(), seen=seen, ys=ys, values=values,
               preds=preds.tolist(), targs=targs.tolist())
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f'rank{rank_distrib()}.json'), 'w') as f: json.dump(res, f)
    if rank_distrib() == 0:
        torch.save(learn.model.state_dict(), os.path.join(a.out, 'model.pth'))
        torch.save(init, os.path.join(a.out, 'init.pth'))

def kd_ema_run(a):
    "KD from a fixed teacher and EMA under DDP: the EMA weights must be the same on every rank and match one process at the global batch"
    from fastcls.callback.distill import KDCallback
    from fastcls.callback.ema import EMA
    set_seed(0)
    dls = synth_dls(n=64, size=32, n_classes=2, bs=a.bs, seed=0, device='cpu')
    set_seed(1); teacher = cls_learner(dls, 'test_resnet', head='linear', pretrained=False).model.eval()
    set_seed(0); learn = cls_learner(dls, 'test_convnext', head='linear', pretrained=False)
    ema = EMA(decay=0.9, warmup=False)
    with learn.no_bar(), learn.no_logging(), learn.distrib_ctx():
        learn.fit(a.epochs, 1e-3, cbs=[KDCallback(teacher, T=2., alpha=0.5), ema])
    os.makedirs(a.out, exist_ok=True)
    torch.save({k: v.clone() for k,v in ema.module.state_dict().items()}, os.path.join(a.out, f'ema{rank_distrib()}.pth'))
    with open(os.path.join(a.out, f'rank{rank_distrib()}.json'), 'w') as f:
        json.dump(dict(rank=rank_distrib(), world=num_distrib(), updates=ema.updates), f)

def nan_run(a):
    "Every rank must stop with NonFiniteLossError when one rank's loss is NaN (none may wait in an all-reduce)"
    from fastcls.callback.checkpoint import NonFiniteLossError
    set_seed(0)
    learn = cls_learner(synth_dls(n=64, size=32, n_classes=2, bs=a.bs, seed=0, device='cpu'), 'test_convnext', head='linear', pretrained=False)
    class Poison(Callback):
        order = 0
        def after_loss(self):
            if self.training and rank_distrib() == a.nan_rank and self.epoch == 0 and self.iter == 1: self.learn.loss = self.loss * float('nan')
    err, batches = None, []
    class Count(Callback):
        def after_batch(self):
            if self.training: batches.append(self.iter)
    try:
        with learn.no_bar(), learn.no_logging(), learn.distrib_ctx(), learn.resumable(os.path.join(a.out, 'ck')):
            learn.fit(a.epochs, 1e-3, cbs=[Poison(), Count()])
    except NonFiniteLossError as e: err = str(e)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f'rank{rank_distrib()}.json'), 'w') as f: json.dump(dict(rank=rank_distrib(), error=err, batches=batches), f)

if __name__ == '__main__': main()
