"The timm sweep's fast subset: one family per kind (ResNet, a fixed-size ViT, ConvNeXt, byobnet), one fresh process for the exports."
import importlib.util, pathlib, pytest, torch

spec = importlib.util.spec_from_file_location('sweep_timm', pathlib.Path(__file__).parents[1]/'benchmarks'/'sweep_timm.py')
sweep_timm = importlib.util.module_from_spec(spec); spec.loader.exec_module(sweep_timm)

archs = dict(resnet='test_resnet', vision_transformer='test_vit3', convnext='test_convnext', byobnet='test_byobnet')

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest: one intra-op thread

@pytest.fixture(scope='module')
def rows(one_thread): return {r['family']: r for r in sweep_timm.sweep(list(archs), attns=('se', 'cbam'), archs=archs, verbose=False)}

@pytest.mark.parametrize('fam', list(archs))
def test_family_builds_trains_exports_cams(rows, fam):
    r = rows[fam]
    assert r['arch'] == archs[fam]
    assert (r['build'], r['train'], r['export'], r['cam']) == ('ok',)*4, r

def test_fixed_size_vit_rebuilt_for_the_data(rows):
    r = rows['vision_transformer']
    assert r['kind'] == 'tokens' and r['size'] == sweep_timm.SIZE  # test_vit3 is built for 160 px, trained at 64

@pytest.mark.parametrize('fam', ['resnet', 'convnext', 'byobnet'])
def test_cnn_attention_identity_at_block_level(rows, fam):
    assert rows[fam]['kind'] == 'CNN'
    assert all(v.startswith('blocks') for v in rows[fam]['attn'].values()), rows[fam]['attn']

def test_vit_attention_refused_by_name(rows):
    assert all(v.startswith('refused') and 'transformer' in v for v in rows['vision_transformer']['attn'].values())

def test_summary_counts(rows):
    s = sweep_timm.summary(list(rows.values()), ('se', 'cbam'))
    assert s.startswith('4 timm families: 4 build, 4 train one batch, 4 export round trip, 4 cam; 3 of 3 CNN families'), s

def test_unknown_family():
    with pytest.raises(ValueError, match='choices: beit'): sweep_timm.sweep(['resnett'], verbose=False)
