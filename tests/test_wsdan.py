"WS-DAN: crop/drop against the reference rule, thresholds, feature centres, training loss, test-time average, export, gradients, bad input."
import json, subprocess, sys, textwrap
import numpy as np, pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai.vision.all import PILImage, CrossEntropyLossFlat
import fastcls.callback.wsdan as wsdan
from fastcls.callback.wsdan import WSDAN, wsdan_learner, attention_crop, attention_drop, sample_parts, feature_center_loss
from fastcls.layers.pooling import BAPool
from fastcls.learner import cls_learner
from fastcls.test_utils import synth_dls, synth_df, pretrained_like

@pytest.fixture(scope='module')
def dls(): return synth_dls(n=32, size=64, n_classes=2, bs=8)

def crop_ref(images, A, theta, pad):
    "GuYuc/WS-DAN.PyTorch `batch_augment(mode='crop')` rule: align-corners upsampling, box of mask >= theta*max, +-pad*size, clipped, exclusive end"
    H,W = images.shape[-2:]
    out = []
    for i in range(len(images)):
        m = F.interpolate(A[i:i+1], size=(H, W), mode='bilinear', align_corners=True)[0, 0] >= theta[i]*A[i].max()
        nz = m.nonzero()
        h0,h1 = max(int(nz[:, 0].min().item() - pad*H), 0),min(int(nz[:, 0].max().item() + pad*H), H)
        w0,w1 = max(int(nz[:, 1].min().item() - pad*W), 0),min(int(nz[:, 1].max().item() + pad*W), W)
        out.append(F.interpolate(images[i:i+1, :, h0:h1, w0:w1], size=(H, W), mode='bilinear', align_corners=True))
    return torch.cat(out)

def drop_ref(images, A, theta):
    "GuYuc `batch_augment(mode='drop')`: keep pixels where the upsampled map is < theta*max"
    H,W = images.shape[-2:]
    m = torch.cat([F.interpolate(A[i:i+1], size=(H, W), mode='bilinear', align_corners=True) < theta[i]*A[i].max() for i in range(len(A))])
    return images * m.float()

@pytest.mark.parametrize('pad', [0.1, 0.])
@pytest.mark.parametrize('theta', [0.4, 0.5, 0.6])
def test_crop_matches_reference(pad, theta):
    torch.manual_seed(0)
    x,A = torch.randn(4, 3, 40, 48),torch.rand(4, 1, 5, 6)
    th = torch.full((4,), theta)
    assert torch.allclose(attention_crop(x, A, th, pad), crop_ref(x, A, th, pad), atol=1e-6)

@pytest.mark.parametrize('theta', [0.2, 0.35, 0.5])
def test_drop_matches_reference(theta):
    torch.manual_seed(1)
    x,A = torch.randn(4, 3, 40, 48),torch.rand(4, 1, 5, 6)
    th = torch.full((4,), theta)
    assert torch.equal(attention_drop(x, A, th), drop_ref(x, A, th))

def test_crop_box_follows_threshold():
    "A single peak: a higher threshold gives a smaller box, so a bigger zoom"
    yy,xx = torch.meshgrid(torch.arange(32.), torch.arange(32.), indexing='ij')
    A = torch.exp(-((yy - 10)**2 + (xx - 20)**2) / 50)[None, None]
    x = torch.stack([yy, xx])[None] / 31  # image = pixel coordinates
    lo,hi = [attention_crop(x, A, torch.tensor([t]), pad=0.) for t in (0.2, 0.8)]
    span = lambda c: (c[0, 0].max() - c[0, 0].min()).item()
    assert span(hi) < span(lo) < 1
    assert abs(hi[0, 0].mean().item()*31 - 10) < 1.5 and abs(hi[0, 1].mean().item()*31 - 20) < 1.5  # centred on the peak

def test_drop_erases_exactly_above_threshold():
    A = torch.tensor([[[[0., .3], [.6, 1.]]]])
    x = torch.ones(1, 2, 2, 2)
    assert torch.equal(attention_drop(x, A, torch.tensor([0.5]))[0, 0], torch.tensor([[1., 1.], [0., 0.]]))
    assert torch.equal(attention_drop(x, A, torch.tensor([0.25]))[0, 0], torch.tensor([[1., 0.], [0., 0.]]))

def test_sample_parts_probabilities():
    "Part k is drawn with probability proportional to sqrt(sum A_k)"
    A = torch.zeros(1, 3, 2, 2)
    A[0, 0], A[0, 2] = 1., 9.  # sums 4 and 36: sqrt 2 and 6 -> p = 0.25, 0, 0.75
    k = sample_parts(A.expand(2000, -1, -1, -1), 2, torch.Generator().manual_seed(0))
    freq = torch.bincount(k.flatten(), minlength=3).float() / k.numel()
    assert freq[1] == 0 and abs(freq[0] - 0.25) < 0.03 and abs(freq[2] - 0.75) < 0.03

def test_feature_center_matches_official_update():
    "official: c <- c - (1-alpha)(normalize(c) - f), alpha=0.95, accumulated over the batch (scatter_sub); loss mean_i sum (f - c_hat)^2"
    torch.manual_seed(0)
    centers = torch.randn(3, 8)
    f,y = F.normalize(torch.randn(5, 8), dim=-1),torch.tensor([0, 2, 0, 1, 0])
    c_hat = F.normalize(centers, dim=-1)
    exp_loss = ((f - c_hat[y])**2).sum(1).mean()
    exp_c = centers.clone()
    for i in range(5): exp_c[y[i]] -= (1 - 0.95) * (c_hat[y[i]] - f[i])
    loss = feature_center_loss(f, y, centers, beta=0.05)
    assert torch.allclose(loss, exp_loss) and torch.allclose(centers, exp_c)

def test_feature_center_loss_gradient_only_to_features():
    centers = torch.zeros(2, 4)
    f = F.normalize(torch.rand(3, 4), dim=-1).requires_grad_()
    feature_center_loss(f, torch.tensor([0, 1, 1]), centers).backward()
    assert torch.allclose(f.grad, 2 * f.detach() / 3)  # zero centres: d/df mean |f|^2
    assert not centers.requires_grad

def test_callback_thresholds_sampled_in_official_ranges(dls, monkeypatch):
    seen = dict(crop=[], drop=[])
    crop,drop = wsdan.attention_crop,wsdan.attention_drop
    def rec_crop(x, A, theta, pad=0.1):
        if pad == 0.1: seen['crop'].append(theta)
        return crop(x, A, theta, pad)
    def rec_drop(x, A, theta): seen['drop'].append(theta); return drop(x, A, theta)
    monkeypatch.setattr(wsdan, 'attention_crop', rec_crop); monkeypatch.setattr(wsdan, 'attention_drop', rec_drop)
    learn = wsdan_learner(dls, 'resnet18', M=4, pretrained=False, seed=0, test_crop=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    c,d = torch.cat(seen['crop']),torch.cat(seen['drop'])
    assert len(c) == len(d) == len(dls.train) * dls.train.bs
    assert c.min() >= 0.4 and c.max() <= 0.6 and d.min() >= 0.2 and d.max() <= 0.5
    assert c.std() > 0.02 and d.std() > 0.02

def _one_batch_state(dls, center_weight):
    "A WS-DAN learner in eval mode (deterministic BN) with hooks on, after a forward pass on one batch"
    torch.manual_seed(0)
    learn = wsdan_learner(dls, 'resnet18', M=4, pretrained=False, seed=3, center_weight=center_weight)
    learn.model.eval()
    cb = learn.wsdan
    cb.before_fit(); cb._hook()
    x,y = dls.one_batch()
    learn.xb,learn.yb = (x.cpu(),),(y.cpu(),)
    learn.training = True
    learn.pred = learn.model(*learn.xb)
    learn.loss_grad = learn.loss_func(learn.pred, *learn.yb)
    return learn,cb

@pytest.mark.parametrize('center_weight', [0., 1.])
def test_training_loss_is_mean_of_three_plus_centre(dls, center_weight):
    learn,cb = _one_batch_state(dls, center_weight)
    x,y = learn.xb[0],learn.yb[0]
    A,f = cb._A.detach().clone(),(cb._f / 100.).detach().clone()
    cb.after_loss(); cb._unhook()  # before the forward passes below, which the hooks would record
    # replay the callback's random draws with the same seed
    g = torch.Generator().manual_seed(3)
    k = sample_parts(A, 2, g)
    n,i = len(x),torch.arange(len(x))
    tc = torch.rand(n, generator=g) * 0.2 + 0.4
    td = torch.rand(n, generator=g) * 0.3 + 0.2
    crops,drops = crop_ref(x, A[i, k[:, 0]][:, None], tc, 0.1),drop_ref(x, A[i, k[:, 1]][:, None], td)
    ce = CrossEntropyLossFlat()
    with torch.no_grad():
        exp = (ce(learn.pred, y) + ce(learn.model(crops), y) + ce(learn.model(drops), y)) / 3
        if center_weight: exp = exp + ((f - 0)**2).sum(1).mean()  # centres start at zero
    assert torch.allclose(learn.loss_grad, exp, atol=1e-5) and learn.loss_grad.requires_grad
    if center_weight:
        exp_c = torch.zeros(2, f.shape[1]).index_add_(0, y.as_subclass(torch.Tensor), 0.05 * f.as_subclass(torch.Tensor))
        assert torch.allclose(cb.centers, exp_c, atol=1e-6)
    else: assert cb.centers is None

@pytest.fixture(scope='module')
def trained(dls):
    torch.manual_seed(0)
    learn = wsdan_learner(dls, 'resnet18', M=4, pretrained=False, seed=0)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-5)  # small lr: predictions stay away from 0/1
    return learn

def test_test_time_average_of_full_and_crop(trained, dls):
    "log(0.5 softmax(full) + 0.5 softmax(crop to the mean attention map)), with the default (0.1, 5%) and a selective threshold"
    learn,cb = trained,trained.wsdan
    m,bap = learn.model.eval(),learn.model[1][0]
    x = torch.cat([b[0].cpu() for b in dls.valid]).as_subclass(torch.Tensor)
    with torch.no_grad(): full = F.softmax(m(x), -1)
    for theta in (0.1, 0.9):
        cb.test_theta = theta
        try: preds,_ = learn.get_preds()
        finally: cb.test_theta = 0.1
        with torch.no_grad():
            A = bap.attn(m[0](x))
            crops = crop_ref(x, A.mean(1, keepdim=True), torch.full((len(x),), theta), 0.05)
            exp = (full + F.softmax(m(crops), -1)) / 2
        assert torch.allclose(preds, exp, atol=1e-5)
    assert not torch.allclose(preds, full, atol=1e-3)  # a selective crop changes the prediction
    cb.test_crop = False
    try: plain,_ = learn.get_preds()
    finally: cb.test_crop = True
    assert torch.allclose(plain, full, atol=1e-5)
    assert cb._hooks == [] and not any(bap._forward_hooks) and not any(bap.attn._forward_hooks)

def test_export_round_trip_keeps_test_time_crops(trained, dls, tmp_path):
    learn = trained
    learn.wsdan.test_theta = 0.9  # a crop that changes predictions, so losing the callback would show
    try:
        fn = tmp_path/'wsdan.pkl'
        learn.export(fn)
        files = list(synth_df(n=32, size=64, n_classes=2).fname[:3])
        with learn.no_bar(): here = [learn.predict(PILImage.create(f))[2].tolist() for f in files]
        learn.wsdan.test_crop = False
        with learn.no_bar(): full = [learn.predict(PILImage.create(f))[2].tolist() for f in files]
    finally: learn.wsdan.test_crop,learn.wsdan.test_theta = True,0.1
    code = textwrap.dedent(f"""
        import json
        from fastai.vision.all import load_learner, PILImage
        learn = load_learner({str(fn)!r})
        with learn.no_bar(): print(json.dumps([type(learn.wsdan).__name__, learn.wsdan.test_crop, [learn.predict(PILImage.create(f))[2].tolist() for f in {files!r}]]))
    """)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    name,tc,there = json.loads(out.strip().splitlines()[-1])
    assert name == 'WSDAN' and tc
    assert torch.allclose(torch.tensor(here), torch.tensor(there), atol=1e-6)
    assert not torch.allclose(torch.tensor(full), torch.tensor(there), atol=1e-3)

@pytest.mark.parametrize('pool', ['avg', 'gem', 'bilinear', 'bap', 'wsdan'])
def test_gradients_reach_last_body_stage(dls, pool):
    "What Grad-CAM needs: d logit / d (last stage activation and weights) is non-zero with every head"
    torch.manual_seed(0)
    learn = wsdan_learner(dls, 'resnet18', M=4, pretrained=False) if pool == 'wsdan' else cls_learner(dls, 'resnet18', pool=pool, pretrained=False)
    m = learn.model.eval()
    pretrained_like(m[0])  # timm zero-initialises each block's last BN: no gradient would reach those convs
    stage = m[0].model.layer4
    acts = []
    def keep(mod, i, o): o.retain_grad(); acts.append(o)
    h = stage.register_forward_hook(keep)
    try: m(torch.randn(2, 3, 64, 64))[:, 1].sum().backward()
    finally: h.remove()
    assert acts[0].grad is not None and acts[0].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters())

def test_gradcam_with_wsdan_model(dls):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    torch.manual_seed(0)
    m = wsdan_learner(dls, 'resnet18', M=4, pretrained=False).model.eval()
    with GradCAM(model=m, target_layers=[m[0].model.layer4]) as cam: g = cam(input_tensor=torch.randn(2, 3, 128, 128), targets=[ClassifierOutputTarget(0)]*2)
    assert g.shape == (2, 128, 128) and np.isfinite(g).all() and g.std() > 0

@pytest.mark.parametrize('kw,msg', [(dict(M=0), 'positive integer'), (dict(M=-3), 'positive integer'), (dict(M=2.5), 'positive integer'),
                                    (dict(crop_theta=(0.4, 1.2)), 'crop_theta'), (dict(crop_theta=0.), 'crop_theta'),
                                    (dict(crop_theta=(0.6, 0.4)), 'crop_theta'), (dict(drop_theta=1.), 'drop_theta'),
                                    (dict(drop_theta=(-0.1, 0.5)), 'drop_theta')])
def test_bad_input(dls, kw, msg):
    with pytest.raises(ValueError, match=msg): wsdan_learner(dls, 'resnet18', pretrained=False, **kw)

@pytest.mark.parametrize('kw,msg', [(dict(test_theta=1.), 'test_theta'), (dict(test_theta=0.), 'test_theta'),
                                    (dict(crop_pad=1.), 'crop_pad'), (dict(test_pad=-0.1), 'test_pad')])
def test_bad_callback_args(kw, msg):
    with pytest.raises(ValueError, match=msg): WSDAN(**kw)

def test_wsdan_needs_bap(dls):
    learn = cls_learner(dls, 'resnet18', pretrained=False, cbs=WSDAN())
    with pytest.raises(ValueError, match="needs a model with a `BAPool`"): learn.get_preds()

def test_wsdan_without_spatial_features(dls):
    with pytest.raises(ValueError, match='not a spatial map'): wsdan_learner(dls, 'test_vit', M=4, pretrained=False)
