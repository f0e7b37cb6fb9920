"Margin heads: PML parity, margin only in the loss, MixUp/CutMix, splitter/freeze, export, bad input."
import json, math, subprocess, sys, textwrap
import pytest, torch
import torch.nn.functional as F
from fastai.callback.mixup import MixUp, CutMix
from fastai.callback.core import Callback
from fastai.vision.all import PILImage
from pytorch_metric_learning import losses as pml_losses
from fastcls.learner import cls_learner
from fastcls.layers.heads import heads
from fastcls.layers.heads import MarginCrossEntropy, MarginHead, arcface_margin, sphereface_psi, margin_heads
from fastcls.test_utils import synth_dls, synth_df

@pytest.fixture(scope='module')
def dls(): return synth_dls(n=64, size=32, n_classes=3, bs=16)

def _batch(C, d, k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C*k, d, generator=g)
    y = torch.arange(16) % C
    emb = torch.randn(16, d, generator=g)
    Wn = F.normalize(W, dim=-1).view(C, k, d)[:, 0]
    emb[::2] = -2*Wn[y[::2]] + 0.05*emb[::2]  # theta_y > pi - m: ArcFace's fallback branch
    return W, emb.requires_grad_(), y

@pytest.mark.parametrize('name,pml_cls,kw,pkw,k', [
    ('arcface', pml_losses.ArcFaceLoss, dict(margin=0.5), dict(margin=math.degrees(0.5)), 1),
    ('arcface', pml_losses.ArcFaceLoss, dict(margin=0.3, scale=30.), dict(margin=math.degrees(0.3), scale=30), 1),
    ('cosface', pml_losses.CosFaceLoss, dict(margin=0.35), dict(margin=0.35), 1),
    ('cosface', pml_losses.CosFaceLoss, dict(margin=0.2, scale=16.), dict(margin=0.2, scale=16), 1),
    ('subcenter_arcface', pml_losses.SubCenterArcFaceLoss, dict(margin=0.5), dict(margin=math.degrees(0.5), sub_centers=3), 3),
])
def test_pml_parity(name, pml_cls, kw, pkw, k):
    C,d = 7,10
    W,emb,y = _batch(C, d, k)
    h = heads[name](d, C, embed_dim=None, neck=None, **kw)
    h.fc.weight.data.copy_(W)
    pml = pml_cls(num_classes=C, embedding_size=d, **{'scale': 64, **pkw})
    pml.W.data.copy_(W.T)
    ours = MarginCrossEntropy(h)(h(emb), y)
    ref = pml(emb, y)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours, ref)
    g_ours, = torch.autograd.grad(ours, emb)
    g_ref, = torch.autograd.grad(ref, emb)
    assert torch.allclose(g_ours, g_ref, atol=1e-4, rtol=1e-4)

def test_sphereface_psi_parity_and_monotone():
    C,d = 5,6
    W,emb,y = _batch(C, d)
    h = heads['sphereface'](d, C, embed_dim=None, neck=None, scale=4., lam=0.)
    h.fc.weight.data.copy_(W)
    pml = pml_losses.SphereFaceLoss(num_classes=C, embedding_size=d, margin=4, scale=1)
    pml.W.data.copy_(F.normalize(W, dim=-1).T)
    assert torch.allclose(MarginCrossEntropy(h)(h(emb), y), pml(4*F.normalize(emb), y), atol=1e-4)
    psi = sphereface_psi(torch.cos(torch.linspace(0, math.pi, 200)), 4)
    assert (psi[1:] < psi[:-1]).all()

def test_arcface_fallback_keeps_decreasing():
    t = torch.linspace(0, math.pi, 300)
    v = arcface_margin(torch.cos(t), 0.5)
    assert (v[1:] <= v[:-1] + 1e-6).all()

def test_margin_only_in_the_loss(dls):
    learn = cls_learner(dls, 'resnet18', head='arcface', embed_dim=32, pretrained=False)
    assert isinstance(learn.loss_func, MarginCrossEntropy) and learn.loss_func.head is learn.model[1][-1]
    h = learn.model[1][-1]
    x = torch.randn(4, 3, 32, 32)
    learn.model.eval()
    with torch.no_grad():
        logits = learn.model(x)
        feats = h.features(learn.model[1][0](learn.model[0](x)))
    assert torch.allclose(logits, h.scale * F.normalize(feats) @ F.normalize(h.fc.weight).T, atol=1e-4)
    preds,targs = learn.get_preds()
    assert torch.allclose(preds.sum(1), torch.ones(len(preds)), atol=1e-5)
    y = torch.zeros(4, dtype=torch.long)
    assert learn.loss_func(logits, y) > F.cross_entropy(logits, y)

class _Grab(Callback):
    order = 100  # after the mixing callbacks
    def after_loss(self):
        if self.training: self.got = (self.pred.detach(), self.learn.yb[0], self.mix.yb1[0], self.mix.lam, self.loss.detach())

def _independent_arcface_ce(pred, y, s, m):
    cos = (pred/s).clamp(-1, 1)
    th = torch.acos(cos.gather(1, y[:, None]).clamp(-1+1e-7, 1-1e-7))
    ty = torch.where(th <= math.pi - m, torch.cos(th + m), torch.cos(th) - m*math.sin(m))
    return F.cross_entropy(pred.scatter(1, y[:, None], s*ty), y, reduction='none')

@pytest.mark.parametrize('mix_cls', [MixUp, CutMix])
def test_mixing_applies_margin_to_both_targets(dls, mix_cls):
    torch.manual_seed(0)
    mix, grab = mix_cls(1.), _Grab()
    learn = cls_learner(dls, 'resnet18', head='arcface', embed_dim=32, margin=0.4, scale=16., pretrained=False, cbs=[mix, grab])
    grab.mix = mix
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    pred,y,y1,lam,loss = grab.got
    lam = lam.view(-1) if torch.is_tensor(lam) else torch.tensor(lam)
    expected = torch.lerp(_independent_arcface_ce(pred, y1, 16., 0.4), _independent_arcface_ce(pred, y, 16., 0.4), lam).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    no_margin = torch.lerp(F.cross_entropy(pred, y1, reduction='none'), F.cross_entropy(pred, y, reduction='none'), lam).mean()
    assert not torch.allclose(loss, no_margin, atol=1e-3)
    assert isinstance(learn.loss_func, MarginCrossEntropy)  # restored after fit

@pytest.mark.parametrize('name', list(margin_heads))
def test_every_head_trains_with_mixup(dls, name):
    "MixUp calls the loss twice per step (both targets): heads with state updated in the loss (AdaCos) must still back-propagate"
    torch.manual_seed(0)
    learn = cls_learner(dls, 'resnet18', head=name, embed_dim=32, pretrained=False, cbs=MixUp(1.))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert math.isfinite(learn.recorder.values[-1][0])

@pytest.mark.parametrize('name', list(margin_heads))
def test_every_head_trains(dls, name):
    torch.manual_seed(0)
    learn = cls_learner(dls, 'resnet18', head=name, embed_dim=32, pretrained=False)
    w0 = learn.model[1][-1].fc.weight.detach().clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)
    losses = [v[0] for v in learn.recorder.values]
    assert all(math.isfinite(l) for l in losses) and not torch.equal(w0, learn.model[1][-1].fc.weight)
    assert 0 <= learn.recorder.values[-1][2] <= 1  # accuracy column

def test_head_in_splitter_and_trains_while_body_frozen(dls):
    learn = cls_learner(dls, 'resnet18', head='cosface', embed_dim=32, pretrained=False)
    groups = learn.splitter(learn.model)
    head_ids = {id(p) for p in learn.model[1][-1].parameters()}
    assert head_ids <= {id(p) for p in groups[-1]}
    learn.freeze()
    conv = [p for p in learn.model[0].parameters() if p.ndim == 4]
    c0,w0 = conv[0].detach().clone(), learn.model[1][-1].fc.weight.detach().clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert torch.equal(conv[0], c0) and not torch.equal(w0, learn.model[1][-1].fc.weight)
    learn.unfreeze(); learn.opt.set_hyper('lr', slice(1e-5, 1e-3))
    assert learn.opt.hypers[0]['lr'] < learn.opt.hypers[-1]['lr']
    assert 'neck.bias' not in dict(learn.model[1][-1].named_parameters())

def test_adacos_scale_adapts(dls):
    torch.manual_seed(0)
    learn = cls_learner(dls, 'resnet18', head='adacos', embed_dim=32, pretrained=False)
    s0 = float(learn.model[1][-1].scale)
    assert math.isclose(s0, math.sqrt(2)*math.log(2), rel_tol=1e-6)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert float(learn.model[1][-1].next_scale) != s0

def test_export_round_trip_in_fresh_process(dls, tmp_path, predict_in_fresh_process):
    torch.manual_seed(0)
    learn = cls_learner(dls, 'resnet18', head='subcenter_arcface', embed_dim=32, pretrained=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    fn = tmp_path/'m.pkl'
    learn.export(fn)
    files = list(synth_df(n=64, size=32, n_classes=3).fname[:3])
    with learn.no_bar(): here = [learn.predict(PILImage.create(f))[2].tolist() for f in files]
    there = predict_in_fresh_process(fn, files, check="assert type(learn.loss_func).__name__ == 'MarginCrossEntropy' and learn.loss_func.head is learn.model[1][-1]")
    assert torch.allclose(torch.tensor(here), torch.tensor(there), atol=1e-6)

@pytest.mark.parametrize('kwargs,msg', [
    (dict(head='arcfce'), "Did you mean 'arcface'"),
    (dict(head='arcface', embed_dim=0), 'embed_dim must be a positive int'),
    (dict(head='cosface', embed_dim=-8), 'embed_dim must be a positive int'),
    (dict(head='arcface', margin=28.6), 'degrees'),
    (dict(head='arcface', margin=-0.1), r'\[0, pi/2\)'),
    (dict(head='cosface', margin=1.5), r'\[0, 1\)'),
    (dict(head='sphereface', margin=0), r'int in \[1, 8\]'),
    (dict(head='arcface', scale=0), 'scale must be > 0'),
    (dict(head='subcenter_arcface', k=0), 'k \\(sub-centres'),
    (dict(head='adacos', margin=0.5), 'no margin'),
])
def test_bad_input(dls, kwargs, msg):
    with pytest.raises(ValueError, match=msg): cls_learner(dls, 'resnet18', pretrained=False, **kwargs)

def test_loss_needs_margin_head():
    with pytest.raises(TypeError, match='needs a MarginHead'): MarginCrossEntropy(torch.nn.Linear(3, 3))

def test_bnneck_head_plain_ce(dls):
    from fastai.losses import CrossEntropyLossFlat
    from fastcls.layers.heads import EmbeddingHead, embedding_module
    learn = cls_learner(dls, 'resnet18', head='bnneck', embed_dim=24, pretrained=False)
    h = learn.model[1][-1]
    assert isinstance(h, EmbeddingHead) and isinstance(learn.loss_func, CrossEntropyLossFlat)
    assert 'neck.bias' not in dict(h.named_parameters()) and h.fc.bias is None
    assert embedding_module(learn.model) == (h.neck, False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    x = torch.randn(3, h.embed[-1].in_features); h.eval()
    assert torch.allclose(h(x), h.fc(h.neck(h.embed(x))))
