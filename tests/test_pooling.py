"GeM, bilinear and bilinear attention pooling: reference formulas, registry, lr_mult/no-wd optimizer state, export, Grad-CAM."
import json, subprocess, sys, textwrap, warnings
from functools import partial
import numpy as np, pytest, torch
import torch.nn.functional as F
from fastai.optimizer import SGD, Adam, OptimWrapper
from fastai.vision.all import PILImage
from fastcls.layers.pooling import pools
from fastcls.layers.pooling import GeMPool, BilinearPool, BAPool, signed_sqrt
from fastcls.learner import cls_learner
from fastcls.test_utils import synth_dls, synth_df

@pytest.fixture(scope='module')
def dls(): return synth_dls(n=64, size=32, n_classes=2, bs=16)

def gem_ref(x, p, eps=1e-6):
    "cirtorch.layers.functional.gem"
    return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1./p)

def bcnn_ref(x):
    "cvl-umass BCNN.py TensorProduct (shared backbone) then algorithms.md F1 signed sqrt and F.normalize"
    bs,c,h,w = x.size()
    x1 = x.view(bs, c, h*w)
    z = torch.bmm(x1, torch.transpose(x1, 1, 2)).view(bs, c*c) / (h*w)
    z = torch.sqrt(F.relu(z) + 1e-5) - torch.sqrt(F.relu(-z) + 1e-5)
    return F.normalize(z)

def bap_ref(A, Fm, eps=1e-12):
    "WS_DAN inception_v3_bap.bilinear_attention_pooling in NumPy (channels last), float64"
    A,Fm = A.permute(0, 2, 3, 1).double().numpy(),Fm.permute(0, 2, 3, 1).double().numpy()
    P = np.einsum('bhwm,bhwn->bmn', A, Fm) / (A.shape[1]*A.shape[2])
    P = (np.sign(P) * np.sqrt(np.abs(P) + eps)).reshape(len(P), -1)
    return torch.tensor(P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)).float()

@pytest.mark.parametrize('p', [1., 2., 3., 6.5])
def test_gem_matches_reference(p):
    torch.manual_seed(0)
    x = torch.rand(4, 16, 7, 5) + 0.01
    assert torch.allclose(GeMPool(p=p)(x), gem_ref(x, p).flatten(1), atol=1e-6)

def test_gem_limits():
    x = torch.rand(3, 8, 6, 6)
    assert torch.allclose(GeMPool(p=1.)(x), x.mean((2, 3)), atol=1e-6)
    err = [(GeMPool(p=p)(x) - x.amax((2, 3))).abs().max().item() for p in (3., 30., 300.)]
    assert err[0] > err[1] > err[2] and err[2] < 0.02

def test_gem_p_learns_and_is_finite_in_low_precision():
    g = GeMPool()
    x = torch.rand(2, 8, 4, 4) * 50
    with torch.autocast('cpu', dtype=torch.bfloat16): y = g(x.bfloat16())
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    y.sum().backward()
    assert g.p.grad is not None and g.p.grad.abs() > 0

@pytest.mark.parametrize('shape', [(2, 6, 4, 7), (3, 10, 1, 1), (1, 3, 9, 2)])
def test_bilinear_matches_reference(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    for xi in (x, x.relu()): assert torch.allclose(BilinearPool(shape[1])(xi), bcnn_ref(xi), atol=1e-6)

def test_bilinear_reduction():
    bp = BilinearPool(64, dim=16).eval()
    x = torch.rand(2, 64, 3, 3)
    assert bp(x).shape == (2, 256)
    assert torch.allclose(bp(x), bcnn_ref(bp.reduce(x)), atol=1e-6)
    assert pools['bilinear'](2048).reduce[0].out_channels == 256  # resnet50: 65 536 features, not 4.2M
    assert isinstance(pools['bilinear'](128).reduce, torch.nn.Identity)

def test_signed_sqrt():
    z = torch.tensor([-4., 0., 9.])
    assert torch.allclose(signed_sqrt(z, 0.), torch.tensor([-2., 0., 3.]))

def test_bap_matches_reference():
    torch.manual_seed(0)
    bap = BAPool(12, M=5, scale=1.).eval()
    Fm = torch.randn(3, 12, 6, 4)
    with torch.no_grad(): assert torch.allclose(bap(Fm), bap_ref(bap.attn(Fm), Fm), atol=1e-6)
    assert torch.allclose(BAPool(12, M=5).eval()(Fm).norm(dim=1), torch.full((3,), 100.))

@pytest.mark.parametrize('arch', ['resnet18', 'convnext_atto', 'mobilenetv2_035'])
@pytest.mark.parametrize('pool', ['gem', 'bilinear', 'bap'])
@pytest.mark.parametrize('head', ['fastai', 'linear'])
def test_every_pool_with_backbones_and_heads(dls, arch, pool, head):
    learn = cls_learner(dls, arch, pool=pool, head=head, pretrained=False)
    m = learn.model.eval()
    assert isinstance(m, torch.nn.Sequential) and len(m) == 2
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 2)

def test_pool_factory_accepted(dls):
    learn = cls_learner(dls, 'resnet18', pool=partial(BilinearPool, dim=8), head='linear', pretrained=False)
    assert learn.model[1][1][0].in_features == 64

@pytest.mark.parametrize('pool', ['gem', 'bilinear', 'bap'])
def test_no_spatial_features_is_a_clear_error(dls, pool):
    with pytest.raises(ValueError, match='not a spatial map'): cls_learner(dls, 'test_vit', pool=pool, pretrained=False)
    with pytest.raises(ValueError, match=r'spatial feature map \(B,C,H,W\)'): pools[pool](8)(torch.randn(2, 5, 8))

@pytest.mark.parametrize('kwargs,msg', [(dict(p=0.), 'positive'), (dict(p=-1.), 'positive')])
def test_gem_bad_input(kwargs, msg):
    with pytest.raises(ValueError, match=msg): GeMPool(**kwargs)

@pytest.mark.parametrize('M', [0, -1, 2.5])
def test_bap_bad_m(M):
    with pytest.raises(ValueError, match='positive integer'): BAPool(8, M=M)

def test_unknown_pool_lists_new_names(dls):
    with pytest.raises(ValueError, match='bap, bilinear, catavgmax, gem'): cls_learner(dls, 'resnet18', pool='gen', pretrained=False)

def test_gem_p_lr_mult_and_no_wd_sgd(dls):
    learn = cls_learner(dls, 'resnet18', pool='gem', head='linear', pretrained=False, opt_func=SGD, lr=0.1)
    learn.create_opt(); learn.opt.set_hypers(wd=0.5)
    gem,lin = learn.model[1][0],learn.model[1][1][0]
    assert len(learn.opt.param_lists) == 2  # p stays in the head group
    p0,w0 = gem.p.detach().clone(),lin.weight.detach().clone()
    gem.p.grad,lin.weight.grad = torch.full_like(gem.p, 0.5),torch.ones_like(lin.weight)
    learn.opt.step()
    assert torch.allclose(gem.p, p0 - 0.1*10*0.5)                      # 10x lr, no weight decay
    assert torch.allclose(lin.weight, w0*(1 - 0.1*0.5) - 0.1)            # the rest: lr and decoupled wd

def test_gem_p_adam_step_while_frozen(dls):
    "One fastai Adam step on a frozen learner: p (head group) moves by 10*lr*g/(|g|+eps), without weight decay"
    learn = cls_learner(dls, 'resnet18', pool='gem', head='linear', pretrained=False, opt_func=Adam, lr=1e-3)
    learn.freeze()
    learn.opt.set_hypers(lr=1e-3, wd=0.5)
    gem,lin = learn.model[1][0],learn.model[1][1][0]
    assert not learn.model[0].model.conv1.weight.requires_grad and gem.p.requires_grad
    p0,w0 = gem.p.detach().clone(),lin.weight.detach().clone()
    for q in learn.model.parameters(): q.grad = None
    gem.p.grad,lin.weight.grad = torch.full_like(gem.p, 0.3),torch.full_like(lin.weight, 0.3)
    learn.opt.step()
    adam = lambda g, eps=1e-5: g / (abs(g) + eps)  # first step: debiased averages are g and g^2
    assert torch.allclose(gem.p, p0 - 10*1e-3*adam(0.3))
    assert torch.allclose(lin.weight, w0*(1 - 1e-3*0.5) - 1e-3*adam(0.3))

def test_torch_optimizer_warns(dls):
    learn = cls_learner(dls, 'resnet18', pool='gem', pretrained=False, opt_func=partial(OptimWrapper, opt=torch.optim.SGD))
    with pytest.warns(UserWarning, match='ignored with a PyTorch optimizer'): learn.create_opt()

@pytest.mark.parametrize('pool', ['gem', 'bilinear'])
def test_export_round_trip_in_fresh_process(dls, tmp_path, pool, predict_in_fresh_process):
    torch.manual_seed(0)
    learn = cls_learner(dls, 'resnet18', pool=pool, pretrained=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    fn = tmp_path/'model.pkl'
    learn.export(fn)
    files = list(synth_df(n=64, size=32, n_classes=2).fname[:3])
    with learn.no_bar(): here = [learn.predict(PILImage.create(f))[2].tolist() for f in files]
    there = predict_in_fresh_process(fn, files, check=f"assert type(learn.model[1][0]).__name__ == {type(learn.model[1][0]).__name__!r}")
    assert torch.allclose(torch.tensor(here), torch.tensor(there), atol=1e-6)

@pytest.mark.parametrize('pool', ['gem', 'bilinear', 'bap'])
def test_gradcam_on_body_output(pool):
    "pytorch-grad-cam on the body's spatial output gives a non-constant map with these heads"
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    learn = cls_learner(synth_dls(n=64, size=32, n_classes=2, bs=16), 'resnet18', pool=pool, pretrained=False)
    m = learn.model.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 128)
    with GradCAM(model=m, target_layers=[m[0]]) as cam: g = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)]*2)
    assert g.shape == (2, 128, 128) and np.isfinite(g).all() and g.std() > 0
