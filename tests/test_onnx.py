"ONNX export parity with `Learner.get_preds` on real ELPV images for a matrix of archs/pools/heads/attention and the long-tail and WS-DAN variants; the torch-free runtime; untraceable models."
import json, os, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from torch import nn
from fastai.vision.all import ImageDataLoaders, Resize
from fastcls.learner import cls_learner
from fastcls.data.datasets import elpv_df
from fastcls.callback.longtail import bbn_learner
from fastcls.callback.wsdan import wsdan_learner
from fastcls.runtime import OnnxClassifier, open_image
import fastcls.onnx  # noqa: F401

@pytest.fixture(scope='module')
def elpv():
    "A tiny ELPV DataLoaders (real grayscale solar-cell images, 48 px) and 12 of its validation files"
    df = elpv_df()
    df = df.groupby(['is_valid', 'label']).head(4).reset_index(drop=True)
    dls = ImageDataLoaders.from_df(df, path='/', fn_col='fname', label_col='label', valid_col='is_valid', item_tfms=Resize(48), bs=8)
    return dls, df.fname[df.is_valid].tolist()[:12]

def _parity(learn, files, tmp_path, dtype='uint8'):
    "Largest difference between onnxruntime probabilities (through the runtime's own image loading) and `get_preds`"
    learn.model.eval()
    fn = learn.export_onnx(tmp_path/'m.onnx', dtype=dtype)
    clf = OnnxClassifier(fn)
    x = np.stack([clf.image(open_image(f)[0]) for f in files])
    with learn.no_bar(): ref,_ = learn.get_preds(dl=learn.dls.test_dl(files))
    return float(np.abs(clf(x) - ref.numpy()).max())

@pytest.mark.parametrize('arch,pool,head,attn', [
    ('test_resnet', 'avg', 'fastai', None), ('test_resnet', 'gem', 'arcface', 'se'), ('test_resnet', 'bilinear', 'linear', 'cbam'),
    ('test_resnet', 'catavgmax', 'cosface', 'eca'), ('test_resnet', 'max', 'cosface', 'coord'),
    ('test_resnet', 'avgmax', 'adacos', 'nl'), ('test_resnet', 'avg', 'bnneck', None), ('test_resnet', 'avg', 'normed_linear', None),
    ('test_resnet', 'avg', 'sphereface', None), ('test_convnext', 'gem', 'fastai', 'se'), ('test_efficientnet', 'avg', 'linear', 'eca')])
def test_parity_matrix(elpv, tmp_path, arch, pool, head, attn):
    dls,files = elpv
    learn = cls_learner(dls, arch, pool=pool, head=head, attn=attn, pretrained=False)
    assert _parity(learn, files, tmp_path) < 1e-4

def test_parity_float_input(elpv, tmp_path):
    dls,files = elpv
    assert _parity(cls_learner(dls, 'test_resnet', pretrained=False), files, tmp_path, dtype='float32') < 1e-4
    assert json.loads((tmp_path/'m.json').read_text())['dtype'] == 'float32'

def test_parity_longtail_variants(elpv, tmp_path):
    dls,files = elpv
    learn = bbn_learner(dls, 'test_resnet', pretrained=False)
    assert _parity(learn, files, tmp_path) < 1e-4
    learn = cls_learner(dls, 'test_resnet', head='linear', pretrained=False)
    learn.tau_norm(0.7, force=True)
    assert _parity(learn, files, tmp_path) < 1e-4
    learn.posthoc_la(1.)
    assert _parity(learn, files, tmp_path) < 1e-4

def test_parity_wsdan(elpv, tmp_path):
    "WS-DAN averages the full image with an attention crop in `get_preds`: the graph does the same per image"
    dls,files = elpv
    learn = wsdan_learner(dls, 'test_resnet', M=4, pretrained=False)
    assert _parity(learn, files, tmp_path) < 1e-4
    learn.remove_cb(learn.wsdan)  # without the callback, get_preds is the plain model: so is the graph
    assert _parity(learn, files, tmp_path) < 1e-4

def test_subcenter_dynamic_batch(elpv, tmp_path):
    "sub-center ArcFace's `CosineLinear` (max over K sub-centres) exports with a dynamic batch and matches `get_preds` at any batch size"
    dls,files = elpv
    learn = cls_learner(dls, 'test_resnet', head='subcenter_arcface', pretrained=False)
    clf = OnnxClassifier(learn.export_onnx(tmp_path/'m.onnx'))
    x = np.stack([clf.image(open_image(f)[0]) for f in files])
    with learn.no_bar(): ref,_ = learn.get_preds(dl=learn.dls.test_dl(files))
    assert np.abs(clf(x) - ref.numpy()).max() < 1e-4 and np.abs(clf(x[:1]) - ref.numpy()[:1]).max() < 1e-4

class Rescale(nn.Module):
    def forward(self, x): return x / float(x.abs().mean())  # the tracer freezes the mean of the example batch

def test_untraceable_names_module(elpv, tmp_path):
    dls,_ = elpv
    learn = cls_learner(dls, 'test_resnet', pretrained=False)
    learn.model[1].append(Rescale())
    with pytest.raises(ValueError, match=r"module `1\.\d+` \(Rescale\)"): learn.export_onnx(tmp_path/'m.onnx')
    assert not (tmp_path/'m.onnx').exists() and not (tmp_path/'m.json').exists()

def test_runtime_without_torch(elpv, tmp_path):
    "`fastcls predict --model model.onnx` in a process where `import torch` fails"
    dls,files = elpv
    learn = cls_learner(dls, 'test_resnet', pretrained=False)
    fn = learn.export_onnx(tmp_path/'model.onnx')
    with learn.no_bar(): ref,_ = learn.get_preds(dl=learn.dls.test_dl(files))
    code = ("import sys; sys.modules['torch'] = None\n"
            "from fastcls.cli.core import main\n"
            f"rc = main(['predict', '--model', {str(fn)!r}, *{files!r}, '--json', '--quiet', '--k', '4'])\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\nsys.exit(rc)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS='ignore'))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.strip().splitlines()]
    assert [o['file'] for o in rows] == files
    np.testing.assert_allclose([o['prob'] for o in rows], ref.max(1)[0].numpy(), atol=1e-4)
    assert [o['label'] for o in rows] == [dls.vocab[i] for i in ref.argmax(1)]

def test_runtime_bad_input(tmp_path):
    (tmp_path/'m.onnx').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match='m.json'): OnnxClassifier(tmp_path/'m.onnx')
    (tmp_path/'m.json').write_text(json.dumps(dict(format='fastcls-onnx-0', versions=dict(fastcls='0.0.1'))))
    with pytest.raises(ValueError, match="written by fastcls 0.0.1"): OnnxClassifier(tmp_path/'m.onnx')
