"Fit an `ssl_learner` (MoCo v2, then DINO) under `distrib_ctx`; launched by tests/test_ssl.py alone or under `torchrun` (2 CPU processes)."
import argparse, os
import torch
from fastai.vision.all import set_seed, rank_distrib, num_distrib, Callback
from fastcls.ssl.data import ssl_dls
from fastcls.ssl.learner import ssl_learner
from fastcls.test_utils import synth_dls
import fastcls.distributed  # noqa: F401  (distrib_ctx on CPU)

def main():
    p = argparse.ArgumentParser(); p.add_argument('--out', required=True); p.add_argument('--bs', type=int, default=8)
    a = p.parse_args()
    res = {}
    for method, kw in (('mocov2', dict(queue_len=16, hidden=32, out_dim=16)), ('dino', dict(out_dim=32, hidden=32, bottleneck=16, n_local=2))):
        set_seed(0)
        sdls = ssl_dls(synth_dls(n=40, size=32, n_classes=2, bs=a.bs, seed=0, device='cpu'), size=32, bs=a.bs)
        learn = ssl_learner(sdls, 'test_resnet', method, **kw)
        steps = []
        class Count(Callback):
            def after_batch(self):
                if self.training: steps.append(self.iter)
        with learn.no_bar(), learn.no_logging(), learn.distrib_ctx(): learn.fit(1, 1e-3, cbs=Count())
        m = getattr(learn.model, 'module', learn.model)
        res[method] = {k: v.detach().clone() for k,v in m.state_dict().items()}
        res[method + '_run'] = dict(world=num_distrib(), steps=len(steps), n_train=len(learn.dls.train_ds))
    os.makedirs(a.out, exist_ok=True)
    torch.save(res, os.path.join(a.out, f'rank{rank_distrib()}.pth'))

if __name__ == '__main__': main()
