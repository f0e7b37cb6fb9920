"""Sweep over timm's model families: the smallest model of each module that defines models (`timm.list_models()`
grouped by module; timm's `test_*` models where a module has them), random weights, tiny synthetic data. Per family:
builds in `cls_learner`; trains one batch; `export` -> `load_learner` in a fresh process gives the same outputs;
`add_attention` is the identity at insertion (block placement, else `attn_where='stages'`) and acts once its gamma
moves; `learn.cam` gives maps of the input size. Prints a markdown table and a summary.

    flock /tmp/fastcls-cpu.lock python benchmarks/sweep_timm.py                  # every family, every attention
    python benchmarks/sweep_timm.py --families resnet,vgg,vision_transformer --attn se,cbam
    python benchmarks/sweep_timm.py --tables sweep0.json sweep1.json ...         # one table from the --json files of several runs
"""
import argparse, collections, contextlib, json, os, signal, subprocess, sys, tempfile, time, warnings
import torch, timm
from timm.models import _registry

SIZE = 64  # data size; models built for one size are rebuilt by timm for it, or trained at their own size
# families whose every model is too big for a 2-core, 24 GB machine (412M parameters at 546 px: OOM-killed at 21 GB in the
# attention checks): their smallest model, built narrower and shallower through timm's own arguments (same classes and code path)
SHRINK = {'deepseek_vit': dict(depth=2, embed_dim=64, num_heads=4)}

def families():
    "{module: [model names]} for every timm module that defines models"
    by = collections.defaultdict(list)
    for n in timm.list_models(): by[_registry._model_to_module[n]].append(n)
    return dict(sorted(by.items()))

def n_params(name):
    "Parameter count of timm's `name` built on the meta device (no memory, no init), or None"
    try:
        with torch.device('meta'), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            m = timm.create_model(name, pretrained=False, num_classes=0)
        return sum(p.numel() for p in m.parameters())
    except Exception: return None

def smallest(names):
    "timm's smallest `test_*` model if the module has some, else its smallest model by parameter count"
    tests = [n for n in names if n.startswith('test_')]
    cands = [(c, n) for n in (tests or names) for c in [n_params(n)] if c is not None]
    return min(cands)[1] if cands else sorted(names)[0]

class _Timeout(Exception): pass

@contextlib.contextmanager
def time_limit(s):
    def _raise(*a): raise _Timeout(f'over {s} s')
    old = signal.signal(signal.SIGALRM, _raise); signal.alarm(s)
    try: yield
    finally: signal.alarm(0); signal.signal(signal.SIGALRM, old)

def _err(e): return f'{type(e).__name__}: {str(e).splitlines()[0][:140]}' if str(e) else type(e).__name__

def attention_check(arch, name, size, model_kwargs):
    "'blocks'/'stages' (placement that worked, identity < 1e-5 and acting once gamma moves), 'refused: ...' or 'FAIL ...'"
    from fastcls.layers.attention import add_attention, attention_modules, blend_params
    from fastcls.test_utils import pretrained_like
    torch.manual_seed(0)
    x, refusals = torch.randn(2, 3, size, size), []
    for where in ('all', 'stages'):
        m = pretrained_like(timm.create_model(arch, pretrained=False, num_classes=0, **model_kwargs)).eval()
        with torch.no_grad(): before = m(x)
        try: add_attention(m, name, where)
        except ValueError as e: refusals.append(str(e)); continue
        with torch.no_grad():
            diff = (m(x) - before).abs().max().item()
            for g in blend_params(m): g.fill_(1.)
            moved = (m(x) - before).abs().max().item()
        n = len(attention_modules(m))
        if diff >= 1e-5: return f'FAIL diff {diff:.1e}'
        if name != 'nl' and moved <= 1e-6: return 'FAIL no effect'
        return f"{'blocks' if where == 'all' else 'stages'} ({n})"
    return 'refused: ' + refusals[-1][:100]  # the stage placement's reason when the model has no supported block

def check_family(fam, arch, attns, tmp):
    "One row of the table; the export's file, input and outputs for the fresh-process check"
    from fastai.vision.all import Learner
    from fastcls.learner import cls_learner
    from fastcls.test_utils import synth_dls
    import fastcls.interpret  # noqa: F401  (Learner.cam)
    row = dict(family=fam, arch=arch, size=SIZE, build='', train='', export='', cam='', attn={}, kind='')
    t0 = time.time()
    try:
        dls,mk0 = synth_dls(n=8, size=SIZE, n_classes=2, bs=4),SHRINK.get(fam)
        if mk0: row['arch'] = f"{arch} ({', '.join(f'{k}={v}' for k,v in mk0.items())})"
        try: learn = cls_learner(dls, arch, pretrained=False, model_kwargs=mk0)
        except ValueError as e:
            if 'resize the data to' not in str(e): raise
            row['size'] = s = int(str(e).split('resize the data to ')[1].split('x')[0])
            dls = synth_dls(n=8, size=s, n_classes=2, bs=4)
            learn = cls_learner(dls, arch, pretrained=False, model_kwargs=mk0)
        row['build'] = 'ok'
        row['kind'] = 'tokens' if type(learn.model[1][0]).__name__ == 'TimmPool' else 'CNN'
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
        loss = learn.recorder.values[-1][0]
        row['train'] = 'ok' if loss == loss and abs(loss) < float('inf') else f'loss {loss}'
        torch.manual_seed(1)
        xb = torch.randn(2, 3, row['size'], row['size'])
        learn.model.eval()
        with torch.no_grad(): out = learn.model(xb)
        learn.export(os.path.join(tmp, f'{fam}.pkl'))
        torch.save(dict(xb=xb, out=out), os.path.join(tmp, f'{fam}.pt'))
        row['export'] = 'pending'
        maps = learn.cam(xb)
        row['cam'] = 'ok' if tuple(maps.shape) == (2, row['size'], row['size']) and torch.isfinite(maps).all() else f'shape {tuple(maps.shape)}'
    except Exception as e:
        for k in ('build', 'train', 'export', 'cam'):
            if not row[k]: row[k] = _err(e); break
    mk = dict(learn.model_config.model_kwargs or {}) if row['build'] == 'ok' else {}
    for a in attns:
        try: row['attn'][a] = attention_check(arch, a, row['size'], mk)
        except Exception as e: row['attn'][a] = 'FAIL ' + _err(e)
    row['seconds'] = round(time.time() - t0, 1)
    return row

def load_exports(tmp, fams):
    "In a fresh process: `load_learner` each export and compare its outputs with the saved ones"
    from fastai.learner import load_learner
    import fastcls.all  # noqa: F401
    torch.set_num_threads(1)
    res = {}
    for f in fams:
        try:
            learn, saved = load_learner(os.path.join(tmp, f'{f}.pkl'), cpu=True), torch.load(os.path.join(tmp, f'{f}.pt'))
            learn.model.eval()
            with torch.no_grad(): d = (learn.model(saved['xb']) - saved['out']).abs().max().item()
            res[f] = 'ok' if d < 1e-5 else f'diff {d:.1e}'
        except Exception as e: res[f] = _err(e)
    return res

def fresh_process_exports(rows, tmp):
    pending = [r['family'] for r in rows if r['export'] == 'pending']
    if not pending: return
    code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import sweep_timm; "
            f"print('RESULT', json.dumps(sweep_timm.load_exports({tmp!r}, {pending!r})))")
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    line = next((l for l in p.stdout.splitlines() if l.startswith('RESULT ')), None)
    res = json.loads(line[7:]) if line else {f: 'fresh process failed: ' + p.stderr.strip().splitlines()[-1][:140] for f in pending}
    for r in rows:
        if r['family'] in res: r['export'] = res[r['family']]

def sweep(fams=None, attns=('se', 'cbam'), archs=None, verbose=True, limit:int=150):
    "Rows for the families `fams` (default: every timm module); `archs` overrides the chosen model per family"
    allf = families()
    fams = fams or list(allf)
    bad = [f for f in fams if f not in allf]
    if bad: raise ValueError(f"unknown timm module(s) {bad}; choices: {', '.join(allf)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in fams:
            arch = (archs or {}).get(f) or smallest(allf[f])
            try:
                with time_limit(limit): r = check_family(f, arch, attns, tmp)
            except _Timeout as e: r = dict(family=f, arch=arch, size=SIZE, build=_err(e), train='', export='', cam='', attn={}, kind='', seconds=limit)
            rows.append(r)
            if len(rows) % 20 == 0: fresh_process_exports(rows, tmp)  # in batches: partial runs keep their export results
            if verbose: print(f"{f:28s} {arch:34s} {r['seconds']:6.1f}s export={r['export'][:20]} build={r['build'][:60]} train={r['train'][:30]} cam={r['cam'][:40]} "
                              + ' '.join(f'{a}={v[:40]}' for a, v in r['attn'].items()), flush=True)
        fresh_process_exports(rows, tmp)
        for r in rows:
            if os.path.exists(os.path.join(tmp, f"{r['family']}.pkl")): os.remove(os.path.join(tmp, f"{r['family']}.pkl"))
    return rows

def _ok(v): return v == 'ok'

def summary(rows, attns):
    n = len(rows)
    cnn = [r for r in rows if r['kind'] == 'CNN']
    every = [r for r in cnn if all(not v.startswith(('FAIL', 'refused')) for v in r['attn'].values())]
    blocks = [r for r in cnn if all(v.startswith('blocks') for v in r['attn'].values())]
    fails = [r for r in rows for v in r['attn'].values() if v.startswith('FAIL')]
    return (f"{n} timm families: {sum(_ok(r['build']) for r in rows)} build, {sum(_ok(r['train']) for r in rows)} train one batch, "
            f"{sum(_ok(r['export']) for r in rows)} export round trip, {sum(_ok(r['cam']) for r in rows)} cam; "
            f"{len(every)} of {len(cnn)} CNN families take every attention tried ({', '.join(attns)}) with identity at insertion "
            f"({len(blocks)} at block level, the rest at stage boundaries); {len(fails)} attention checks fail"
            + ''.join(f"\n- {r['family']} ({r['arch']}): " + '; '.join(sorted({f'{a}: {v[:140]}' if v.startswith('FAIL') else v[:140] for a,v in r['attn'].items()
                      if v.startswith(('FAIL', 'refused'))})) for r in cnn if r not in every))

def _attn_cell(r, attns):
    "The attention results of a row in one cell: each distinct result with the attentions that gave it"
    by = collections.defaultdict(list)
    for a in attns:
        v = r['attn'].get(a, '')
        by[v.split(':')[0] + (' (transformer)' if 'transformer' in v else '') if v.startswith('refused') else v].append(a)
    return '; '.join(f"{v}: {', '.join(a) if len(a) < len(attns) else 'all'}" for v,a in by.items())

def compact_table(rows, attns):
    lines = ['| family | model | px | kind | build | train | export | cam | attention (' + ', '.join(attns) + ') |', '|' + '---|' * 9]
    for r in rows:
        vals = [r['family'], r['arch'], str(r['size']), r['kind'], r['build'], r['train'], r['export'], r['cam'], _attn_cell(r, attns)]
        lines.append('| ' + ' | '.join(v.replace('|', '/') for v in vals) + ' |')
    return '\n'.join(lines)

def table(rows, attns):
    cols = ['family', 'arch', 'size', 'kind', 'build', 'train', 'export', 'cam', *attns]
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    for r in rows:
        vals = [r['family'], r['arch'], str(r['size']), r['kind'], r['build'], r['train'], r['export'], r['cam'],
                *[r['attn'].get(a, '') for a in attns]]
        lines.append('| ' + ' | '.join(v.replace('|', '/') for v in vals) + ' |')
    return '\n'.join(lines)

if __name__ == '__main__':
    warnings.filterwarnings('ignore')
    p = argparse.ArgumentParser()
    p.add_argument('--families', default='', help='comma-separated timm modules (default: all)')
    p.add_argument('--attn', default='all', help="comma-separated attention names, or 'all'")
    p.add_argument('--json', default='', help='also write the rows to this file')
    p.add_argument('--compact', action='store_true', help='with --tables: the attention results in one column')
    p.add_argument('--tables', nargs='+', help='print the table and summary of these --json files (chunks of one sweep) and exit')
    p.add_argument('--time-limit', type=int, default=150, help='seconds a family may take before it counts as failed (raise it on a shared machine)')
    a = p.parse_args()
    from fastcls.layers.attention import attentions
    attns = [n for n in attentions.names if n != 'ca'] if a.attn == 'all' else a.attn.split(',')
    if a.tables:
        rows = [r for f in a.tables for r in json.load(open(f))]
        attns = list(dict.fromkeys(k for r in rows for k in r['attn'])) or attns
        print((compact_table if a.compact else table)(rows, attns)); print(); print(summary(rows, attns)); sys.exit()
    torch.set_num_threads(1)  # on a shared 2-core machine two intra-op threads make convolutions ~100x slower
    t = time.time()
    rows = sweep([f for f in a.families.split(",") if f], attns, limit=a.time_limit)
    print(); print(table(rows, attns)); print(); print(summary(rows, attns)); print(f'total {time.time()-t:.0f} s')
    if a.json: json.dump(rows, open(a.json, 'w'), indent=1)
