"Distillation losses = torchdistill 1.1.5 on fixed tensors (1e-6); teacher checks; KD with margin heads, imbalance losses, export folders."
import warnings
import pytest, torch, torch.nn.functional as F
from fastai.vision.all import set_seed, CrossEntropyLossFlat
from fastcls.callback.distill import kd_losses, KDCallback, CSKD, TfKDReg, PSKD, pair_dls, tfkd_reg_target, check_vocab
from fastcls.learner import cls_learner
from fastcls.test_utils import synth_dls
import fastcls.weights  # noqa: F401 (Learner.save_weights)

import torchdistill.losses.mid_level as td  # a dev requirement (settings.ini)

@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 7, generator=g)*3, torch.randn(16, 7, generator=g)*3, torch.randint(0, 7, (16,), generator=g)

def _io(x, path='.', io='output'): return {path: {io: x}}

@pytest.mark.parametrize('T', [1., 4., 20.])
def test_kl_equals_torchdistill(logits, T):
    s, t, y = logits
    ref = td.KDLoss('.', 'output', '.', 'output', temperature=T, alpha=0.)  # alpha=0: the soft term alone
    torch.testing.assert_close(kd_losses['kl'](s, t, T), ref(_io(s), _io(t)) * T**2, atol=1e-6, rtol=1e-6)
    # the whole objective: torchdistill's alpha weighs CE, ours weighs the distillation term
    full = td.KDLoss('.', 'output', '.', 'output', temperature=T, alpha=0.1)
    ours = 0.1*F.cross_entropy(s, y) + 0.9*kd_losses['kl'](s, t, T)
    torch.testing.assert_close(ours, full(_io(s), _io(t), y), atol=1e-6, rtol=1e-6)

@pytest.mark.parametrize('T', [1., 4.])
def test_dist_equals_torchdistill(logits, T):
    s, t, _ = logits
    ref = td.DISTLoss('.', 'output', '.', 'output', beta=1., gamma=1., tau=T)
    torch.testing.assert_close(kd_losses['dist'](s, t, T), ref(_io(s), _io(t)), atol=1e-6, rtol=1e-6)
    ref2 = td.DISTLoss('.', 'output', '.', 'output', beta=2., gamma=.5, tau=T)
    torch.testing.assert_close(kd_losses['dist'](s, t, T, 2., .5), ref2(_io(s), _io(t)), atol=1e-6, rtol=1e-6)

def test_at_equals_torchdistill():
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 32, 8, 8, generator=g)
    ref = td.ATLoss({'p': {'student': {'path': 's', 'io': 'output'}, 'teacher': {'path': 't', 'io': 'output'}, 'weight': 1}}, mode='code')
    torch.testing.assert_close(kd_losses['at'](fs, ft), ref(_io(fs, 's'), _io(ft, 't')), atol=1e-6, rtol=1e-6)

def test_fitnet_is_mse_of_regressed_map():
    fs, ft = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)
    reg = torch.nn.Conv2d(8, 16, 1, bias=False)
    torch.testing.assert_close(kd_losses['fitnet'](reg(fs), ft), ((reg(fs) - ft)**2).mean())

def test_tfkd_reg_formula(logits):
    s, _, y = logits
    s, p_d = s.double(), tfkd_reg_target(y, 7, .99).double()  # float64: T² = 400 magnifies float32 rounding past 1e-6
    T = 20.
    ref = T**2 * (F.softmax(p_d/T, 1)*(F.log_softmax(p_d/T, 1) - F.log_softmax(s/T, 1))).sum(1).mean()  # Yuan et al. Eq. 9
    torch.testing.assert_close(kd_losses['kl'](s, p_d, T), ref, atol=1e-6, rtol=1e-6)

def _dls(n_classes=2, **kw): return synth_dls(n=48, size=32, bs=8, n_classes=n_classes, **kw)

def test_teacher_from_saved_folder_and_export(tmp_path):
    set_seed(0)
    dls = _dls()
    t = cls_learner(dls, 'test_resnet', pretrained=False)
    t.save_weights(tmp_path/'t'); t.export(tmp_path/'t.pkl')
    for src in (tmp_path/'t', tmp_path/'t.pkl'):
        cb = KDCallback(src)
        x = dls.valid.one_batch()[0]
        with torch.no_grad(): torch.testing.assert_close(cb.tmodel.eval()(x), t.model.eval()(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='neither a folder'): KDCallback(tmp_path/'missing')

def test_class_order_and_count_errors():
    with pytest.raises(ValueError, match='different order'): check_vocab(['0.00', '1.00'], ['1.00', '0.00'])
    set_seed(0)
    t3 = cls_learner(_dls(3), 'test_resnet', pretrained=False)
    learn = cls_learner(_dls(2), 'test_resnet', pretrained=False)
    with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError, match='differ from the student'): learn.fit(1, cbs=KDCallback(t3))

def test_bad_arguments():
    t = torch.nn.Linear(2, 2)
    for kw, msg in [(dict(T=0.), 'T must be > 0'), (dict(T=-1.), 'T must be > 0'), (dict(alpha=1.1), r'\[0, 1\]'),
                    (dict(loss='crd'), 'Valid choices'), (dict(loss='fitnet'), 'need `layers`')]:
        with pytest.raises(ValueError, match=msg): KDCallback(t, **kw)

def test_kd_with_margin_head_distils_inference_logits():
    "The distilled logits are the model's output (inference logits), not the margin-modified ones the loss sees"
    set_seed(0)
    dls = _dls()
    t = cls_learner(dls, 'test_resnet', pretrained=False)
    learn = cls_learner(dls, 'test_resnet', pretrained=False, head='arcface', embed_dim=16)
    cb = KDCallback(t, alpha=1.)
    from fastai.callback.core import Callback
    class Check(Callback):
        order = cb.order + 1
        def after_loss(self):
            if self.training: torch.testing.assert_close(cb.kd_loss, kd_losses['kl'](self.pred.float(), cb.tpred, 4.))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[cb, Check()])

def test_kd_with_imbalance_loss():
    from fastcls.losses.longtail import losses
    set_seed(0)
    dls = _dls()
    t = cls_learner(dls, 'test_resnet', pretrained=False)
    learn = cls_learner(dls, 'test_resnet', pretrained=False, loss_func=losses['balanced_softmax'](dls))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=KDCallback(t, loss='dist', T=1.))
    assert all(torch.isfinite(torch.tensor(v[0])) for v in learn.recorder.values)

def test_fitnet_regressors_in_checkpoint(tmp_path):
    set_seed(0)
    dls = _dls()
    t = cls_learner(dls, 'test_resnet', pretrained=False)
    learn = cls_learner(dls, 'test_resnet', pretrained=False)
    cb = KDCallback(t, loss='fitnet', layers=['layer2'])
    with learn.no_bar(), learn.no_logging(), learn.resumable(tmp_path/'ck'): learn.fit(1, 1e-3, cbs=cb)
    st = torch.load(tmp_path/'ck'/'last.pth', weights_only=True)
    torch.testing.assert_close(st['cbs']['kd']['regressors']['0.weight'], cb.regressors[0].weight.detach())

def test_cli_teacher_kd_ema(tmp_path, capsys):
    "fastcls train --teacher RUN --kd 0.9 --ema: the teacher run's export is distilled, the EMA model is reported and exported"
    import json, shutil
    from fastcls.cli import main
    from fastcls.test_utils import synth_df
    root = tmp_path/'imgs'
    src = synth_df(n=24, size=32, n_classes=3)
    for f, l in zip(src.fname, src.label): (root/l).mkdir(parents=True, exist_ok=True); shutil.copy(f, root/l)
    tiny = ['--arch', 'test_resnet', '--pretrained', 'none', '--epochs', '1', '--size', '32', '--bs', '8', '--quiet']
    assert main(['train', '--data', str(root), '--out', str(tmp_path/'big'), *tiny]) == 0
    assert main(['train', '--data', str(root), '--out', str(tmp_path/'small'), '--teacher', str(tmp_path/'big'), '--kd', '0.8', '--ema', *tiny]) == 0
    m = json.loads((tmp_path/'small'/'metrics.json').read_text())
    assert m['config']['teacher'] == str(tmp_path/'big') and m['config']['kd'] == 0.8 and m['config']['ema']
    capsys.readouterr()
    assert main(['train', '--data', str(root), '--out', str(tmp_path/'bad'), '--teacher', str(tmp_path/'nope'), *tiny]) == 2
    assert 'neither a folder' in capsys.readouterr().err
    assert main(['train', '--data', str(root), '--out', str(tmp_path/'bad'), '--teacher', str(tmp_path/'big'), '--kd', '1.5', *tiny]) == 2
    assert '[0, 1]' in capsys.readouterr().err

def test_kd_and_ema_under_autocast():
    "bf16 autocast from before_batch to after_loss (what fastai's MixedPrecision does on CUDA, here on the CPU): KD's loss is fp32, EMA stays fp32"
    from fastai.callback.core import Callback
    from fastcls.callback.ema import EMA
    class CPUAutocast(Callback):
        order = 10
        def before_batch(self): self.ac = torch.autocast('cpu', dtype=torch.bfloat16); self.ac.__enter__()
        def after_loss(self): self.ac.__exit__(None, None, None)
    seen = []
    class Look(Callback):
        order = 100
        def after_loss(self): seen.append((self.pred.dtype, self.loss.dtype, bool(torch.isfinite(self.loss))))
    dls = synth_dls(n=32, size=32, n_classes=2, bs=8, device='cpu')
    teacher = cls_learner(dls, 'test_resnet', head='linear', pretrained=False).model.eval()
    learn = cls_learner(dls, 'test_convnext', head='linear', pretrained=False)
    w0 = [p.detach().clone() for p in learn.model.parameters()]
    ema = EMA(decay=0.9, warmup=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[CPUAutocast(), KDCallback(teacher, T=2., alpha=0.5), ema, Look()])
    assert seen and all(s == (torch.bfloat16, torch.float32, True) for s in seen), seen
    assert {p.dtype for p in ema.module.parameters()} == {torch.float32}
    assert any(not torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))
