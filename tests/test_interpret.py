"Parity of fastcls's CAMs with pytorch-grad-cam 1.5.7, faithfulness on planted squares, model state, bad input, plots"
import sys, numpy as np, pytest, torch, timm
from torch import nn
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from fastai.interpret import ClassificationInterpretation
from fastcls.interpret import cam_maps, find_cam_layer, cam_methods, ClsInterpretation
from fastcls.learner import cls_learner
from fastcls.test_utils import synth_dls, synth_df, pretrained_like
import pytorch_grad_cam as pgc
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform

def corr(a, b):
    "Pearson correlation per image (B,H,W) -> (B,)"
    a,b = (torch.as_tensor(np.asarray(o), dtype=torch.float64).flatten(1) for o in (a, b))
    a,b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a*b).sum(1) / (a.norm(dim=1)*b.norm(dim=1) + 1e-12)
    both_flat = (a.norm(dim=1) < 1e-6) & (b.norm(dim=1) < 1e-6)  # e.g. all zero after the ReLU: equal maps
    return torch.where(both_flat, torch.ones_like(r), r)

@pytest.fixture(scope='module')
def resnet():
    torch.manual_seed(0)
    return pretrained_like(timm.create_model('resnet18', pretrained=False, num_classes=5)).eval()

@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return pretrained_like(timm.create_model('test_resnet', pretrained=False, num_classes=5)).eval()

@pytest.fixture(scope='module')
def x():
    torch.manual_seed(1)
    return torch.randn(4, 3, 96, 96)

PGC = {'gradcam': pgc.GradCAM, 'gradcam++': pgc.GradCAMPlusPlus, 'layercam': pgc.LayerCAM}

@pytest.mark.parametrize('method', list(PGC))
@pytest.mark.parametrize('targets', [None, [0, 1, 2, 4]])
def test_parity_cnn(resnet, x, method, targets):
    "Same model, layer and targets as pytorch-grad-cam: correlation >= 0.999 per image"
    ours,out = cam_maps(resnet, x, None if targets is None else torch.tensor(targets), method=method)
    with PGC[method](resnet, [resnet.layer4]) as cam:
        ref = cam(x, targets=None if targets is None else [ClassifierOutputTarget(t) for t in targets])
    assert ours.shape == ref.shape == (4, 96, 96)
    assert (corr(ours, ref) >= 0.999).all(), corr(ours, ref)
    assert np.abs(ours.numpy() - ref).max() < 0.02   # cv2 vs torch resize and float32 rounding only
    assert ours.min() >= 0 and ours.max() <= 1

def test_parity_vit(x):
    "ViT tokens reshaped automatically (prefix tokens dropped, grid from the model) = pytorch-grad-cam with its reshape"
    torch.manual_seed(0)
    vit = timm.create_model('test_vit', pretrained=False, num_classes=3, img_size=96).eval()
    ours,_ = cam_maps(vit, x)
    assert find_cam_layer(vit)[0] == 'blocks.5.norm1'
    g = vit.patch_embed.grid_size
    with pgc.GradCAM(vit, [vit.blocks[-1].norm1], reshape_transform=lambda t: vit_reshape_transform(t, *g)) as cam:
        ref = cam(x, targets=None)
    assert (corr(ours, ref) >= 0.999).all(), corr(ours, ref)

def test_cam_equals_gradcam():
    "On a GAP + linear head CAM (no gradient) equals Grad-CAM up to scaling: same maps after normalisation"
    dls = synth_dls(n=32, size=64)
    learn = cls_learner(dls, 'resnet18', pretrained=False, head='linear')
    pretrained_like(learn.model)
    xb,_ = dls.one_batch()
    for relu in (True, False):
        a,b = learn.cam(xb, method='cam', relu=relu), learn.cam(xb, method='gradcam', relu=relu)
        assert (corr(a, b) > 0.9999).all()
    with pytest.raises(ValueError, match='needs a GAP \\+ linear head'):
        cls_learner(dls, 'resnet18', pretrained=False).cam(xb, method='cam')  # fastai head: BN, linear, ReLU, linear

def test_state_restored(tiny, x):
    "Train/eval mode per module, requires_grad flags, .grad and hooks are as before"
    resnet = tiny
    resnet.train(); resnet.bn1.eval()
    resnet.layer1.requires_grad_(False)
    flags = {n: p.requires_grad for n,p in resnet.named_parameters()}
    modes = {n: m.training for n,m in resnet.named_modules()}
    for method in ['gradcam', 'layercam', 'scorecam', 'gradcamelementwise']: cam_maps(resnet, x[:2], method=method)
    assert {n: p.requires_grad for n,p in resnet.named_parameters()} == flags
    assert {n: m.training for n,m in resnet.named_modules()} == modes
    assert all(p.grad is None for p in resnet.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in resnet.modules())
    assert torch.is_grad_enabled()
    resnet.requires_grad_(True).eval()

def test_only_after_layer_differentiated(resnet, x):
    "Layers before the target layer run without grad, those after it with grad"
    seen = {}
    h1 = resnet.layer3.register_forward_hook(lambda m,i,o: seen.__setitem__('before', torch.is_grad_enabled()))
    h2 = resnet.fc.register_forward_hook(lambda m,i,o: seen.__setitem__('after', torch.is_grad_enabled()))
    try: cam_maps(resnet, x[:2])
    finally: h1.remove(); h2.remove()
    assert seen == {'before': False, 'after': True}

def test_frozen_body_and_amp():
    "Works with the body frozen (no parameter before the layer needs grad) and under autocast"
    dls = synth_dls(n=32, size=64)
    learn = cls_learner(dls, 'resnet18', pretrained=False)
    pretrained_like(learn.model)
    xb,_ = dls.one_batch()
    ref = learn.cam(xb)
    learn.model[0].requires_grad_(False)
    torch.testing.assert_close(learn.cam(xb), ref)
    torch.testing.assert_close(learn.cam(xb, method='eigengradcam').shape, ref.shape)
    with torch.autocast('cpu', dtype=torch.bfloat16): amp = learn.cam(xb)
    assert amp.dtype == torch.float32 and (corr(amp, ref) > 0.98).all()

def test_pgc_adapter(tiny, x):
    "Other pytorch-grad-cam methods behind the same call give pytorch-grad-cam's own maps"
    resnet = tiny
    for name,cls in [('scorecam', pgc.ScoreCAM), ('eigencam', pgc.EigenCAM), ('xgradcam', pgc.XGradCAM)]:
        resnet.train()
        ours,_ = cam_maps(resnet, x[:2], method=name)
        assert resnet.training and all(p.grad is None for p in resnet.parameters())
        with cls(resnet, [resnet.layer4]) as cam: ref = cam(x[:2], targets=None)
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)
        resnet.zero_grad(set_to_none=True)

def test_pgc_missing(tiny, x, monkeypatch):
    resnet = tiny
    monkeypatch.setitem(sys.modules, 'pytorch_grad_cam', None)
    with pytest.raises(ImportError, match='pip install grad-cam'): cam_maps(resnet, x[:1], method='scorecam')
    cam_maps(resnet, x[:1], method='gradcam')  # fastcls's own methods do not need it

def test_faithful_on_planted_squares():
    """After a short training run the heat lies on the class's planted square.
    At the default layer (stride 32: a 4x4 map at 128 px) the peak is a cell centre next to the square's edge, so
    the check there is the pointing game with its usual 15 px tolerance (Zhang et al. 2016) plus heat inside the
    square >= 3x the heat outside for every image; at layer3 (stride 16) the peak must lie strictly inside."""
    torch.manual_seed(0)
    n,size,nc = 192,128,3  # 3 classes: with 4, i % 4 puts every validation image in class 0
    dls = synth_dls(n=n, size=size, n_classes=nc, bs=16)
    learn = cls_learner(dls, 'resnet18', pretrained=False, head='linear')
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(5, 1e-2)
    assert learn.validate()[1] > 0.9
    df = synth_df(n=n, size=size, n_classes=nc)
    items = df[df.is_valid].reset_index()
    box = np.zeros((len(items), size, size), bool)
    for i,(t,l,b) in enumerate(zip(items.top, items.left, items.box)): box[i, t:t+b, l:l+b] = True
    def hits(maps, tol):
        r,c = np.unravel_index(maps.flatten(1).argmax(1).numpy(), (size, size))
        return ((r >= items.top-tol) & (r < items.top+items.box+tol) & (c >= items.left-tol) & (c < items.left+items.box+tol)).mean()
    for method in ['gradcam', 'gradcam++', 'layercam', 'cam']:
        maps = learn.cam(list(items.fname), targets=list(items.label), method=method)
        assert maps.shape == (len(items), size, size)
        assert hits(maps, 15) >= 0.9, method
        m = maps.numpy()
        assert all(mi[k].mean() > 3*mi[~k].mean() for mi,k in zip(m, box)), method
    for method in ['gradcam', 'gradcam++', 'layercam']:
        assert hits(learn.cam(list(items.fname), targets=list(items.label), method=method, layer='layer3'), 0) >= 0.9, method

def test_bad_input(resnet, x):
    with pytest.raises(ValueError, match="No layer named 'layer9'.*Closest names: layer"): cam_maps(resnet, x, layer='layer9')
    with pytest.raises(ValueError, match='not a spatial map'): cam_maps(resnet, x, layer='global_pool')
    with pytest.raises(ValueError, match='class 5 is out of range for a model with 5 outputs'): cam_maps(resnet, x, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match='Valid choices: .*gradcam'): cam_maps(resnet, x, method='gradcamm')
    with pytest.raises(ValueError, match="'cam' needs a GAP"): cam_maps(resnet, x, method='cam')
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match='Cannot choose a CAM target layer.*one of the last layers with spatial output: 0, 1'): cam_maps(plain, x)
    dls = synth_dls(n=32, size=64)
    learn = cls_learner(dls, 'resnet18', pretrained=False)
    with pytest.raises(ValueError, match="Unknown class 'dog'. Valid classes: c0, c1"): learn.cam(x, targets='dog')

def test_inputs_and_targets():
    "Items, a DataLoader and tensors give the same maps; names and indices are the same targets"
    dls = synth_dls(n=32, size=64)
    learn = cls_learner(dls, 'resnet18', pretrained=False)
    pretrained_like(learn.model)
    df = synth_df(n=32, size=64)
    dl = dls.test_dl(list(df.fname[:5]))
    xb = dl.one_batch()[0]
    ref = learn.cam(xb, targets=[0, 1, 0, 1, 1])
    torch.testing.assert_close(learn.cam(list(df.fname[:5]), targets=['c0', 'c1', 'c0', 'c1', 'c1']), ref)
    torch.testing.assert_close(learn.cam(dl, targets=torch.tensor([0, 1, 0, 1, 1])), ref)
    torch.testing.assert_close(learn.cam(xb[0], targets=0), ref[:1])
    maps,out = learn.cam(xb, with_preds=True)
    torch.testing.assert_close(maps, learn.cam(xb, targets=out.argmax(1)))

def test_plots(tmp_path):
    dls = synth_dls(n=32, size=64)
    learn = cls_learner(dls, 'resnet18', pretrained=False, head='linear')
    learn.show_gradcam(n=4, fname=tmp_path/'grid.png')
    fig = plt.gcf()
    assert len([a for a in fig.axes if a.get_title()]) == 4
    assert all('/c' in a.get_title() for a in fig.axes if a.get_title())
    plt.close('all')
    assert plt.imread(tmp_path/'grid.png').ndim == 3
    interp = ClsInterpretation.from_learner(learn)
    interp.plot_top_losses(3, heatmap=True, method='layercam', fname=tmp_path/'top.png')
    axs = [a for a in plt.gcf().axes if a.get_title()]
    assert len(axs) == 3 and all(len(a.get_images()) == 2 for a in axs)  # image + heatmap
    plt.close('all')
    assert (tmp_path/'top.png').exists()
    interp.plot_top_losses(3)  # fastai's own plot, unchanged
    axs = [a for a in plt.gcf().axes if a.get_title()]
    assert len(axs) == 3 and all(len(a.get_images()) == 1 for a in axs)
    plt.close('all')

@pytest.mark.parametrize('arch,layer,varies', [
    ('pit_ti_224', 'transformers.2.blocks.3.norm1', True),   # the head reads the class token: the last stage's block input
    ('coat_tiny', 'parallel_blocks.5.norm14', True),       # the parallel blocks run from a ModuleList: its last block's input
    ('cait_xxs24_224', 'blocks.23.norm1', False),          # no class token in `blocks` (it joins later); LayerScale 1e-5 at init
    ('xcit_nano_12_p8_224', 'blocks.11.norm1', True)])     # XCiT: the class token joins in `cls_attn_blocks`
def test_cam_on_class_token_models(arch, layer, varies):
    "Models whose head reads only class tokens get a CAM layer that the class token sees, and maps of the input size"
    torch.manual_seed(0)
    dls = synth_dls(n=8, size=64, bs=4)
    learn = cls_learner(dls, arch, pretrained=False)
    assert find_cam_layer(learn.model)[0] == f'0.model.{layer}'
    xb, _ = dls.one_batch()
    maps = learn.cam(xb[:2])
    assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all()
    if varies:  # the gradient reaches the layer: a real map, not a constant (without the ReLU, which may zero a random net's map)
        assert (learn.cam(xb[:2], relu=False).flatten(1).std(1) > 0.05).all()

def test_encoder_wrapping_classifier_gets_cam_and_refuses_attention():
    "Gemma 4's classifier keeps its encoder's `feature_info` (names of the encoder's blocks): CAM finds the encoder's last block, attention is refused by name"
    from fastcls.layers.attention import add_attention, feature_owner
    torch.manual_seed(0)
    dls = synth_dls(n=8, size=64, bs=4)
    small = dict(depth=2, embed_dim=64, num_heads=2, head_dim=32, intermediate_size=128)
    learn = cls_learner(dls, 'gemma4_vit_167m', pretrained=False, model_kwargs=small)
    tm = learn.model[0].model
    assert feature_owner(tm) is tm.encoder and find_cam_layer(learn.model)[0] == '0.model.encoder.blocks.1.norm1'
    xb, _ = dls.one_batch()
    maps = learn.cam(xb[:2], relu=False)
    assert maps.shape == (2, 64, 64) and (maps.flatten(1).std(1) > 0.05).all()
    with pytest.raises(ValueError, match='Gemma4VitClassifier is a transformer with token'): add_attention(tm, 'se')

def test_cam_where_feature_info_names_a_missing_module():
    "MViTv2's feature_info says 'block.3' (its modules are 'stages.3'): CAM falls back to the last block's norm1 tokens"
    torch.manual_seed(0)
    dls = synth_dls(n=8, size=64, bs=4)
    learn = cls_learner(dls, 'mvitv2_tiny', pretrained=False)
    assert learn.model[0].model.feature_info[-1]['module'] == 'block.3' and find_cam_layer(learn.model)[0] == '0.model.stages.3.blocks.1.norm1'
    xb, _ = dls.one_batch()
    maps = learn.cam(xb[:2], relu=False)
    assert maps.shape == (2, 64, 64) and (maps.flatten(1).std(1) > 0.05).all()

def test_cam_on_efficientvim_uses_its_final_norm():
    "EfficientViM's stages return tuples and its head pools `norm[-1]` of the final map: that is the CAM layer"
    torch.manual_seed(0)
    dls = synth_dls(n=8, size=128, bs=4)  # its final map is at stride 64: 2x2 at 128 px
    learn = cls_learner(dls, 'efficientvim_m1', pretrained=False)
    assert find_cam_layer(learn.model)[0] == '0.model.norm.3'
    xb, _ = dls.one_batch()
    maps = learn.cam(xb[:2], relu=False)
    assert maps.shape == (2, 128, 128) and (maps.flatten(1).std(1) > 0.05).all()
