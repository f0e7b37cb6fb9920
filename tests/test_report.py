"report.html and comparison.html in a real browser: headless Chromium opens the file, every image decodes, the tables hold the run's numbers; a screenshot is saved under the test's tmp dir."
import json, re, shutil, subprocess
from pathlib import Path
import pandas as pd, pytest
from fastcls.test_utils import synth_dls
from fastcls.learner import cls_learner
from fastcls.cli.report import write_report, comparison_html, report
from fastcls.cli.core import main

def chromium() -> str:
    exe = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
    assert exe, "headless Chromium is needed for this test: `make env` installs it (apt-get install -y chromium)"
    return exe

def browse(page:Path, shot:Path) -> str:
    "The DOM of `page` after its load event in headless Chromium; a screenshot of it in `shot`"
    flags = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--virtual-time-budget=10000', '--hide-scrollbars']
    r = subprocess.run([chromium(), *flags, '--dump-dom', page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = subprocess.run([chromium(), *flags, f'--screenshot={shot}', '--window-size=1200,2400', page.as_uri()], capture_output=True, text=True, timeout=120)
    assert s.returncode == 0 and shot.stat().st_size > 10_000, s.stderr
    return r.stdout

def images_loaded(dom:str) -> tuple:
    body = re.search(r'<body[^>]*>', dom).group(0)
    n,ok = re.search(r'data-images="(\d+)"', body),re.search(r'data-images-loaded="(\d+)"', body)
    assert n and ok, f"the page's load script did not run: {body}"
    return int(n.group(1)), int(ok.group(1))

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    dls = synth_dls(n=32, size=32, n_classes=3, bs=8)
    learn = cls_learner(dls, 'test_resnet', pretrained=False)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
    out = tmp_path_factory.mktemp('run')
    with learn.no_bar(): res = write_report(learn, out, config=dict(arch='test_resnet', data='synth'), wall_seconds=1.5, export=False)
    return out, res

def test_report_in_browser(run, tmp_path):
    out,res = run
    dom = browse(out/'report.html', tmp_path/'report.png')
    n,ok = images_loaded(dom)
    assert n >= 6 and ok == n, (n, ok)   # curve, confusion, recall, Grad-CAM correct/wrong or both, top losses, first-images Grad-CAM
    assert f"<td>accuracy</td><td>{res['accuracy']:.1%}</td>" in dom and f"<td>{res['balanced_accuracy']:.1%}</td>" in dom
    for c,r in res['per_class_recall'].items(): assert f"<td>{c}</td><td>{r:.1%}</td>" in dom
    assert f"<td>{res['tta']['accuracy_tta']:.1%}" in dom and 'test_resnet' in dom and res['versions']['torch'] in dom
    assert 'src="http' not in (out/'report.html').read_text() and 'src="file' not in (out/'report.html').read_text()

def test_report_command_rebuilds(run, tmp_path, capsys):
    out,_ = run
    page = (out/'report.html').read_text()
    d = tmp_path/'copy'; shutil.copytree(out, d); (d/'report.html').unlink()
    assert main(['report', str(d)]) == 0 and (d/'report.html').read_text() == page
    assert main(['report', str(tmp_path/'nope')]) == 2 and 'metrics.json' in capsys.readouterr().err

def test_comparison_in_browser(tmp_path):
    df = pd.DataFrame({'Backbone': ['resnet18']*2, 'Attn': ['none', 'se'], 'Top-1': [61.3, 64.0], 'Balanced acc': [40.2, 44.9], 'run': ['attn-none', 'attn-se']})
    page = comparison_html(df, tmp_path)
    dom = browse(page, tmp_path/'comparison.png')
    assert images_loaded(dom) == (1, 1)
    assert '<td>64.0</td>' in dom and '<td>44.9</td>' in dom and 'href="attn-se/report.html"' in dom
