"One way to do each thing (issue 15 §3): no global side effects, declared requirements, one implementation per job."
import ast, configparser, json, os, re, subprocess, sys, warnings
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).parents[1]

def _fresh(code, env=None):
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r

def test_fastai_plot_top_losses_untouched():
    "Importing fastcls leaves fastai's `ClassificationInterpretation.plot_top_losses` as fastai wrote it; the heatmap is `ClsInterpretation`'s"
    r = _fresh("from fastai.interpret import ClassificationInterpretation as C; f = C.plot_top_losses\n"
               "import fastcls.all\nfrom fastcls.interpret import ClsInterpretation\n"
               "import inspect; print(C.plot_top_losses is f, 'heatmap' in inspect.signature(ClsInterpretation.plot_top_losses).parameters)")
    assert r.stdout.split()[-2:] == ['True', 'True']

def test_main_scopes_its_warning_filters():
    from fastcls.cli.core import main
    before,show = list(warnings.filters),warnings.showwarning
    assert main(['predict']) == 2
    assert warnings.filters == before and warnings.showwarning is show

def test_predict_prints_no_stray_warning_line(tmp_path):
    "`fastcls predict` in a fresh process (no PYTHONWARNINGS): its output has no library warning source lines"
    from fastcls.learner import cls_learner
    import fastcls.weights  # noqa: F401
    from fastcls.test_utils import synth_dls, synth_df
    learn = cls_learner(synth_dls(n=24, size=32, n_classes=3, bs=8), 'test_resnet', pretrained=False)
    d = learn.save_weights(tmp_path/'m')
    env = {k:v for k,v in os.environ.items() if k != 'PYTHONWARNINGS'}
    r = _fresh(f"import sys; sys.argv = ['fastcls', 'predict', '--model', {str(d)!r}, {synth_df(n=24, size=32, n_classes=3).fname[0]!r}]\n"
               "from fastcls.cli.core import main; sys.exit(main())", env)
    assert 'warnings.warn(' not in r.stderr and 'FutureWarning' not in r.stderr, r.stderr
    assert r.stdout.count('\t') == 2

def _module_imports(path):
    "Top-level third-party packages imported at module level by `path`"
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import): names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module: names.add(node.module.split('.')[0])
    return names - set(sys.stdlib_module_names) - {'fastcls', '__future__'}

def test_runtime_imports_are_requirements():
    "Every package fastcls imports at module level is a runtime requirement in settings.ini (scipy was missing)"
    cfg = configparser.ConfigParser(); cfg.read(ROOT/'settings.ini')
    reqs = {re.split(r'[<>=!~ ]', r)[0].lower() for r in cfg['DEFAULT']['requirements'].split()}
    dist = {'sklearn': 'scikit-learn', 'yaml': 'pyyaml', 'PIL': 'pillow'}
    via_fastai = {'numpy', 'pillow', 'fastprogress', 'torchvision'}  # fastai's own requirements
    missing = {}
    for f in (ROOT/'fastcls').rglob('*.py'):
        for m in _module_imports(f):
            d = dist.get(m, m).lower().replace('_', '-')
            if d not in reqs and d not in via_fastai: missing.setdefault(d, []).append(f.name)
    assert not missing, f"imported but not in settings.ini requirements: {missing}"

def test_training_labels_read_in_one_place(monkeypatch):
    "Samplers and class weights read the training labels through `losses.longtail.train_labels`"
    import fastcls.losses.longtail as lt, fastcls.data.samplers as sm
    from fastcls.test_utils import synth_dls
    dls = synth_dls(n=24, size=32, n_classes=3, bs=8)
    calls = []
    orig = lt.train_labels
    def spy(o): calls.append(o); return orig(o)
    monkeypatch.setattr(lt, 'train_labels', spy); monkeypatch.setattr(sm, 'train_labels', spy)
    sm.pk_dls(dls, p=3, k=2); lt.class_weights(dls)
    assert len(calls) == 2

def test_report_balanced_accuracy_is_the_library_metric():
    import numpy as np
    from fastcls.cli.report import metrics_from_preds
    from fastcls.metrics.longtail import balanced_acc, class_recall
    g = torch.Generator().manual_seed(0)
    p,t = torch.rand(50, 4, generator=g),torch.randint(0, 3, (50,), generator=g)  # class 3 absent from the targets
    m = metrics_from_preds(p.numpy(), t.numpy(), list('abcd'))
    assert m['balanced_accuracy'] == pytest.approx(float(balanced_acc(p, t)))
    assert list(m['per_class_recall'].values())[:3] == pytest.approx(class_recall(p, t, 4)[:3].tolist()) and m['per_class_recall']['d'] == 0
