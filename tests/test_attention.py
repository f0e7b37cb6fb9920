"Identity-preserving insertion of every registered attention into every supported backbone family."
import pytest, timm, torch
from fastcls.layers.attention import attentions, add_attention, attention_modules, attention_params, attention_summary, blend_params, GateBlend
from fastcls.test_utils import pretrained_like

archs = ['resnet18', 'resnet50', 'convnext_atto', 'regnety_002', 'mobilenetv2_035', 'efficientnet_b0']
pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: one intra-op thread

names = sorted(n for n in attentions.names if n != 'ca')  # 'ca' is an alias of 'coord'

@pytest.fixture(scope='module')
def x(): return torch.randn(2, 3, 64, 64)

@pytest.mark.parametrize('arch', archs)
@pytest.mark.parametrize('name', names)
def test_insertion_keeps_outputs(arch, name, x):
    torch.manual_seed(0)
    m = pretrained_like(timm.create_model(arch, pretrained=False)).eval()
    with torch.no_grad(): before = m(x)
    n_params = sum(p.numel() for p in m.parameters())
    add_attention(m, name)
    mods = attention_modules(m)
    assert mods, 'nothing inserted'
    with torch.no_grad(): after = m(x)
    assert (after - before).abs().max() < 1e-5
    assert blend_params(m) or name == 'nl'
    added = sum(p.numel() for p in attention_params(m))
    assert added > 0 and sum(p.numel() for p in m.parameters()) == n_params + added
    assert str(len(mods)) in attention_summary(m)

def test_alias_ca_is_coord():
    m = timm.create_model('mobilenetv2_035', pretrained=False)
    add_attention(m, 'ca')
    assert {type(a.attn).__name__ for a in attention_modules(m).values()} == {'CoordAttn'}

def test_attention_is_on_residual_branch_before_addition(x):
    "In a ResNet bottleneck SE takes bn3's output and the block returns relu(SE(branch) + shortcut)"
    m = pretrained_like(timm.create_model('resnet50', pretrained=False)).eval()
    add_attention(m, 'se', where='last')
    blk = m.layer4[0]
    assert blk.se.attn.fc1.in_channels == 2048 and blk.se.attn.fc1.out_channels == 2048 // 16
    assert isinstance(blk.se.attn.gate, GateBlend)  # SE blended inside its sigmoid gate
    with torch.no_grad(): blk.se.attn.gate.gamma.fill_(1.)
    seen = {}
    blk.register_forward_hook(lambda mod, i, o: seen.update(inp=i[0], out=o))
    blk.bn3.register_forward_hook(lambda mod, i, o: seen.update(bn3=o.clone()))
    blk.se.attn.register_forward_hook(lambda mod, i, o: seen.update(se_in=i[0].clone(), se_out=o.clone()))  # the block adds the shortcut in place
    with torch.no_grad():
        m(x)
        assert torch.equal(seen['bn3'], seen['se_in'])
        expected = torch.relu(seen['se_out'] + blk.downsample(seen['inp']))
    assert torch.allclose(seen['out'], expected, atol=1e-6)

def test_where_stage_indices_and_last():
    m = timm.create_model('convnext_atto', pretrained=False)
    add_attention(m, 'eca', where=[1, -1])
    assert {n.split('.')[1] for n in attention_modules(m)} == {'1', '3'}

@pytest.mark.parametrize('arch', archs)
def test_moved_gamma_changes_output(arch, x):
    "The insertion is not vacuous: on non-zero residual branches the attention acts once gamma moves"
    m = pretrained_like(timm.create_model(arch, pretrained=False)).eval()
    with torch.no_grad(): before = m(x)
    add_attention(m, 'cbam')
    with torch.no_grad():
        for g in blend_params(m): g.fill_(1.)
        assert (m(x) - before).abs().max() > 1e-3

@pytest.mark.parametrize('arch,attn,where,msg', [
    ('resnet18', 'senet', 'all', 'Valid choices'),
    ('test_vit', 'se', 'all', 'transformer with token'),
    ('test_vit', 'se', 'stages', 'Supported families'),
    ('resnet18', 'se', 'middle', "'stages'"),
    ('resnet18', 'se', 5, 'out of range'),
])
def test_errors(arch, attn, where, msg):
    m = timm.create_model(arch, pretrained=False)
    with pytest.raises(ValueError, match=msg): add_attention(m, attn, where)

new_archs = ['vgg11', 'resnest14d', 'skresnet18', 'dla46_c', 'test_byobnet', 'cspresnet50', 'ghostnet_050']
small = dict(vgg11=dict(mlp_ratio=1/64))  # VGG's 4096-wide ConvMlp head is unused by attention: keep the test light

@pytest.mark.parametrize('arch', new_archs)
def test_new_families_block_placement(arch, x):
    "VGG (after each conv block), ResNeSt, SK, DLA, byobnet, CSP, GhostNet: identity, then acting (the sweep covers the rest)"
    for name in ('se', 'cbam'):
        m = pretrained_like(timm.create_model(arch, pretrained=False, num_classes=0, **small.get(arch, {}))).eval()
        with torch.no_grad(): before = m(x)
        add_attention(m, name)
        assert attention_modules(m)
        with torch.no_grad():
            assert (m(x) - before).abs().max() < 1e-5
            for g in blend_params(m): g.fill_(1.)
            assert (m(x) - before).abs().max() > 1e-4

def test_vgg_after_each_conv_block_before_pooling():
    m = timm.create_model('vgg11', pretrained=False, num_classes=0, mlp_ratio=1/64)
    add_attention(m, 'se')
    pools = [i for i, c in enumerate(m.features) if isinstance(c, torch.nn.MaxPool2d)]
    assert list(attention_modules(m)) == [f'features.{i-1}.1' for i in pools]

def test_stages_at_feature_info_boundaries(x):
    m = pretrained_like(timm.create_model('inception_v3', pretrained=False, num_classes=0)).eval()  # no supported block
    with pytest.raises(ValueError, match="attn_where='stages'"): add_attention(m, 'se')
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad(): before = m(x)
    add_attention(m, 'cbam', 'stages')
    assert len(attention_modules(m)) == len(m.feature_info)
    with torch.no_grad(): assert (m(x) - before).abs().max() < 1e-5

def test_stages_needs_feature_info():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match="needs the model's `feature_info`"): add_attention(m, 'se', 'stages')

@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last])
def test_nonlocal_keeps_the_memory_format(fmt):
    "timm's non-local block returns channels-last strides for NCHW input: the inserted module gives its input's format back, so the net is bit-identical"
    m = pretrained_like(timm.create_model('resnet18', pretrained=False, num_classes=0)).eval().to(memory_format=fmt)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
    with torch.no_grad(): before = m(x)
    add_attention(m, 'nl')
    seen = []
    for a in attention_modules(m).values(): a.register_forward_hook(lambda mod, i, o: seen.append(o.stride() == i[0].stride()))
    with torch.no_grad(): after = m(x)
    assert len(seen) == 2 and all(seen) and torch.equal(after, before)

def _inserted(arch, attn, where='all'):
    "A pretrained-like timm `arch` with `attn` inserted, and the largest change of its output at insertion (eval)"
    m = pretrained_like(timm.create_model(arch, pretrained=False, num_classes=0)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(): before = m(x)
    add_attention(m, attn, where)
    with torch.no_grad(): return m, (m(x) - before).abs().max().item()

@pytest.mark.parametrize('arch', ['resnetv2_18', 'resnetv2_50'])
def test_resnetv2_blocks_take_attention(arch):
    "timm's pre-activation ResNet (resnetv2: PreActBasic, PreActBottleneck) gets attention in every block, identity at insertion"
    m,diff = _inserted(arch, 'se')
    names = list(attention_modules(m))
    assert len(names) == sum(len(s.blocks) for s in m.stages) and all('.blocks.' in n for n in names) and diff < 1e-5

def test_space_to_depth_stem_and_missing_stage_names():
    "TResNet's first convolution takes 48 channels (after space-to-depth): its blocks still take attention; Twins' feature_info names modules it lacks: a clear refusal"
    m,diff = _inserted('tresnet_m', 'cbam')
    assert len(attention_modules(m)) == sum(len(l) for l in (m.body.layer1, m.body.layer2, m.body.layer3, m.body.layer4)) and diff < 1e-5
    m = timm.create_model('tresnet_m', pretrained=False, num_classes=0)  # feature_info[0] is '' (the whole model): skipped, said so
    with pytest.warns(UserWarning, match=r"TResNet's feature_info names \[''\].*no attention at those stages"): add_attention(m, 'se', 'stages')
    assert len(attention_modules(m)) == len(m.feature_info) - 1
    tw = timm.create_model('twins_svt_small', pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match=r"attn_where='stages': Twins's feature_info names \['block.0', 'block.1', 'block.2', 'block.3'\]"): add_attention(tw, 'se', 'stages')

def test_nonlocal_on_an_isotropic_net_names_the_strides():
    "ConvMixer keeps stride 7 in every block: non-local's stride-8/16 placement finds nothing, and the error says how to choose stages"
    m = pretrained_like(timm.create_model('convmixer_768_32', pretrained=False, num_classes=0)).eval()
    with pytest.raises(ValueError, match=r"non-local attention goes at stride 8 and 16 .*strides \[7\]: pass attn_where=stage indices \(0..31\)"):
        add_attention(m, 'nl', 'stages')
    m,diff = _inserted('convmixer_768_32', 'nl', [15, 31])
    assert len(attention_modules(m)) == 2 and diff == 0

def test_mobilenetv5_universal_inverted_residuals_take_attention():
    "MobileNetV5's UniversalInvertedResidual blocks (timm's MobileNet V4/V5 block) take attention at their `se` place, identity at insertion"
    m,diff = _inserted('mobilenetv5_base', 'eca')
    uir = [n for n,b in m.named_modules() if type(b).__name__ == 'UniversalInvertedResidual']
    assert uir and all(any(k.startswith(f'{n}.se') for k in attention_modules(m)) for n in uir) and diff < 1e-5
