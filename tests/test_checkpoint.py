"Checkpoints: SIGKILL mid-epoch then resume gives the uninterrupted run; a kill during a save never corrupts the checkpoint; NaN stops."
import json, os, signal, subprocess, sys
from pathlib import Path
import pytest, torch
from conftest import run_training_script
from fastai.vision.all import Callback, set_seed
from fastcls.learner import cls_learner
from fastcls.callback.checkpoint import CheckpointCallback, NonFiniteLossError, write_atomic
from fastcls.test_utils import synth_dls
from fastcls.data.samplers import samplers

SCRIPT = Path(__file__).parent/'ckpt_train.py'

def _train(*args, kill_on=None):
    "Run the training script; with `kill_on`, SIGKILL it as soon as it prints that line"
    run_training_script(SCRIPT, *args, kill_on=kill_on)

def _load(fn): return torch.load(fn, weights_only=True)

@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp('ref')
    _train('--dir', d/'ck', '--out', d/'final.pth')
    return _load(d/'final.pth'), json.loads((d/'final.pth.json').read_text())

def _same_as(reference, out):
    ref, ref_vals = reference
    got = _load(out)
    for k in ref: torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=k)
    torch.testing.assert_close(torch.tensor(json.loads(Path(str(out) + '.json').read_text())), torch.tensor(ref_vals), atol=1e-5, rtol=0)

def test_sigkill_mid_epoch_then_resume(reference, tmp_path):
    ck = tmp_path/'ck'
    _train('--dir', ck, '--hang', 1, 2, kill_on='CHECKPOINTED')  # killed in epoch 1 after its 2nd batch
    st = _load(ck/'last.pth')
    assert (st['epoch'], st['iter'], st['train_iter'], st['n_epoch']) == (1, 2, 6, 2)
    assert len(st['values']) == 1  # epoch 0's logged values
    _train('--dir', ck, '--resume', '--out', tmp_path/'final.pth')
    _same_as(reference, tmp_path/'final.pth')
    assert _load(ck/'last.pth')['epoch'] == 2

def test_kill_during_save_keeps_last_checkpoint(reference, tmp_path):
    ck = tmp_path/'ck'
    _train('--dir', ck, '--hang-in-save', 3, kill_on='WRITING')  # saves: (0,2), epoch 0 end, then killed writing (1,2)
    tmps = list(ck.glob('.last.pth.*.tmp'))
    assert len(tmps) == 1 and tmps[0].stat().st_size > 0  # the half-written file is the temporary one
    with pytest.raises(Exception): _load(tmps[0])
    st = _load(ck/'last.pth')  # the real checkpoint is whole: the end of epoch 0
    assert (st['epoch'], st['iter']) == (1, 0)
    _train('--dir', ck, '--resume', '--out', tmp_path/'final.pth')
    _same_as(reference, tmp_path/'final.pth')
    assert not list(ck.glob('.last.pth.*.tmp'))  # cleaned up by the resumed run

def test_failed_write_leaves_old_file(tmp_path):
    fn = tmp_path/'x.pth'
    write_atomic(fn, lambda t: torch.save({'a': torch.ones(2)}, t))
    class Boom:
        def __reduce__(self): raise RuntimeError('boom')
    with pytest.raises(RuntimeError, match='boom'): write_atomic(fn, lambda t: torch.save({'a': torch.zeros(2), 'b': Boom()}, t))
    assert torch.equal(_load(fn)['a'], torch.ones(2)) and [p.name for p in tmp_path.iterdir()] == ['x.pth']

def _learn(sampler=False):
    set_seed(0)
    dls = synth_dls(n=48, size=32, bs=8)
    if sampler: dls = samplers['progressive'](dls, n_epoch=2, seed=None)  # seed drawn at random: the checkpoint must keep it
    return cls_learner(dls, 'test_convnext', head='linear', pretrained=False)

def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path):
    class Poison(Callback):
        order = 0
        def after_loss(self):
            if self.training and self.epoch == 1 and self.iter == 3: self.learn.loss = self.loss * float('nan')
    learn = _learn()
    with learn.no_bar(), learn.no_logging(), pytest.raises(NonFiniteLossError) as e:
        learn.fit_one_cycle(2, 1e-3, cbs=[CheckpointCallback(tmp_path, every=2), Poison()])
    assert 'nan at epoch 1, batch 3' in str(e.value) and str(tmp_path/'last.pth') in str(e.value) and '(epoch 1, batch 2)' in str(e.value)
    st = _load(tmp_path/'last.pth')
    assert (st['epoch'], st['iter']) == (1, 2) and all(torch.isfinite(v).all() for v in st['model'].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())  # stopped before the step

def test_resume_with_other_epochs_fails(tmp_path):
    learn = _learn()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=CheckpointCallback(tmp_path))
    with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError, match='fit of 1 epochs'):
        learn.fit(2, 1e-3, cbs=CheckpointCallback(tmp_path, resume=True))

def _fine_tune(path, crash_at=None, sampler=False, reseed=0):
    "`fine_tune(1, freeze_epochs=1)` inside `learn.resumable(path)`; with `crash_at`, interrupted at that training batch (counted over both fits)"
    learn, n = _learn(sampler), [0]
    if sampler: learn.dls.train.seed += reseed  # another process draws another seed
    learn.drawn = []
    class Record(Callback):
        order = 100  # after the checkpoint's resume
        def before_train(self):
            if sampler: learn.drawn.append((self.dl.sampler_state(), type(self.dl).get_idxs(self.dl)))  # not the patched resume draw
    learn.add_cb(Record())
    class Crash(Callback):
        def after_batch(self):
            if self.training: n[0] += 1
            if n[0] == crash_at: raise KeyboardInterrupt
    with learn.no_bar(), learn.no_logging(), learn.resumable(path, every=2):
        learn.fine_tune(1, 1e-3, freeze_epochs=1, cbs=Crash())
    assert not any(isinstance(c, CheckpointCallback) for c in learn.cbs)  # the context removes its callback
    return learn

@pytest.fixture(scope='module')
def straight(tmp_path_factory): return _fine_tune(tmp_path_factory.mktemp('ft'))

@pytest.mark.parametrize('crash_at', [3, 6, 7])  # 4 batches a fit: mid first fit; second fit before / after its first save
def test_resumable_fine_tune(straight, tmp_path, crash_at):
    with pytest.raises(KeyboardInterrupt): _fine_tune(tmp_path/'b', crash_at)
    assert _load(tmp_path/'b'/'last.pth')['fit_no'] == (crash_at > 6)
    resumed = _fine_tune(tmp_path/'b')
    for (k,a),b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        if a.is_floating_point(): torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=k)
    torch.testing.assert_close(torch.tensor(resumed.recorder.values), torch.tensor(straight.recorder.values), atol=1e-5, rtol=0)

def test_get_preds_is_not_a_fit(tmp_path):
    "fastai fires `before_fit` in `get_preds`: the checkpoint must not count it as a fit (it would skip the next one on resume)"
    learn = cls_learner(synth_dls(n=16, bs=8), 'test_resnet', pretrained=False)
    cb = CheckpointCallback(tmp_path/'ck')
    learn.add_cb(cb)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3); learn.get_preds(); learn.fit(1, 1e-3)
    assert cb.fit_no == 1

@pytest.fixture(scope='module')
def straight_sampled(tmp_path_factory): return _fine_tune(tmp_path_factory.mktemp('fts'), sampler=True)

@pytest.mark.parametrize('crash_at', [3, 7])
def test_resume_keeps_the_sampler_schedule(straight_sampled, tmp_path, crash_at):
    "A progressively-balanced sampler resumes at the epoch and seed it had (fine_tune's second fit is its epoch 1)"
    with pytest.raises(KeyboardInterrupt): _fine_tune(tmp_path/'b', crash_at, sampler=True)
    resumed = _fine_tune(tmp_path/'b', sampler=True, reseed=1)
    want = straight_sampled.drawn[-1]
    assert want[0]['epoch'] == 1 and resumed.drawn[-1][0] == want[0] and resumed.drawn[-1][1] == want[1]
    assert resumed.dls.train.epoch == straight_sampled.dls.train.epoch == 2
    for (k,a),b in zip(straight_sampled.model.state_dict().items(), resumed.model.state_dict().values()):
        if a.is_floating_point(): torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=k)
