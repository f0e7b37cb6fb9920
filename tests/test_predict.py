"Batch prediction and deterministic TTA: fresh learner, export -> load_learner in a new process, load_cls_learner folder; `fastcls predict` / `fastcls export` on a trained run, bad input."
import json, os, shutil, subprocess, sys, textwrap
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from fastcls.test_utils import synth_df, synth_dls
from fastcls.learner import cls_learner
from fastcls.weights import load_cls_learner
import fastcls.predict  # noqa: F401
from fastcls.cli.core import main

def run(*args):
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, '-c', 'import sys; from fastcls.cli.core import main; sys.exit(main())', *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)

@pytest.fixture(scope='module')
def learn():
    dls = synth_dls(n=32, size=32, n_classes=3, bs=8)
    learn = cls_learner(dls, 'test_resnet', pretrained=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    return learn

def test_tta_same_everywhere(learn, tmp_path):
    "The same TTA probabilities on the learner, on `load_cls_learner` of its weights, and after export/load_learner in a new process"
    files = synth_df(n=12, size=32, n_classes=3).fname.tolist()
    with learn.no_bar(): ref = learn.predict_files(files, tta=True)
    learn.save_weights(tmp_path/'w')
    l2 = load_cls_learner(tmp_path/'w')
    with l2.no_bar(): p2 = l2.predict_files(files, tta=True)
    np.testing.assert_allclose(p2.prob, ref.prob, atol=1e-5); assert p2.label.tolist() == ref.label.tolist()
    learn.export(tmp_path/'export.pkl')
    code = textwrap.dedent(f"""
        import json, fastcls.predict
        from fastai.learner import load_learner
        learn = load_learner({str(tmp_path/'export.pkl')!r})
        with learn.no_bar(): df = learn.predict_files({files!r}, tta=True)
        print(json.dumps(df.prob.tolist()))""")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS='ignore'))
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(json.loads(out.stdout.strip().splitlines()[-1]), ref.prob, atol=1e-5)
    with learn.no_bar(): plain = learn.predict_files(files)
    assert not np.allclose(plain.prob, ref.prob)  # TTA changed something

def test_tta_effect(learn):
    with learn.no_bar(): eff = learn.tta_effect()
    with learn.no_bar(): p,t = learn.tta_preds()
    assert eff['accuracy_tta'] == pytest.approx(float((p.argmax(1) == t).float().mean()))
    assert eff['accuracy_change'] == pytest.approx(eff['accuracy_tta'] - eff['accuracy'])

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('imgs')
    src = synth_df(n=24, size=32, n_classes=3)
    for f,l in zip(src.fname, src.label): (root/l).mkdir(exist_ok=True); shutil.copy(f, root/l)
    out = tmp_path_factory.mktemp('run')/'out'
    r = run('train', '--data', root, '--out', out, '--arch', 'resnet18', '--pretrained', 'none', '--size', '32', '--bs', '8', '--epochs', '1', '--quiet')
    assert r.returncode == 0, r.stderr
    return out, root

def test_cli_predict_csv(trained, tmp_path):
    out,root = trained
    fs = sorted(root.glob('*/*.png'))
    (tmp_path/'bad.png').write_bytes(b'garbage'); Image.new('RGBA', (32, 32)).save(tmp_path/'rgba.png')
    csv = tmp_path/'test.csv'
    pd.DataFrame({'path': [str(f) for f in fs] + ['bad.png', 'rgba.png'], 'label': [f.parent.name for f in fs] + ['c0', 'c1']}).to_csv(csv, index=False)
    r = run('predict', '--model', out, csv, '--out', tmp_path/'preds.csv', '--bs', '5')
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path/'preds.csv')
    assert len(df) == len(fs) + 2 and df.label.notna().sum() == len(fs)
    assert 'bad.png' in r.stderr and 'rgba.png' in r.stderr and '4 channels' in r.stderr and '2 of 26 images could not be predicted' in r.stderr
    ok = df[df.label.notna()]
    acc = (ok.label == ok.true_label).mean()
    assert f"accuracy {acc:.1%}" in r.stderr
    assert set(df.columns) >= {'file', 'label', 'prob', 'topk', 'problem', 'true_label', 'correct'}
    # the same as the learner in this process
    from fastcls.cli.core import load_model
    learn = load_model(out)
    with learn.no_bar(): p,_ = learn.get_preds(dl=learn.dls.test_dl(fs))
    np.testing.assert_allclose(ok.prob, p.max(1)[0].numpy(), atol=1e-4)

def test_cli_export_onnx_predict(trained, tmp_path):
    out,root = trained
    r = run('export', '--model', out, '--onnx', tmp_path)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path/'model.json').read_text())
    assert meta['vocab'] == ['c0', 'c1', 'c2'] and meta['size'] == [32, 32]
    a = run('predict', '--model', tmp_path/'model.onnx', root, '--json', '--quiet')
    b = run('predict', '--model', out, root, '--json', '--quiet')
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra,rb = [[json.loads(l) for l in r.stdout.strip().splitlines()] for r in (a, b)]
    assert len(ra) == 24 and [o['label'] for o in ra] == [o['label'] for o in rb]
    np.testing.assert_allclose([o['prob'] for o in ra], [o['prob'] for o in rb], atol=1e-4)
    r = run('predict', '--model', tmp_path/'model.onnx', root, '--tta')
    assert r.returncode == 2 and '--tta' in r.stderr

def test_cli_predict_bad_input(trained, tmp_path, capsys):
    out,root = trained
    (tmp_path/'empty').mkdir()
    assert main(['predict', '--model', str(out), str(tmp_path/'empty')]) == 2
    assert 'has no images' in capsys.readouterr().err
    (tmp_path/'bad.png').write_bytes(b'garbage')
    assert main(['predict', '--model', str(out), str(tmp_path/'bad.png')]) == 2
    assert 'none of the 1 images' in capsys.readouterr().err
    assert main(['predict', '--model', str(out), str(next(root.glob('c0/*.png'))), '--out', str(tmp_path/'p.txt')]) == 2
    assert '.csv or .json' in capsys.readouterr().err
    # a folder from another fastcls version whose export no longer loads: the error says which versions differ
    old = tmp_path/'old'; shutil.copytree(out, old)
    m = json.loads((old/'metrics.json').read_text()); m['versions']['fastcls'] = '0.0.1'
    (old/'metrics.json').write_text(json.dumps(m)); (old/'export.pkl').write_bytes(b'not a pickle'); (old/'model.safetensors').write_bytes(b'not safetensors')
    r = run('predict', '--model', old, next(root.glob('c0/*.png')))
    assert r.returncode == 2 and 'Traceback' not in r.stderr and 'fastcls 0.0.1 (installed:' in r.stderr
