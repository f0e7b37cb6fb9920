"Metric losses: batch-hard triplet and center loss parity, no-positive batches, P×K sampler, PML adapter, combinator, export."
import pickle, warnings
import pytest, torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses, miners as pml_miners, distances as pml_dist, reducers as pml_red
from fastai.vision.all import load_learner
from fastcls.learner import cls_learner
from fastcls.losses.metric import CenterLoss, TripletLoss, batch_hard_triplet, PMLLoss, CombinedLoss
from fastcls.data.samplers import pk_dls
from fastcls.test_utils import synth_dls

@pytest.fixture(scope='module')
def dls(): return synth_dls(n=64, size=32, n_classes=4, bs=16)

def _pml_batch_hard(emb, y, margin, normalize):
    d = pml_dist.LpDistance(normalize_embeddings=normalize)
    kw = dict(margin=0., smooth_loss=True) if margin == 'soft' else dict(margin=margin)
    return pml_losses.TripletMarginLoss(distance=d, reducer=pml_red.MeanReducer(), **kw)(emb, y, pml_miners.BatchHardMiner(distance=d)(emb, y))

@pytest.mark.parametrize('margin', [0.3, 0.05, 1.0, 'soft'])
@pytest.mark.parametrize('normalize', [False, True])
@pytest.mark.parametrize('seed', [0, 1])
def test_triplet_parity_with_pml(margin, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    emb, y = torch.randn(24, 8, generator=g), torch.randint(0, 5, (24,), generator=g)
    ours = TripletLoss(margin, normalize=normalize)(emb, y)
    assert torch.allclose(ours, _pml_batch_hard(emb, y, margin, normalize), atol=1e-5)

def test_triplet_gradient_matches_pml():
    g = torch.Generator().manual_seed(3)
    e1 = torch.randn(16, 6, generator=g).requires_grad_(); e2 = e1.detach().clone().requires_grad_()
    y = torch.arange(16) % 4
    TripletLoss(0.3)(e1, y).backward(); _pml_batch_hard(e2, y, 0.3, False).backward()
    assert torch.allclose(e1.grad, e2.grad, atol=1e-5)

def test_triplet_no_positive_is_zero_with_warning_never_nan():
    e = torch.zeros(4, 3, requires_grad=True)  # identical embeddings too: the 1e-12 eps keeps sqrt's gradient finite
    with pytest.warns(UserWarning, match='no anchor'): l = TripletLoss('soft')(e, torch.arange(4))
    assert float(l) == 0. and not torch.isnan(l)
    l.backward(); assert torch.isfinite(e.grad).all()
    # one class only: no negatives either
    with pytest.warns(UserWarning): assert float(batch_hard_triplet(torch.randn(4, 3), torch.zeros(4))) == 0.
    # identical points with positives: finite
    e = torch.zeros(4, 3, requires_grad=True); l = TripletLoss(0.3)(e, torch.tensor([0, 0, 1, 1])); l.backward()
    assert torch.isfinite(l) and torch.isfinite(e.grad).all()

@pytest.mark.parametrize('bad', [-0.1, 'hard', None])
def test_triplet_bad_margin(bad):
    with pytest.raises(ValueError, match="float >= 0 or 'soft'"): TripletLoss(bad)

def test_center_loss_caffe_rule_against_loop():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 4, generator=g), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    cl = CenterLoss(4, 4, alpha=0.3); c0 = cl.centers.clone()
    loss = cl(x, y)
    assert torch.allclose(loss, sum(((x[i] - c0[y[i]])**2).sum() for i in range(10)) / 20)
    for j in range(4):
        m = y == j
        delta = (c0[j] - x[m]).sum(0) / (1 + m.sum())
        assert torch.allclose(cl.centers[j], c0[j] - 0.3*delta, atol=1e-6)  # class 3 (absent) stays put

def test_center_loss_weight_scales_gradient_not_center_update():
    "The loss weight scales the gradient on the embeddings; the centres move by their own rate whatever the weight"
    x0, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    a, b = CenterLoss(3, 3), CenterLoss(3, 3); b.centers.copy_(a.centers); c0 = a.centers.clone()
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    (0.001*a(xa, y)).backward(); (10*b(xb, y)).backward()
    assert torch.equal(a.centers, b.centers) and not torch.equal(a.centers, c0)
    torch.testing.assert_close(xb.grad, 1e4*xa.grad)

@pytest.mark.parametrize('kw,msg', [(dict(update='adam'), "'caffe' or 'sgd'"), (dict(alpha=0), 'alpha')])
def test_center_loss_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg): CenterLoss(3, 4, **kw)

def test_pk_dls_batches(dls):
    pk = pk_dls(dls, p=2, k=3, seed=0)
    n = 0
    for xb, yb in pk.train:
        counts = torch.bincount(yb.cpu())
        assert len(yb) == 6 and sorted(counts[counts > 0].tolist()) == [3, 3]; n += 1
    assert n == len(pk.train) == len(dls.train_ds) // 6
    assert pk.valid is dls.valid and pk.train.bs == 6

def test_pk_dls_small_class_samples_with_replacement(dls):
    pk = pk_dls(dls, p=4, k=20, seed=0)  # 48 training items, 4 classes: fewer than 20 per class
    xb, yb = pk.one_batch()
    assert sorted(torch.bincount(yb.cpu()).tolist()) == [20]*4

@pytest.mark.parametrize('kw,msg', [(dict(p=9, k=2), 'only 4 classes'), (dict(p=2, k=1), 'ints >= 2'), (dict(p=1.5, k=2), 'ints >= 2')])
def test_pk_dls_bad_input(dls, kw, msg):
    with pytest.raises(ValueError, match=msg): pk_dls(dls, **kw)

def test_pml_adapter_matches_pml():
    g = torch.Generator().manual_seed(0)
    emb, y = torch.randn(20, 8, generator=g), torch.arange(20) % 5
    for loss, miner in [(pml_losses.ContrastiveLoss(), None), (pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner()),
                        (pml_losses.CircleLoss(), None)]:
        ref = loss(emb, y, miner(emb, y)) if miner is not None else loss(emb, y)
        assert torch.allclose(PMLLoss(loss, miner)(emb, y.float()), ref)
    with pytest.warns(UserWarning, match='margin head'): PMLLoss(pml_losses.CosFaceLoss(4, 8))
    with pytest.raises(TypeError): PMLLoss(3)

def test_combined_loss_trains_and_exports(dls, tmp_path):
    torch.manual_seed(0)
    pk = pk_dls(dls, p=2, k=4, seed=0)
    learn = cls_learner(pk, 'resnet18', head='arcface', embed_dim=16, pretrained=False)
    learn.add_metric_loss(TripletLoss('soft'), 1.).add_metric_loss(CenterLoss(4, 16), 0.01)
    learn.add_metric_loss(PMLLoss(pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner()), 0.5)
    assert isinstance(learn.loss_func, CombinedLoss) and len(learn.loss_func.terms) == 3
    c0 = learn.loss_func.terms[1][0].centers.clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert all(torch.isfinite(torch.tensor(learn.recorder.losses)))
    assert not torch.equal(c0, learn.loss_func.terms[1][0].centers)  # centres moved by their own rule
    learn.export(tmp_path/'m.pkl')
    new = load_learner(tmp_path/'m.pkl')
    xb, yb = [t.as_subclass(torch.Tensor) for t in pk.one_batch()]
    new.model.eval(); learn.model.eval()
    with torch.no_grad():
        a, b = new.loss_func(new.model(xb.cpu()), yb.cpu()), learn.loss_func(learn.model(xb), yb)
    assert torch.allclose(a, b.cpu(), atol=1e-5)

def test_combined_loss_plain_head_uses_last_linear_input(dls):
    learn = cls_learner(dls, 'resnet18', pretrained=False)
    learn.add_metric_loss(TripletLoss(0.3), 0.5)
    xb, yb = [t.as_subclass(torch.Tensor) for t in dls.one_batch()]
    learn.model.eval()
    with torch.no_grad():
        out = learn.model(xb); emb = learn.loss_func.cap.stored
        assert emb.shape == (len(xb), learn.model[1][-1][-1].in_features)
        assert torch.allclose(learn.loss_func(out, yb), F.cross_entropy(out, yb) + 0.5*TripletLoss(0.3)(emb, yb), atol=1e-5)

def test_combined_loss_bad_terms(dls):
    learn = cls_learner(dls, 'resnet18', pretrained=False)
    with pytest.raises(ValueError, match=r'\(loss, weight\) pairs'): CombinedLoss(learn.model, terms=[TripletLoss()])

def test_combined_loss_with_mixup(dls):
    from fastai.callback.mixup import MixUp
    from fastai.layers import NoneReduce
    torch.manual_seed(0)
    pk = pk_dls(dls, p=2, k=4, seed=0)
    learn = cls_learner(pk, 'resnet18', head='arcface', embed_dim=16, pretrained=False, cbs=MixUp())
    learn.add_metric_loss(TripletLoss(0.3), 0.5)
    xb, yb = [t.as_subclass(torch.Tensor) for t in pk.one_batch()]
    learn.model.eval()
    with torch.no_grad():
        out = learn.model(xb)
        with NoneReduce(learn.loss_func) as lf: per = lf(out, yb)  # what MixUp does
        assert per.shape == (len(yb),) and learn.loss_func.reduction == 'mean'
        assert torch.allclose(per.mean(), learn.loss_func(out, yb), atol=1e-5)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert all(torch.isfinite(torch.tensor(learn.recorder.losses)))
