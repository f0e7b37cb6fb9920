"""The CAM engine on heads other than GAP + linear (stand-ins for the margin, BBN and bilinear-pooling heads of other
branches, built through `fastcls.models.pools/heads.register`) and on ViT token layouts: Grad-CAM is the gradient of the
chosen logit of whatever the model outputs at the target layer on the body, so it must match pytorch-grad-cam there."""
import numpy as np, pytest, torch, timm, torch.nn.functional as F
from torch import nn
import pytorch_grad_cam as pgc
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from fastcls.interpret import cam_maps, find_cam_layer
from fastcls.learner import cls_learner
from fastcls.layers.pooling import pools
from fastcls.layers.heads import heads
from fastcls.test_utils import synth_dls, pretrained_like

def corr(a, b):
    a,b = (torch.as_tensor(np.asarray(o), dtype=torch.float64).flatten(1) for o in (a, b))
    a,b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a*b).sum(1) / (a.norm(dim=1)*b.norm(dim=1) + 1e-12)
    both_flat = (a.norm(dim=1) < 1e-6) & (b.norm(dim=1) < 1e-6)  # all zero after the ReLU in both: equal maps
    return torch.where(both_flat, torch.ones_like(r), r)

class BilinearPool(nn.Module):
    "B-CNN pooling: X Xᵀ/(hw), signed sqrt, L2 normalisation (Lin et al. 2015)"
    def forward(self, x):
        b,c,h,w = x.shape
        z = (x.flatten(2) @ x.flatten(2).transpose(1, 2) / (h*w)).flatten(1)
        return F.normalize(torch.sqrt(F.relu(z) + 1e-5) - torch.sqrt(F.relu(-z) + 1e-5))

class CosineHead(nn.Module):
    "Margin-head inference: s·cos(θ) between normalised features and class weights (the margin applies in training only)"
    def __init__(self, nf, n_out, s=30.): super().__init__(); self.s,self.weight = s,nn.Parameter(torch.randn(n_out, nf))
    def forward(self, x, y=None): return self.s * F.normalize(x) @ F.normalize(self.weight).t()

class BBNPool(nn.Module):
    "BBN-style bilateral branches: two conv branches on the shared body's map, each average-pooled, concatenated"
    def __init__(self, nf):
        super().__init__()
        self.conv_c,self.conv_r = (nn.Sequential(nn.Conv2d(nf, nf//2, 3, padding=1), nn.ReLU()) for _ in range(2))
    def forward(self, x): return torch.cat([self.conv_c(x).mean((2,3)), self.conv_r(x).mean((2,3))], 1)

class BBNHead(nn.Module):
    "BBN classifier at inference: α·W_c f_c + (1-α)·W_r f_r with α = 0.5"
    def __init__(self, nf, n_out, alpha=0.5): super().__init__(); self.alpha,self.fc = alpha,nn.Linear(nf, n_out)
    def forward(self, f):
        fc,fr = f.chunk(2, 1)
        return self.fc(torch.cat([self.alpha*fc, (1-self.alpha)*fr], 1))

class TupleHead(nn.Module):
    "A head returning (logits, embedding), as metric-learning heads may"
    def __init__(self, nf, n_out): super().__init__(); self.fc = nn.Linear(nf, n_out)
    def forward(self, f): return self.fc(f), f

@pytest.fixture(scope='module', autouse=True)
def stand_in_heads():
    "Register the stand-ins for this module only, so other tests see the real registries"
    added = [(pools, 'test_bilinear', lambda nf: BilinearPool()), (pools, 'test_bbn', BBNPool),
             (heads, 'test_cosine', CosineHead), (heads, 'test_bbn', BBNHead), (heads, 'test_tuple', TupleHead)]
    for reg,name,f in added: reg.register(name, f)
    yield
    for reg,name,_ in added: reg._items.pop(name)

@pytest.fixture(scope='module')
def dls(): return synth_dls(n=32, size=64, n_classes=3)

@pytest.fixture(scope='module')
def x():
    torch.manual_seed(1)
    return torch.randn(4, 3, 96, 96)

@pytest.mark.parametrize('pool,head', [('test_bilinear', 'linear'), ('avg', 'test_cosine'), ('test_bbn', 'test_bbn'),
                                       ('test_bilinear', 'test_cosine'), ('avg', 'fastai'),
                                       ('bilinear', 'arcface'), ('gem', 'cosface'), ('bap', 'linear')])
@pytest.mark.parametrize('method', ['gradcam', 'layercam'])
def test_other_heads_match_pgc(dls, x, pool, head, method):
    "Target layer = the body's last stage; maps = pytorch-grad-cam's on the same layer and targets (corr >= 0.999)"
    torch.manual_seed(0)
    learn = cls_learner(dls, 'resnet18', pretrained=False, pool=pool, head=head)
    model = pretrained_like(learn.model).eval()
    name,layer = find_cam_layer(model)
    assert name == '0.model.layer4'
    t = [0, 1, 2, 1]
    ours = learn.cam(x, targets=t, method=method)
    cls = {'gradcam': pgc.GradCAM, 'layercam': pgc.LayerCAM}[method]
    with cls(model, [layer]) as cam: ref = cam(x, targets=[ClassifierOutputTarget(c) for c in t])
    assert (corr(ours, ref) >= 0.999).all(), corr(ours, ref)
    assert np.abs(ours.numpy() - ref).max() < 0.05  # cv2 vs torch resize and float32 rounding on 3x3 maps
    assert (ours.flatten(1).amax(1) > 0).sum() >= 2  # not a comparison of empty maps
    if (pool,head) != ('avg', 'linear'):
        with pytest.raises(ValueError, match="'cam' needs a GAP \\+ linear head"): learn.cam(x, method='cam')

def test_tuple_output(dls, x):
    "A model returning (logits, ...) is explained through its first output"
    torch.manual_seed(0)
    model = pretrained_like(cls_learner(dls, 'resnet18', pretrained=False, head='test_tuple').model).eval()
    first = nn.Sequential(model, type('First', (nn.Module,), {'forward': lambda self, o: o[0]})())
    ours,out = cam_maps(model, x)
    ref,out_ref = cam_maps(first, x, layer=model[0].model.layer4)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(out, out_ref)

def test_score_function(dls, x):
    "`score=` explains any function of the output: the softmax probability gives pytorch-grad-cam's softmax target"
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    torch.manual_seed(0)
    learn = cls_learner(dls, 'resnet18', pretrained=False, head='test_cosine')
    model = pretrained_like(learn.model).eval()
    t = torch.tensor([2, 0, 1, 1])
    ours,_ = cam_maps(model, x, t, score=lambda o,t: o.softmax(1).gather(1, t[:, None])[:, 0])
    with pgc.GradCAM(model, [model[0].model.layer4]) as cam: ref = cam(x, targets=[ClassifierOutputSoftmaxTarget(int(c)) for c in t])
    assert (corr(ours, ref) >= 0.999).all()

@pytest.mark.parametrize('kw,size', [(dict(img_size=64), 64),                                     # class token
                                     (dict(img_size=64, reg_tokens=2), 64),                       # class + 2 register tokens
                                     (dict(img_size=64, class_token=False, reg_tokens=4, global_pool='avg'), 64),
                                     (dict(img_size=64, dynamic_img_size=True), 96)])             # grid from the input size
def test_vit_tokens(kw, size):
    "Prefix tokens dropped and tokens reshaped to the patch grid, as pytorch-grad-cam with a hand-written reshape"
    torch.manual_seed(0)
    vit = timm.create_model('test_vit', pretrained=False, num_classes=3, **kw).eval()
    x = torch.randn(3, 3, size, size)
    ours,_ = cam_maps(vit, x, method='gradcam')
    g,p = size//16,vit.num_prefix_tokens
    assert p == kw.get('reg_tokens', 0) + kw.get('class_token', True)
    reshape = lambda t: t[:, p:].reshape(t.shape[0], g, g, t.shape[2]).permute(0, 3, 1, 2)
    with pgc.GradCAM(vit, [vit.blocks[-1].norm1], reshape_transform=reshape) as cam: ref = cam(x, targets=None)
    assert ours.shape == (3, size, size)
    assert (corr(ours, ref) >= 0.999).all(), corr(ours, ref)
