"fastcls train / predict / experiments as a user runs them: subprocesses on tiny image folders, bad input."
import json, os, shutil, subprocess, sys, warnings
from pathlib import Path
import pandas as pd, pytest, torch
from safetensors.torch import load_file
from fastcls.cli.core import main, data_df, loss_from_name, make_dls, run_config, check_config, fine_tune_opts, UsageError
from fastcls.losses.longtail import class_weights, losses
from fastcls.test_utils import synth_df

TINY = ['--arch', 'resnet18', '--pretrained', 'none', '--size', '32', '--bs', '8', '--epochs', '1', '--quiet']

def fastcls(*args, cwd=None):
    "Run the `fastcls` console entry point in a fresh process"
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, '-c', 'import sys; from fastcls.cli import main; sys.exit(main())', *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)

@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    "An ImageNet-style folder with 3 classes of 8 planted-square images each"
    root = tmp_path_factory.mktemp('imgs')
    src = synth_df(n=24, size=32, n_classes=3)
    for f,l in zip(src.fname, src.label): (root/l).mkdir(exist_ok=True); shutil.copy(f, root/l)
    return root

@pytest.fixture(scope='module')
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('run')/'out'
    r = fastcls('train', '--data', folder, '--out', out, *TINY)
    assert r.returncode == 0, r.stderr
    return out, r

def test_train_writes_report(trained):
    out,r = trained
    assert 'balanced accuracy' in r.stdout and str(out) in r.stdout
    for f in ('metrics.json', 'export.pkl', 'model.safetensors', 'config.json', 'confusion_matrix.png',
              'per_class_recall.png', 'training_curve.png', 'report.html', 'top_losses.png'):
        assert (out/f).stat().st_size > 0, f
    m = json.loads((out/'metrics.json').read_text())
    assert set(m['per_class_recall']) == {'c0', 'c1', 'c2'}
    assert 0 <= m['balanced_accuracy'] <= 1 and 0 <= m['accuracy'] <= 1
    assert m['config']['arch'] == 'resnet18' and m['config']['size'] == 32 and m['config']['n_train'] + m['config']['n_valid'] == 24
    assert {'fastcls', 'fastai', 'timm', 'torch'} <= set(m['versions']) and m['wall_seconds'] > 0
    assert len(m['history']) == 1 and sum(sum(r) for r in m['confusion_matrix']) == m['config']['n_valid']
    assert (out/'gradcam.png').stat().st_size > 0
    sd = load_file(str(out/'model.safetensors'))
    assert any(k.endswith('conv1.weight') for k in sd) and all(isinstance(v, torch.Tensor) for v in sd.values())

def test_predict(trained, folder):
    out,_ = trained
    imgs = sorted(folder.glob('c1/*.png'))[:2]
    r = fastcls('predict', '--model', out, *imgs, '--json')
    assert r.returncode == 0, r.stderr
    res = [json.loads(l) for l in r.stdout.strip().splitlines()]
    assert [Path(o['file']) for o in res] == imgs
    assert all(o['label'] in ('c0', 'c1', 'c2') and 0 < o['prob'] <= 1 and o['problem'] is None for o in res)
    r = fastcls('predict', '--model', out, imgs[0])
    assert r.returncode == 0 and r.stdout.split('\t')[0] == str(imgs[0])

def test_experiments_grid(folder, tmp_path):
    r = fastcls('experiments', '--grid', 'attn=none,se;pretrained=false', '--arch', 'resnet18', '--data', folder, '--out', tmp_path, '--epochs', '1',
                '--size', '32', '--bs', '8', '--quiet')
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path/'results.csv')
    assert list(df.columns[:6]) == ['Backbone', 'Attn', 'Loss', 'Aug', 'Top-1', 'Balanced acc']
    assert df.Attn.tolist() == ['none', 'se'] and df['Top-1'].between(0, 100).all()
    md = (tmp_path/'results.md').read_text()
    assert '| Backbone | Attn | Loss | Aug | Top-1 | Balanced acc |' in md and md.count('| resnet18 |') == 2
    assert (tmp_path/'comparison.html').is_file() and (tmp_path/'attn-se_pretrained-False'/'report.html').is_file()
    assert not list(tmp_path.glob('*/checkpoints'))  # a grid is not resumable: no checkpoint (3x the model) per run

def test_csv_data(folder, tmp_path):
    df,_ = data_df(str(folder), valid_pct=0.25)
    csv = tmp_path/'labels.csv'
    pd.DataFrame({'path': df.fname, 'label': df.label, 'is_valid': df.is_valid}).to_csv(csv, index=False)
    dfc,_ = data_df(str(csv))
    assert dfc.fname.tolist() == df.fname.tolist() and dfc.is_valid.tolist() == df.is_valid.tolist()

def test_weighted_ce(folder, tmp_path):
    root = tmp_path/'lt'
    shutil.copytree(folder, root)
    for f in sorted((root/'c2').glob('*.png'))[2:]: f.unlink()  # 8, 8, 2 images
    df,_ = data_df(str(root), valid_pct=0.25)
    dls = make_dls(df, size=32, bs=4)
    n = torch.tensor([(~df.is_valid & (df.label == c)).sum() for c in dls.vocab]).float()
    torch.testing.assert_close(class_weights(dls), (n.max()/n).sqrt())
    torch.testing.assert_close(loss_from_name('wce', dls).func.weight, (n.max()/n).sqrt())
    assert loss_from_name('default', dls) is None  # the head's own loss
    assert type(loss_from_name('ce', dls)) is type(losses['ce'](dls))  # 'ce' means what it means in the library

def _err(capsys, *argv):
    "Exit status and stderr of `main(argv)` in this process"
    rc = main(list(map(str, argv)))
    return rc, capsys.readouterr().err

def test_bad_data(folder, tmp_path, capsys):
    rc,err = _err(capsys, 'train', '--data', tmp_path/'nope', *TINY)
    assert rc == 2 and 'does not exist' in err
    empty = tmp_path/'empty'; shutil.copytree(folder, empty); (empty/'c3').mkdir()
    rc,err = _err(capsys, 'train', '--data', empty, *TINY)
    assert rc == 2 and 'c3 has no images' in err
    (empty/'c3').rmdir(); (empty/'c0'/'broken.png').write_bytes(b'\x89PNG not really')
    rc,err = _err(capsys, 'train', '--data', empty, *TINY)
    assert rc == 2 and 'broken.png' in err and '--skip-bad' in err
    with pytest.warns(UserWarning, match='broken.png'): df,_ = data_df(str(empty), skip_bad=True)
    assert len(df) == 24 and not df.fname.str.endswith('broken.png').any()
    # the library's checks (fastcls.data.check), not only "can PIL open it": a 4x4 image is too small to train on
    from PIL import Image
    (empty/'c0'/'broken.png').unlink(); Image.new('RGB', (4, 4)).save(empty/'c0'/'tiny.png')
    rc,err = _err(capsys, 'train', '--data', empty, *TINY)
    assert rc == 2 and 'tiny.png' in err and 'smaller than min_size' in err and '--skip-bad' in err

@pytest.mark.parametrize('opt,val,msg', [('--arch', 'resnet1800', 'resnet18'), ('--attn', 'sex', "'se'"), ('--pool', 'mean', 'avg'),
                                         ('--head', 'svm', 'fastai'), ('--mix', 'fmix', 'mixup'), ('--recipe', 'nope', 'baseline'),
                                         ('--epochs', '0', '--epochs must be'), ('--lr', '-1', '--lr must be')])
def test_bad_options(folder, capsys, opt, val, msg):
    rc,err = _err(capsys, 'train', '--data', folder, *TINY, opt, val)
    assert rc == 2 and msg in err, err

@pytest.mark.parametrize('opt,name', [('--loss', 'focal_nope'), ('--sampler', 'balanced_nope')])
def test_registry_options(folder, capsys, opt, name):
    "Names from the library's registries: an unknown name lists the valid ones"
    rc,err = _err(capsys, 'train', '--data', folder, *TINY, opt, name)
    assert rc == 2 and 'Valid choices' in err, err

def test_unwritable_out(folder, tmp_path, capsys):
    (tmp_path/'file').write_text('')
    rc,err = _err(capsys, 'train', '--data', folder, *TINY, '--out', tmp_path/'file'/'run')
    assert rc == 2 and 'not a writable folder' in err

def test_no_traceback_in_subprocess(folder, tmp_path):
    r = fastcls('train', '--data', folder, *TINY, '--attn', 'nope')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and 'Unknown attention' in r.stderr
    r = fastcls('predict', '--model', tmp_path, str(folder/'c0'/'x.png'))
    assert r.returncode == 2 and 'Traceback' not in r.stderr and 'export.pkl' in r.stderr
    r = fastcls('nope')
    assert r.returncode == 2 and 'usage: fastcls' in r.stderr

def test_experiments_bad_input(folder, tmp_path, capsys):
    rc,err = _err(capsys, 'experiments', '--grid', 'atn=se', '--data', folder, '--out', tmp_path)
    assert rc == 2 and 'unknown grid key' in err
    (tmp_path/'g.yaml').write_text('grid: [unclosed\n')
    rc,err = _err(capsys, 'experiments', '--config', tmp_path/'g.yaml', '--data', folder, '--out', tmp_path)
    assert rc == 2 and 'cannot parse' in err

def test_recipe_and_overrides():
    assert run_config('se-mixup', attn='eca', epochs=2) | {} == run_config(**{**fine_tune_opts, 'attn': 'eca', 'mix': 'mixup', 'epochs': 2}) | {'recipe': 'se-mixup'}
    assert run_config('se')['attn'] == 'se' and run_config(attn='none')['attn'] is None
    check_config(run_config('se-mixup'))
    with pytest.raises(UsageError, match='unknown options'): run_config(atn='se')

PRETRAINED_TINY = ['--arch', 'tf_efficientnet_lite0', '--size', '32', '--bs', '8', '--quiet']  # the default probe of the installed ImageNet weights

def test_default_probe(folder, tmp_path):
    "With no training options a pretrained run is a cached linear probe: the body keeps its ImageNet weights, the head trains"
    from fastcls.pretrained import pretrained_timm
    from fastcls.weights import load_cls_learner
    out = tmp_path/'probe'
    assert main(['train', '--data', str(folder), '--out', str(out), *PRETRAINED_TINY]) == 0
    metrics = json.loads((out/'metrics.json').read_text()); cfg = metrics['config']
    assert (cfg['probe'], cfg['epochs'], cfg['head'], cfg['pool']) == (10, 0, 'fastai', 'catavgmax')
    assert len(metrics['history']) == 10 and 'valid_loss' in metrics['history'][0]  # the report's epochs are the probe's
    learn = load_cls_learner(out)
    ref = pretrained_timm('tf_efficientnet_lite0').state_dict()
    body = learn.model[0].model.state_dict()
    assert all(torch.equal(v, ref[k]) for k,v in body.items() if k in ref) and sum(k in ref for k in body) > 100
    assert learn.n_steps == 10*max(1, cfg['n_train']//64)  # 10 epochs of full batches of 64 cached features

@pytest.mark.parametrize('opts,msg', [(['--attn', 'se'], '--attn se: a probe-only run'), (['--mix', 'cutmix'], '--mix cutmix'),
                                      (['--ema'], '--teacher and --ema act on training batches')])
def test_probe_only_refuses_idle_options(folder, capsys, opts, msg):
    "Options that would do nothing in a probe-only run are refused, naming the fix"
    rc,err = _err(capsys, 'train', '--data', folder, *PRETRAINED_TINY, *opts)
    assert rc == 2 and msg in err and '--epochs N' in err, err

def test_resume(trained, folder, tmp_path):
    "A run leaves a checkpoint; --resume continues from it (here: the finished fit) and reports the same model"
    out,_ = trained
    assert (out/'checkpoints'/'last.pth').is_file()
    before = json.loads((out/'metrics.json').read_text())
    r = fastcls('train', '--data', folder, '--out', out, *TINY, '--resume')
    assert r.returncode == 0, r.stderr
    after = json.loads((out/'metrics.json').read_text())
    assert after['per_class_recall'] == before['per_class_recall'] and after['confusion_matrix'] == before['confusion_matrix']
    r = fastcls('train', '--data', folder, '--out', out, *TINY, '--epochs', '2', '--resume')  # the checkpoint is read
    assert r.returncode == 2 and 'written by a fit of 1 epochs' in r.stderr
    r = fastcls('train', '--data', folder, '--out', tmp_path/'fresh', *TINY, '--resume')
    assert r.returncode == 2 and 'no checkpoint' in r.stderr and 'Traceback' not in r.stderr

def test_resume_after_probe_skips_it(folder, tmp_path, monkeypatch):
    "--resume of a probe + unfrozen-epochs run reads the probed head from the checkpoint instead of probing again; same model"
    from fastai.learner import Learner
    import fastcls.ssl.learner  # noqa: F401  (Learner.linear_probe)
    out,opts = tmp_path/'lpft',['--data', str(folder), *PRETRAINED_TINY, '--probe', '2', '--epochs', '1']
    assert main(['train', '--out', str(out), *opts]) == 0
    before = load_file(str(out/'model.safetensors'))
    def no_probe(self, *args, **kwargs): raise AssertionError('the probe ran again on --resume')
    monkeypatch.setattr(Learner, 'linear_probe', no_probe)
    assert main(['train', '--out', str(out), *opts, '--resume']) == 0
    after = load_file(str(out/'model.safetensors'))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(AssertionError, match='probe ran again'): main(['train', '--out', str(tmp_path/'fresh'), *opts])  # a fresh run probes

def test_relative_data_paths(folder, tmp_path, monkeypatch):
    "--data as a path relative to the working directory (folder or CSV with relative paths): the DataLoaders find the images"
    shutil.copytree(folder, tmp_path/'imgs')
    monkeypatch.chdir(tmp_path)
    pd.DataFrame({'path': [f'{l}/{f.name}' for l in ('c0', 'c1') for f in sorted((tmp_path/'imgs'/l).glob('*.png'))],
                  'label': [l for l in ('c0', 'c1') for _ in sorted((tmp_path/'imgs'/l).glob('*.png'))]}).to_csv('imgs/labels.csv', index=False)
    for data in ('imgs', 'imgs/labels.csv'):
        df,_ = data_df(data, valid_pct=0.25)
        xb,yb = make_dls(df, size=32, bs=4).one_batch()
        assert xb.shape == (4, 3, 32, 32) and all(Path(f).is_absolute() for f in df.fname)
