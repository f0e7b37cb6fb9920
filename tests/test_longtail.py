"BBN, DRW, decoupling verbs: formulas, bad input, export/load in a fresh process, star-import safety"
from fastai.losses import CrossEntropyLossFlat
import subprocess, sys, textwrap
import pytest, torch, torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
from fastai.learner import load_learner
from fastcls.learner import cls_learner
from fastcls.losses.longtail import losses, class_counts, cb_weights, LogitAdjust
from fastcls.metrics.longtail import balanced_acc
from fastcls.callback.longtail import (DRW, bbn_learner, BBNModel, BilateralBlock, CumulativeLearning, bbn_alpha,
                              TauNormLinear, LWSLinear, _last_linear)
from fastcls.test_utils import synth_dls

@pytest.fixture(scope='module')
def dls(): return synth_dls(n=48, n_classes=3, bs=8)

def quiet_fit(learn, *args, **kwargs):
    with learn.no_bar(), learn.no_logging(): return learn.fit(*args, **kwargs)

@pytest.fixture(scope='module')
def trained(dls):
    learn = cls_learner(dls, 'test_resnet', pretrained=False)
    quiet_fit(learn, 1, 1e-3)
    return learn

# ---- BBN ----
def test_alpha_schedule():
    assert bbn_alpha(1, 200) == 1. and bbn_alpha(101, 200) == 0.75
    assert bbn_alpha(8, 8) == pytest.approx(1 - (7/8)**2)
    assert bbn_alpha(181, 180, div_epoch=200) == pytest.approx(1 - (180/200)**2)
    assert bbn_alpha(5, 9, 'linear') == pytest.approx(1 - 4/9) and bbn_alpha(2, 4, 'fixed') == .5
    with pytest.raises(ValueError, match="Valid choices"): bbn_alpha(1, 2, 'step')

@pytest.mark.parametrize('arch', ['test_resnet', 'test_convnext', 'test_efficientnet'])
def test_bbn_structure_and_inference(dls, arch):
    learn = bbn_learner(dls, arch, pretrained=False)
    m = learn.model.eval()
    assert isinstance(m, BBNModel) and sum(isinstance(b, BilateralBlock) for b in m.modules()) == 1
    bil = m._bil[0]
    assert bil.cb is not bil.rb
    x, xr = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fc, fr = m.features(x, 'cb'), m.features(x, 'rb')
        torch.testing.assert_close(m(x), m[1][1](2 * torch.cat([.5*fc, .5*fr], 1)))  # inference = alpha 0.5
        m.alpha = .2
        torch.testing.assert_close(m(x, xr), m[1][1](2 * torch.cat([.2*fc, .8*m.features(xr, 'rb')], 1)))

def test_bbn_training_loss_and_batches(dls):
    learn = bbn_learner(dls, 'test_resnet', pretrained=False)
    class Spy(Callback):
        order = CumulativeLearning.order + 1
        def before_fit(self): self.alphas, self.rev_labels = [], []
        def after_loss(self):
            if not self.training: return
            (xc, xr), (yc, yr) = self.xb, self.yb
            a = cl.alpha
            self.alphas.append(a); self.rev_labels.append(yr)
            want = a * F.cross_entropy(self.pred, yc) + (1 - a) * F.cross_entropy(self.pred, yr)
            torch.testing.assert_close(self.loss_grad, want)
            assert xr.shape == xc.shape
    spy, cl = Spy(), CumulativeLearning(seed=0)
    quiet_fit(learn, 4, 1e-3, cbs=[cl, spy])
    assert sorted(set(spy.alphas), reverse=True) == [bbn_alpha(t, 4) for t in range(1, 5)]
    assert learn.model.alpha == .5 and type(learn.loss_func).__name__ == 'CrossEntropyLossFlat'
    assert cl.rev is None and cl.it is None  # nothing left to pickle

def test_bbn_errors(dls):
    with pytest.raises(ValueError, match="needs a BBNModel"):
        quiet_fit(cls_learner(dls, 'test_resnet', pretrained=False), 1, cbs=CumulativeLearning())
    with pytest.raises(ValueError, match="exactly one BilateralBlock"): BBNModel(nn.Identity(), nn.Sequential())

# ---- DRW ----
def test_drw_switches_weights(dls):
    learn = cls_learner(dls, 'test_resnet', pretrained=False, head='normed_linear', loss_func=losses['ldam'](dls))
    seen = []
    class W(Callback):
        order = DRW.order + 1
        def before_train(self): seen.append(self.learn.loss_func.weight)
    quiet_fit(learn, 5, 1e-3, cbs=[DRW(), W()])
    assert [w is None for w in seen] == [True] * 4 + [False]
    torch.testing.assert_close(seen[-1], cb_weights(class_counts(dls)))
    assert learn.loss_func.weight is None
    seen.clear(); quiet_fit(learn, 3, 1e-3, cbs=[DRW(start=1), W()])
    assert [w is None for w in seen] == [True, False, False]
    with pytest.raises(ValueError, match="needs a loss with a `weight`"):
        quiet_fit(cls_learner(dls, 'test_resnet', pretrained=False, loss_func=lambda p, y: p.sum()), 1, cbs=DRW())

def test_drw_on_default_loss_keeps_user_weight(dls):
    "fastai's CrossEntropyLossFlat (cls_learner's default) works; a user weight is kept before `start` and restored"
    learn = cls_learner(dls, 'test_resnet', pretrained=False, loss_func=CrossEntropyLossFlat())  # fastai's default is one
    user_w = torch.tensor([1., 2., 3.])                                                           # instance shared by all dls
    learn.loss_func.func.weight = user_w
    seen = []
    class W(Callback):
        order = DRW.order + 1
        def before_train(self): seen.append(self.learn.loss_func.func.weight)
    quiet_fit(learn, 2, 1e-3, cbs=[DRW(start=1), W()])
    assert seen[0] is user_w
    torch.testing.assert_close(seen[1], cb_weights(class_counts(dls)))
    assert learn.loss_func.func.weight is user_w

@pytest.mark.parametrize('head', ['arcface', 'adacos'])
def test_bbn_margin_head_loss_holds_the_model_head(dls, head):
    "The margin loss cls_learner built for its own head must be rebuilt for BBN's classifier, or AdaCos never adapts"
    learn = bbn_learner(dls, 'test_resnet', head=head, pretrained=False)
    assert learn.loss_func.head is learn.model[1][-1]

# ---- decoupling verbs ----
def test_verbs_need_training(dls):
    learn = cls_learner(dls, 'test_resnet', pretrained=False)
    for verb in (lambda: learn.crt(1), lambda: learn.lws(1), lambda: learn.tau_norm(1.)):
        with pytest.raises(ValueError, match="has not been trained"): verb()
    learn.tau_norm(1., force=True)  # loaded weights: explicit
    assert isinstance(_last_linear(learn.model, (TauNormLinear,))[2], TauNormLinear)

def test_tau_norm(trained, dls):
    learn = trained
    for bad in (-0.5, 2.1):
        with pytest.raises(ValueError, match=r"tau must be in \[0, 2\]"): learn.tau_norm(bad)
    with pytest.raises(ValueError, match=r"tau must be in \[0, 2\]"): learn.tau_norm(None, taus=[0., 3.])
    learn.tau_norm(0.)
    _, _, tn = _last_linear(learn.model, (TauNormLinear,))
    x = torch.randn(4, tn.lin.in_features)
    torch.testing.assert_close(tn(x), x @ tn.lin.weight.t())  # tau=0: joint classifier without bias
    with learn.no_bar(): learn.tau_norm()
    tau = tn_tau = _last_linear(learn.model, (TauNormLinear,))[2].tau
    assert learn.tau_scores[tau] == max(learn.tau_scores.values()) and len(learn.tau_scores) == 21
    with learn.no_bar(): preds, targs = learn.get_preds()
    assert float(balanced_acc(preds, targs)) == pytest.approx(learn.tau_scores[tn_tau], abs=1e-6)
    assert sum(isinstance(m, TauNormLinear) for m in learn.model.modules()) == 1  # no stacking

def test_crt_and_lws(dls):
    learn = cls_learner(dls, 'test_resnet', pretrained=False)
    quiet_fit(learn, 1, 1e-3)
    body = {k: v.clone() for k, v in learn.model[0].state_dict().items()}
    samplers_seen = []
    class S(Callback):
        def before_batch(self):
            if self.training: samplers_seen.append(type(self.dl).__name__)
    with learn.no_bar(), learn.no_logging(): learn.crt(1, 1e-3, cbs=S())
    assert set(samplers_seen) == {'ClassSamplerDL'} and type(learn.dls.train).__name__ == 'TfmdDL'
    for k, v in learn.model[0].state_dict().items(): assert torch.equal(v, body[k]), k  # body and BN stats frozen
    with learn.no_bar(): p0 = learn.get_preds()[0]
    with learn.no_bar(), learn.no_logging(): learn.lws(1, 0.)
    with learn.no_bar(): torch.testing.assert_close(learn.get_preds()[0], p0)  # unit scales = stage-1 logits
    with learn.no_bar(), learn.no_logging(): learn.lws(2, 1e-2)
    _, _, w = _last_linear(learn.model, (LWSLinear,))
    assert not torch.equal(w.scales.data, torch.ones(3))
    for k, v in learn.model[0].state_dict().items(): assert torch.equal(v, body[k]), k

def test_export_and_predict_in_fresh_process(dls, tmp_path):
    "Each verb leaves a learner that exports and predicts; load it where only fastcls is importable"
    learn = bbn_learner(dls, 'test_resnet', pretrained=False)
    quiet_fit(learn, 1, 1e-3, cbs=CumulativeLearning())
    with learn.no_bar(), learn.no_logging():
        learn.crt(1, 1e-3); learn.lws(1, 1e-3); learn.tau_norm(); learn.posthoc_la(.5)
    assert isinstance(learn.model[1][-1], LogitAdjust)
    with learn.no_bar(): want = learn.get_preds(act=lambda x: x)[0]
    fn = tmp_path/'lt.pkl'
    learn.export(fn)
    code = textwrap.dedent(f"""
        import torch
        from fastai.learner import load_learner
        learn = load_learner({str(fn)!r})
        with learn.no_bar(): pred = learn.predict({str(dls.valid_ds.items.fname.iloc[0])!r})[0]
        print(type(learn.model).__name__, pred)
    """)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1].split()
    assert last[0] == 'BBNModel' and last[1] in dls.vocab
    learn2 = load_learner(fn)
    learn2.dls = dls
    with learn2.no_bar(): torch.testing.assert_close(learn2.get_preds(act=lambda x: x)[0], want)

def test_posthoc_la(trained, dls):
    with trained.no_bar(): p0 = trained.get_preds(act=lambda x: x)[0]
    trained.posthoc_la(1.); trained.posthoc_la(1.)
    n = class_counts(dls).float()
    with trained.no_bar(): torch.testing.assert_close(trained.get_preds(act=lambda x: x)[0], p0 - torch.log(n / n.sum() + 1e-12))

def test_not_a_cls_model(dls):
    from fastai.learner import Learner
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(3*32*32, 3)))
    with pytest.raises(ValueError, match="need a `cls_learner` model"): learn.tau_norm(1., force=True)

def test_star_import_shadows_no_fastai_name():
    code = ("import fastai.vision.all as fa\n"
            "import fastcls.losses as a, fastcls.samplers as b, fastcls.ltmetrics as c, fastcls.longtail as d\n"
            "clash = set(dir(fa)) & {n for m in (a, b, c, d) for n in m.__all__}\n"
            "assert not clash, clash\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
