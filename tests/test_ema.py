"EMA = timm ModelEmaV3 after N steps (1e-6); EMA state survives SIGKILL + resume; export/save_weights of the EMA model."
import os, signal, subprocess, sys
from pathlib import Path
import pytest, torch
from conftest import run_training_script
from timm.utils.model_ema import ModelEmaV3
from fastai.vision.all import Callback, set_seed, load_learner
from fastcls.learner import cls_learner
from fastcls.callback.ema import EMA
from fastcls.test_utils import synth_dls
from fastcls.weights import load_cls_learner

SCRIPT = Path(__file__).parent/'ema_train.py'

def _learn():
    set_seed(0)
    return cls_learner(synth_dls(n=48, size=32, bs=8), 'test_resnet', pretrained=False)

@pytest.mark.parametrize('buffers,warmup,every', [('average', True, 1), ('copy', False, 2)])
def test_equals_timm_model_ema_v3(buffers, warmup, every):
    learn = _learn()
    ref = ModelEmaV3(learn.model, decay=0.95, use_warmup=warmup, exclude_buffers=buffers == 'copy')
    n = [0]
    class Ref(Callback):
        order = EMA.order + 1
        def after_step(self):
            n[0] += 1
            if n[0] % every == 0: ref.update(self.model, step=n[0]//every)  # timm's train.py: step = number of updates
    e = EMA(decay=0.95, warmup=warmup, every=every, buffers=buffers)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=[e, Ref()])
    assert e.updates == 2*len(learn.dls.train)//every
    for (k, a), b in zip(e.module.state_dict().items(), ref.module.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    bn = [k for k in e.module.state_dict() if k.endswith('running_mean')][0]
    same = torch.equal(e.module.state_dict()[bn], learn.model.state_dict()[bn])
    assert same == (buffers == 'copy')  # copied buffers equal the model's; averaged ones lag behind

def _run(*args, kill_on=None):
    run_training_script(SCRIPT, *args, kill_on=kill_on)

def test_sigkill_then_resume_restores_ema(tmp_path):
    _run('--dir', tmp_path/'ref_ck', '--out', tmp_path/'ref.pth')
    ck = tmp_path/'ck'
    _run('--dir', ck, '--hang', 1, 2, kill_on='CHECKPOINTED')  # killed in epoch 1 after its 2nd batch
    st = torch.load(ck/'last.pth', weights_only=True)
    assert st['cbs']['ema']['updates'] == 4 + 2  # 4 batches of epoch 0, 2 of epoch 1: the warm-up position is saved
    _run('--dir', ck, '--resume', '--out', tmp_path/'got.pth')
    ref, got = torch.load(tmp_path/'ref.pth', weights_only=True), torch.load(tmp_path/'got.pth', weights_only=True)
    assert int(got['updates']) == int(ref['updates']) == 8
    for part in ('model', 'ema'):
        for k in ref[part]: torch.testing.assert_close(got[part][k], ref[part][k], atol=1e-6, rtol=1e-5, msg=f'{part}.{k}')

def test_export_and_save_weights_of_ema_model(tmp_path):
    learn = _learn()
    e = EMA(decay=0.9)
    learn.add_cb(e)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    avg = {k: v.clone() for k, v in e.module.state_dict().items()}
    own = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with learn.ema_weights():
        learn.export(tmp_path/'ema.pkl'); learn.save_weights(tmp_path/'ema')
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, own[k])  # the model keeps its own weights after
    for m in (load_learner(tmp_path/'ema.pkl').model, load_cls_learner(tmp_path/'ema').model):
        for k, v in m.state_dict().items(): torch.testing.assert_close(v, avg[k], msg=k)
    assert not any(isinstance(c, EMA) for c in load_learner(tmp_path/'ema.pkl').cbs)
