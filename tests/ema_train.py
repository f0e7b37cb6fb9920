"Train a tiny learner with `EMA` and `CheckpointCallback`; tests/test_ema.py kills it (SIGKILL) mid-epoch and resumes it."
import argparse, time
import torch
from fastai.vision.all import Callback, set_seed
from fastcls.learner import cls_learner
from fastcls.callback.checkpoint import CheckpointCallback
from fastcls.callback.ema import EMA
from fastcls.test_utils import synth_dls

class Hang(Callback):
    "After the checkpoint of batch `it` of `epoch` is written, announce it and wait to be killed"
    order = CheckpointCallback.order + 1
    def __init__(self, epoch, it): self.at = (epoch, it)
    def after_batch(self):
        if self.training and (self.epoch, self.learn.checkpoint.done) == self.at: print('CHECKPOINTED', flush=True); time.sleep(600)

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--dir', required=True); p.add_argument('--out')
    p.add_argument('--hang', type=int, nargs=2); p.add_argument('--resume', action='store_true')
    a = p.parse_args()
    set_seed(0)
    learn = cls_learner(synth_dls(n=48, size=32, bs=8), 'test_convnext', head='linear', pretrained=False)
    ema = EMA(decay=0.9, every=1)
    cbs = [ema, CheckpointCallback(a.dir, every=2, resume=a.resume)] + ([Hang(*a.hang)] if a.hang else [])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3, cbs=cbs)
    if a.out: torch.save(dict(model=learn.model.state_dict(), ema=ema.module.state_dict(), updates=torch.tensor(ema.updates)), a.out)

if __name__ == '__main__': main()
