"Train a tiny learner with `CheckpointCallback`; tests/test_checkpoint.py kills it (SIGKILL) at chosen points and resumes it."
import argparse, io, json, os, sys, time
import torch
from fastai.vision.all import Callback, set_seed
from fastcls.learner import cls_learner
from fastcls.callback.checkpoint import CheckpointCallback
from fastcls.test_utils import synth_dls

class Hang(Callback):
    "After the checkpoint of batch `it` of `epoch` is written, announce it and wait to be killed"
    order = CheckpointCallback.order + 1
    def __init__(self, epoch, it): self.at = (epoch, it)
    def after_batch(self):
        cb = self.learn.checkpoint
        if self.training and (self.epoch, cb.done) == self.at: print('CHECKPOINTED', flush=True); time.sleep(600)

def hang_in_save(n):
    "Make the `n`-th checkpoint save write half of its bytes, announce it, and wait to be killed"
    orig, calls = torch.save, [0]
    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] < n: return orig(obj, f, *a, **k)
        buf = io.BytesIO(); orig(obj, buf, *a, **k)
        with open(f, 'wb') as fh: fh.write(buf.getvalue()[:len(buf.getvalue())//2]); fh.flush()
        print('WRITING', flush=True); time.sleep(600)
    torch.save = save

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--dir', required=True); p.add_argument('--out')
    p.add_argument('--hang', type=int, nargs=2); p.add_argument('--hang-in-save', type=int)
    p.add_argument('--resume', action='store_true')
    a = p.parse_args()
    set_seed(0)
    learn = cls_learner(synth_dls(n=48, size=32, bs=8), 'test_convnext', head='linear', pretrained=False)
    cbs = [CheckpointCallback(a.dir, every=2, resume=a.resume)] + ([Hang(*a.hang)] if a.hang else [])
    if a.hang_in_save: hang_in_save(a.hang_in_save)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3, cbs=cbs)
    if a.out:
        torch.save({k: v.clone() for k, v in learn.model.state_dict().items()}, a.out)
        with open(a.out + '.json', 'w') as f: json.dump([list(map(float, v)) for v in learn.recorder.values], f)

if __name__ == '__main__': main()
