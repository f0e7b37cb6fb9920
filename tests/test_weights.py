"Safe weights: save_weights -> load_cls_learner in a fresh process, without dls and without unpickling."
import json, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
from safetensors import safe_open
from fastai.vision.all import Normalize, Resize, imagenet_stats
from fastcls.learner import cls_learner
from fastcls.weights import load_cls_learner, weights_config
from fastcls.test_utils import synth_dls, synth_df

@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    torch.manual_seed(0)
    dls = synth_dls(n=48, size=32, n_classes=3, bs=8, item_tfms=Resize(24), batch_tfms=Normalize.from_stats(*imagenet_stats))
    learn = cls_learner(dls, 'resnet18', attn='cbam', attn_where='last', pool='catavgmax', lin_ftrs=[32], ps=0.25,
                        model_kwargs=dict(drop_path_rate=0.05), pretrained=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    d = learn.save_weights(tmp_path_factory.mktemp('w')/'model')
    return learn, d

def test_files_and_config(saved):
    learn, d = saved
    assert sorted(p.name for p in d.iterdir()) == ['config.json', 'model.safetensors']  # no temporary leftovers
    cfg = json.loads((d/'config.json').read_text())
    assert cfg == weights_config(learn)
    assert (cfg['arch'], cfg['attn'], cfg['attn_where'], cfg['pool'], cfg['vocab']) == ('resnet18', 'cbam', 'last', 'catavgmax', ['c0', 'c1', 'c2'])
    assert cfg['head_kwargs'] == {'lin_ftrs': [32], 'ps': 0.25} and cfg['model_kwargs'] == {'drop_path_rate': 0.05}
    assert cfg['resize']['size'] == [24, 24]
    assert cfg['normalize']['mean'] == pytest.approx(imagenet_stats[0])
    with safe_open(str(d/'model.safetensors'), 'pt') as f: assert set(f.keys()) == set(learn.model.state_dict())

def test_fresh_process_without_dls_or_pickle(saved):
    learn, d = saved
    files = list(synth_df(n=48, size=32, n_classes=3).fname[:5])
    with learn.no_bar(): here = [learn.predict(f)[2].tolist() for f in files]
    code = textwrap.dedent(f"""
        import json, pickle, torch
        from fastcls.weights import load_cls_learner
        def _no(*a, **k): raise AssertionError('unpickling attempted')
        pickle.load = pickle.loads = torch.load = torch.serialization.load = _no
        learn = load_cls_learner({str(d)!r})
        print(json.dumps([learn.predict(f)[2].tolist() for f in {files!r}]))
    """)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    there = json.loads(r.stdout.strip().splitlines()[-1])
    assert torch.allclose(torch.tensor(here), torch.tensor(there), atol=1e-6)
    assert len(set(map(tuple, here))) > 1  # predictions differ between images: a real comparison

def test_load_with_dls_trains_on(saved):
    learn, d = saved
    learn2 = load_cls_learner(d, dls=learn.dls)
    for a, b in zip(learn.model.state_dict().values(), learn2.model.state_dict().values()): assert torch.equal(a, b)
    with learn2.no_bar(), learn2.no_logging(): learn2.fit(1, 1e-3)

def test_bad_input(saved, tmp_path):
    learn, d = saved
    with pytest.raises(ValueError, match='differs from the saved'): load_cls_learner(d, dls=synth_dls(n=32, size=32, n_classes=2, bs=8))
    with pytest.raises(FileNotFoundError, match='save_weights'): load_cls_learner(tmp_path)
    (tmp_path/'model.safetensors').write_bytes(b''); (tmp_path/'config.json').write_text('{"format": "other"}')
    with pytest.raises(ValueError, match='format'): load_cls_learner(tmp_path)
    learn.model_config.attn, old = torch.nn.Identity, learn.model_config.attn
    try:
        with pytest.raises(ValueError, match='is not a name'): learn.save_weights(tmp_path/'x')
    finally: learn.model_config.attn = old
