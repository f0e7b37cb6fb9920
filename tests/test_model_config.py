"""One model description from build to reload: every learner kind saved with `save_weights` predicts the same in a fresh
process with pickle disabled, through `load_cls_learner`, and through `fastcls predict` for every kind but the
plain pool and head variants (two of those)."""
import json, subprocess, sys, textwrap
import pytest, torch
from fastai.vision.all import Normalize, Resize, imagenet_stats
from fastcls.learner import cls_learner
from fastcls.models import ModelConfig, create_cls_model
from fastcls.layers.pooling import pools
from fastcls.layers.heads import heads
from fastcls.callback.longtail import bbn_learner
from fastcls.callback.wsdan import wsdan_learner
from fastcls.losses.metric import TripletLoss
import fastcls.weights  # noqa: F401  (`save_weights`)
from fastcls.test_utils import synth_dls, synth_df

ARCH = 'test_resnet'

def _fit(learn, n=1, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, 1e-3, **kw)
    return learn

def _verb(verb, **kw):
    "A learner after decoupling verb `verb` (`force`: its weights are random, training them would only cost time)"
    def f(dls):
        learn = cls_learner(dls, ARCH, head='linear', pretrained=False)
        with learn.no_bar(), learn.no_logging():
            if verb == 'crt_after_tau': learn.tau_norm(0.7, force=True); learn.crt(1, 1e-3, force=True)
            elif verb == 'posthoc_la': learn.posthoc_la(**kw)
            else: getattr(learn, verb)(force=True, **kw)
        return learn
    return f

cases = {'plain': lambda dls: cls_learner(dls, ARCH, pretrained=False),
         'attention': lambda dls: cls_learner(dls, ARCH, attn='se', attn_where='last', pretrained=False),
         'bbn': lambda dls: bbn_learner(dls, ARCH, pretrained=False),
         'wsdan': lambda dls: wsdan_learner(dls, ARCH, M=4, pretrained=False),
         'crt': _verb('crt', epochs=1, lr=1e-3), 'tau_norm': _verb('tau_norm'), 'tau_norm_fixed': _verb('tau_norm', tau=0.5),
         'lws': _verb('lws', epochs=1, lr=1e-2), 'posthoc_la': _verb('posthoc_la', tau=1.), 'crt_after_tau': _verb('crt_after_tau'),
         'metric_loss': lambda dls: cls_learner(dls, ARCH, head='arcface', embed_dim=16, pretrained=False).add_metric_loss(TripletLoss())}
cases.update({f'pool_{p}': (lambda p: lambda dls: cls_learner(dls, ARCH, pool=p, head='linear', pretrained=False))(p) for p in pools._items})
cases.update({f'head_{h}': (lambda h: lambda dls: cls_learner(dls, ARCH, head=h, pretrained=False))(h) for h in heads._items})
cases['pool_bap_kwargs'] = lambda dls: cls_learner(dls, ARCH, pool='bap', pool_kwargs=dict(M=3), pretrained=False)

@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp('mc')
    files = list(synth_df(n=24, size=32, n_classes=3).fname[:3])
    res = {}
    for nm,f in cases.items():
        torch.manual_seed(0)
        dls = synth_dls(n=24, size=32, n_classes=3, bs=8, item_tfms=Resize(24), batch_tfms=Normalize.from_stats(*imagenet_stats))
        learn = f(dls)
        with learn.no_bar(): here = [learn.predict(fn)[2].tolist() for fn in files]
        res[nm] = (learn, learn.save_weights(root/nm), here)
    return res, files

def _fresh(code):
    r = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

def test_round_trip_fresh_process_no_pickle(saved):
    res,files = saved
    dirs = {nm: str(d) for nm,(_,d,_) in res.items()}
    cli = [nm for nm in dirs if not nm.startswith(('pool_', 'head_'))] + ['pool_bap', 'head_arcface']  # `fastcls predict` too
    there = _fresh(f"""
        import io, json, pickle, contextlib, torch
        def _no(*a, **k): raise AssertionError('unpickling attempted')
        pickle.load = pickle.loads = torch.load = torch.serialization.load = _no
        from fastcls.weights import load_cls_learner
        from fastcls.cli.core import main
        out = {{}}
        for nm,d in {dirs!r}.items():
            learn = load_cls_learner(d)
            with learn.no_bar(): probs = [learn.predict(f)[2].tolist() for f in {files!r}]
            out[nm] = dict(probs=probs)
            if nm not in {cli!r}: continue
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf): rc = main(['predict', *{files!r}, '--model', d, '--json'])
            out[nm].update(rc=rc, cli=[json.loads(l) for l in buf.getvalue().splitlines() if l.startswith('{{')])
        print(json.dumps(out))
    """)
    for nm,(learn,d,here) in res.items():
        t = there[nm]
        assert torch.allclose(torch.tensor(here), torch.tensor(t['probs']), atol=1e-5), nm
        if 'cli' not in t: continue
        assert t['rc'] == 0 and len(t['cli']) == len(files), nm
        for p,r in zip(here, t['cli']):
            assert r['label'] == str(learn.dls.vocab[int(torch.tensor(p).argmax())]) and r['prob'] == pytest.approx(max(p), abs=1e-5), nm
    assert len(set(map(tuple, res['plain'][2]))) > 1  # predictions differ between images: a real comparison

def test_config_records_what_changed_the_model(saved):
    res,_ = saved
    cfg = {nm: json.loads((d/'config.json').read_text()) for nm,(_,d,_) in res.items()}
    assert (cfg['bbn']['kind'], cfg['wsdan']['kind'], cfg['wsdan']['pool'], cfg['wsdan']['pool_kwargs']) == ('bbn', 'wsdan', 'bap', {'M': 4})
    assert [e['name'] for e in cfg['lws']['edits']] == ['lws'] and cfg['tau_norm_fixed']['edits'] == [{'name': 'tau_norm', 'tau': 0.5}]
    assert cfg['crt_after_tau']['edits'] == [] and cfg['posthoc_la']['edits'] == [{'name': 'posthoc_la', 'tau': 1.0}]
    tn = res['tau_norm'][0]
    assert cfg['tau_norm']['edits'][0]['tau'] == tn.model[1][1][0].tau  # the searched tau, not the starting one

def test_build_gives_the_same_model(saved):
    res,_ = saved
    for nm,(learn,_,_) in res.items():
        m = learn.model_config.build()
        assert type(m) is type(learn.model) and list(m.state_dict()) == list(learn.model.state_dict()), nm
        assert {k: v.shape for k,v in m.state_dict().items()} == {k: v.shape for k,v in learn.model.state_dict().items()}, nm

def test_create_cls_model_signature_kept():
    m = create_cls_model(ARCH, 3, None, 'all', 'avg', 'linear', False, 3, None, None, ps=0.1)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    cfg = ModelConfig(ARCH, 3, head='linear', head_kwargs=dict(ps=0.1))
    assert list(cfg.build().state_dict()) == list(m.state_dict())

def test_untrained_gem_learner_is_not_trained():
    "tau_norm/lws/crt check training by optimizer steps: GeM's optimizer state (lr_mult, do_wd) is not training"
    dls = synth_dls(n=24, size=32, n_classes=3, bs=8)
    learn = cls_learner(dls, ARCH, pool='gem', head='linear', pretrained=False)
    learn.create_opt()
    with pytest.raises(ValueError, match='has not been trained'): learn.tau_norm(1.)
    _fit(learn)
    with learn.no_bar(): learn.get_preds()  # resets fastai's train_iter, not the step count
    learn.tau_norm(1.)

def test_save_trained_flag_round_trip(saved, tmp_path):
    from fastcls.weights import load_cls_learner
    res,_ = saved
    learn = load_cls_learner(res['crt'][1])
    assert learn.n_steps == res['crt'][0].n_steps > 0  # crt's own steps
    learn.tau_norm(1.)  # trained weights: no force needed
