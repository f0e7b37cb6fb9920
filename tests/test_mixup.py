"CutMixUp: pasted area vs λ, label weights, loss equal to the hand-computed mix, any loss, no validation mixing, bad input."
import pytest, torch, torch.nn.functional as F
from torch import nn
from fastai.vision.all import (Learner, Callback, CrossEntropyLossFlat, BCEWithLogitsLossFlat, FocalLossFlat,
                               LabelSmoothingCrossEntropyFlat, accuracy)
from fastcls.callback.mixup import CutMixUp
from fastcls.test_utils import synth_dls
from fastcls.data.datasets import digits_dls
from fastcls.learner import cls_learner

def gen(seed): return torch.Generator().manual_seed(seed)

def const_batch(bs, size=(24, 32)):
    "Image `i` is constant `i`, so every pixel tells which image it came from"
    return torch.arange(bs).float().view(-1, 1, 1, 1).expand(bs, 3, *size).contiguous()

@pytest.fixture(scope='module')
def tiny_learn():
    return Learner(synth_dls(n=16, bs=4), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)))

def batch_through(cb, learn, x, y, loss_func):
    "Run `cb`'s training hooks on one batch `(x, y)` with `loss_func` as the learner's loss; return the loss function used"
    learn.loss_func,learn.xb,learn.yb,learn.training,learn.pct_train = loss_func,(x,),(y,),True,0.
    cb.learn = learn
    cb.before_train()
    cb.before_batch()
    return learn.loss_func

@pytest.mark.parametrize('mode', ['batch', 'elem'])
@pytest.mark.parametrize('bs', [1, 2, 7])
@pytest.mark.parametrize('minmax', [None, (0.2, 0.8)])
def test_pasted_area_is_one_minus_lam(mode, bs, minmax):
    for seed in range(15):
        cb = CutMixUp(switch_prob=1., mode=mode, cutmix_minmax=minmax, generator=gen(seed))
        x = const_batch(bs)
        lam,cut,box,perm = d = cb.draw(bs, (24, 32))
        assert cut.all() and ((lam >= 0) & (lam <= 1)).all()
        xm = cb.mix(x, d)
        for i in range(bs):
            k = 0 if mode == 'batch' else i
            yl,yh,xl,xh = box[k].tolist()
            assert torch.equal(xm[i][:, yl:yh, xl:xh], x[perm[i]][:, yl:yh, xl:xh])  # the box comes from the partner
            outside = torch.ones(24, 32, dtype=torch.bool); outside[yl:yh, xl:xh] = False
            assert torch.equal(xm[i][:, outside], x[i][:, outside])                # the rest is the image itself
            if perm[i] != i: assert abs(float((xm[i] == x[i]).float().mean()) - float(lam[k])) < 1e-6

def test_box_follows_timm_rand_bbox():
    "Box sides before clipping are those of timm's `rand_bbox`"
    from timm.data.mixup import rand_bbox
    cb = CutMixUp(switch_prob=1., correct_lam=False, mode='elem', generator=gen(0))
    lam,cut,box,perm = cb.draw(200, (40, 40))
    central = (box[:,0] > 0) & (box[:,1] < 40) & (box[:,2] > 0) & (box[:,3] < 40)
    for l,b in zip(lam[central], box[central]):
        yl,yh,xl,xh = rand_bbox((1, 3, 40, 40), float(l), margin=0.5)  # a margin that keeps timm's box inside
        assert (b[1]-b[0], b[3]-b[2]) == (yh-yl, xh-xl)

def test_correct_lam_off_keeps_beta_draw():
    on,off = [CutMixUp(switch_prob=1., correct_lam=c, mode='elem', generator=gen(5)).draw(64, (9, 9)) for c in (True, False)]
    assert torch.equal(on[2], off[2])
    area = (on[2][:,1]-on[2][:,0])*(on[2][:,3]-on[2][:,2])/81
    assert torch.allclose(on[0], 1 - area.float())
    assert not torch.allclose(off[0], on[0])

def test_mixup_is_a_blend_with_one_lam_per_batch():
    cb = CutMixUp(switch_prob=0., generator=gen(1))
    x = torch.randn(5, 3, 8, 8)
    lam,cut,box,perm = d = cb.draw(5, (8, 8))
    assert not cut.any() and lam.shape == (1,)
    assert torch.allclose(cb.mix(x, d), lam[0]*x + (1-lam[0])*x[perm], atol=1e-6)

def test_elem_mode_mixes_each_image_its_own_way():
    cb = CutMixUp(mode='elem', prob=0.7, generator=gen(2))
    x = torch.randn(64, 3, 8, 8)
    lam,cut,box,perm = d = cb.draw(64, (8, 8))
    xm = cb.mix(x, d)
    blend = ~cut & (lam < 1)
    assert cut.any() and blend.any() and (lam == 1).any()           # some CutMix, some MixUp, some untouched
    assert torch.allclose(xm[blend], lam[blend].view(-1, 1, 1, 1)*x[blend] + (1-lam[blend].view(-1, 1, 1, 1))*x[perm][blend], atol=1e-6)
    assert torch.equal(xm[lam == 1], x[lam == 1])

def test_generator_makes_draws_repeat():
    d1,d2 = [CutMixUp(mode='elem', generator=gen(3)).draw(16, (8, 8)) for _ in range(2)]
    assert all(torch.equal(a, b) for a,b in zip(d1, d2))
    d3 = CutMixUp(mode='elem', generator=gen(4)).draw(16, (8, 8))
    assert not torch.equal(d1[0], d3[0])

def test_prob_and_switch_prob():
    assert (CutMixUp(prob=0., mode='elem', generator=gen(0)).draw(100, (8, 8))[0] == 1).all()
    lam,cut,_,_ = CutMixUp(prob=1., switch_prob=0., mode='elem', generator=gen(0)).draw(100, (8, 8))
    assert not cut.any() and (lam < 1).all()
    lam,cut,_,_ = CutMixUp(prob=0.5, switch_prob=0.5, mode='elem', generator=gen(0)).draw(2000, (8, 8))
    applied = lam < 1
    assert 0.45 < applied.float().mean() < 0.55 and 0.45 < cut[applied].float().mean() < 0.55

@pytest.mark.parametrize('mode', ['batch', 'elem'])
@pytest.mark.parametrize('eps', [0., 0.1])
def test_loss_is_the_hand_computed_mix(tiny_learn, mode, eps):
    "Integer targets: λ·CE(ŷ, y) + (1-λ)·CE(ŷ, y[perm]); with ε it equals timm's smoothed, mixed soft-target CE"
    cb = CutMixUp(mode=mode, label_smoothing=eps, generator=gen(7))
    x,y = torch.randn(7, 3, 8, 8),torch.randint(0, 5, (7,))
    lf = batch_through(cb, tiny_learn, x, y, CrossEntropyLossFlat())
    assert cb.mixing and torch.equal(tiny_learn.yb[0], y)               # targets are not touched
    lam,perm = cb.draws[0],cb.draws[3]
    assert torch.equal(cb.yb1[0], y[perm]) and torch.equal(cb.lam, lam)
    pred = torch.randn(7, 5)
    lam_i = lam.expand(7)
    ce = lambda t: F.cross_entropy(pred, t, reduction='none')
    mixed_ce = lam_i*ce(y) + (1-lam_i)*ce(y[perm])
    soft = lambda t: F.one_hot(t, 5).float()*(1 - eps) + eps/5            # timm's `mixup_target` smoothing
    target = lam_i[:,None]*soft(y) + (1-lam_i[:,None])*soft(y[perm])
    timm_like = (-target*F.log_softmax(pred, -1)).sum(-1).mean()         # timm's SoftTargetCrossEntropy
    loss = lf(pred, y)
    assert torch.allclose(loss, timm_like, atol=1e-6)
    if eps == 0: assert torch.allclose(loss, mixed_ce.mean(), atol=1e-6)
    cb.after_train()
    assert isinstance(tiny_learn.loss_func, CrossEntropyLossFlat)

@pytest.mark.parametrize('loss_func', [FocalLossFlat(gamma=2.), LabelSmoothingCrossEntropyFlat(eps=0.1)])
def test_any_integer_loss_is_mixed_per_item(tiny_learn, loss_func):
    cb = CutMixUp(mode='elem', generator=gen(8))
    x,y = torch.randn(6, 3, 8, 8),torch.randint(0, 4, (6,))
    lf = batch_through(cb, tiny_learn, x, y, loss_func)
    pred = torch.randn(6, 4)
    lam,perm = cb.draws[0],cb.draws[3]
    loss_func.reduction = 'none'
    want = (lam*loss_func(pred, y) + (1-lam)*loss_func(pred, y[perm])).mean()
    loss_func.reduction = 'mean'
    assert torch.allclose(lf(pred, y), want, atol=1e-6)
    cb.after_train()

@pytest.mark.parametrize('mode', ['batch', 'elem'])
def test_float_targets_are_mixed(tiny_learn, mode):
    "Multi-label (float) targets: the targets are mixed by λ and the loss is the learner's own, unchanged"
    seen = []
    class Spy(BCEWithLogitsLossFlat):
        def __call__(self, pred, targ, **kw): seen.append(targ); return super().__call__(pred, targ, **kw)
    cb = CutMixUp(mode=mode, generator=gen(9), label_smoothing=0.2)
    x,y = torch.randn(5, 3, 8, 8),torch.randint(0, 2, (5, 3)).float()
    lf = batch_through(cb, tiny_learn, x, y, Spy())
    lam,perm = cb.draws[0].view(-1, 1),cb.draws[3]
    pred = torch.randn(5, 3)
    lf(pred, y)
    want = (lam*y + (1-lam)*y[perm])*0.8 + 0.1
    assert torch.allclose(seen[-1], want)
    cb.after_train()

class Record(Callback):
    "Record, for every batch, whether training, the inputs before/after CutMixUp and the targets metrics see"
    order = 1  # after CutMixUp (0)
    def before_fit(self): self.rows = []
    def before_batch(self): self.rows.append((self.training, self.learn.xb[0].clone(), self.learn.orig.clone(),
                                              self.learn.yb[0].clone(), self.learn.orig_y.clone(), self.learn.pct_train))
class Orig(Callback):
    order = -1
    def before_batch(self): self.learn.orig,self.learn.orig_y = self.learn.xb[0].clone(),self.learn.yb[0].clone()

def test_training_mixes_validation_does_not(tiny_learn):
    learn = Learner(synth_dls(n=32, bs=5), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)),
                    metrics=accuracy)  # bs 5: odd batches
    rec,old = Record(),learn.loss_func
    with learn.no_bar(), learn.no_logging(): learn.fit(2, cbs=[CutMixUp(stop_pct=0.5, generator=gen(0)), rec, Orig()])
    train = [r for r in rec.rows if r[0]]
    assert all(torch.equal(r[3], r[4]) for r in rec.rows)                         # metrics and losses see true targets
    assert all(torch.equal(r[1], r[2]) for r in rec.rows if not r[0])              # validation never mixed
    assert any(not torch.equal(r[1], r[2]) for r in train if r[5] < 0.5)          # training mixed ...
    assert all(torch.equal(r[1], r[2]) for r in train if r[5] >= 0.5)              # ... except the last stop_pct
    assert learn.loss_func is old

def test_loss_restored_after_an_error():
    learn = Learner(synth_dls(n=16, bs=4), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)))
    old = learn.loss_func
    class Boom(Callback):
        def after_loss(self): raise RuntimeError('boom')
    cb = CutMixUp()
    with pytest.raises(RuntimeError), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[cb, Boom()])
    pred,y = torch.randn(4, 2),torch.randint(0, 2, (4,))
    assert torch.equal(learn.loss_func(pred, y), old(pred, y))  # an error (not a cancel) skips `after_train`: still the plain loss
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[cb])  # and no double wrapping on the next fit
    assert learn.loss_func is old

def test_short_training_on_digits_with_label_smoothing():
    "CutMixUp + label smoothing on real data: the model learns (validation on clean images, true labels)"
    torch.manual_seed(0)
    dls = digits_dls(size=32, bs=64)
    learn = cls_learner(dls, 'test_resnet', pretrained=False, cbs=CutMixUp(mode='elem', label_smoothing=0.1, generator=gen(0)))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(6, 1e-2)
    vals = learn.recorder.values
    assert vals[-1][1] < vals[0][1]  # validation loss went down
    assert vals[-1][2] > 0.5         # 10 classes: far above chance (0.1)

@pytest.mark.parametrize('kwargs,msg', [
    (dict(mixup_alpha=0., cutmix_alpha=0.), 'both off'),
    (dict(cutmix_alpha=-1.), '`cutmix_alpha` must be >= 0'),
    (dict(prob=1.5), '`prob` must be in'),
    (dict(prob=-0.1), '`prob` must be in'),
    (dict(switch_prob=2), '`switch_prob` must be in'),
    (dict(stop_pct=1.2), '`stop_pct` must be in'),
    (dict(label_smoothing=1.), '`label_smoothing` must be in'),
    (dict(mode='pair'), 'Valid choices: batch, elem'),
    (dict(cutmix_minmax=(0.8, 0.2)), '`cutmix_minmax` must be'),
])
def test_bad_input(kwargs, msg):
    with pytest.raises(ValueError, match=msg): CutMixUp(**kwargs)

def test_disabled_mix_may_have_no_alpha():
    CutMixUp(mixup_alpha=0., switch_prob=1.)   # CutMix only
    CutMixUp(cutmix_alpha=0., switch_prob=0.)  # MixUp only

def test_cutmix_needs_images(tiny_learn):
    with pytest.raises(ValueError, match='CutMix needs image batches'):
        batch_through(CutMixUp(), tiny_learn, torch.randn(4, 10), torch.randint(0, 2, (4,)), CrossEntropyLossFlat())
    cb = CutMixUp(switch_prob=0., mode='elem', generator=gen(0))  # MixUp works on any tensor
    batch_through(cb, tiny_learn, torch.randn(4, 10), torch.randint(0, 2, (4,)), CrossEntropyLossFlat())
    cb.after_train()
