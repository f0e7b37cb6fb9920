"""Distillation, self-distillation and EMA on ELPV (published split): students with and without a teacher, same epochs.

    flock /tmp/fastcls-cpu.lock python benchmarks/bench_distill.py --out benchmarks/distill/elpv.jsonl
    python benchmarks/bench_distill.py --table benchmarks/distill/elpv.jsonl      # markdown tables
    python benchmarks/bench_distill.py --micro      # < 1 min, no data: step vs EMA update vs teacher forward, latency

Teacher: `cls_learner(dls, 'tf_efficientnet_lite0', pretrained=True)` (the ImageNet weights of fastcls's registered offline
source, its normalisation) at `--teacher-size` px, trained with the `--teacher-loss` of fastcls's long-tail registry (default 'wce':
CE weighted (n_max/n_c)^0.5, 67.1 / 41.7 in weights.md; the first table of BENCHMARKS.md §10 came from an earlier version of
this script: 1/n_c weights, a linear head, 96 px), channels-last, `fine_tune(teacher_epochs, 2e-3, freeze_epochs=1)`; saved with
`save_weights` in `--teacher-dir` and reused by later runs. Students (`mobilenetv3_small_100`, `resnet18`) train from scratch at `--size` px with
plain CE, `fit_one_cycle(epochs, lr)`, fastai's `aug_transforms`; KDCallback converts their batches to the teacher's size and
normalisation. Rows: alone | +KD (Hinton, T=4, α=0.9, cached logits) | +KD live (`kd_live`: T=2, α=0.5, the teacher run on each batch; not in the default rows) | +DIST (T=1, 0.5·CE + DIST, cached) | +AT (teacher run on each
batch, the student's stride-16 stage (4x4) pooled to the teacher's stride-32 stage (3x3), 0.5·CE + 1000·AT) | +EMA (0.998, warm-up, validated on the EMA weights) | +CS-KD
(pair sampler, λ=1, T=4) | +PS-KD (α_T=0.8) | +label smoothing 0.1 | +CutMix (α=1) | `la`: the student alone with
logit-adjusted CE (Menon et al., τ=1; the control for a `--teacher-loss logit_adjusted` teacher; not in the default rows) |
`kd_la`: +KD as above with logit-adjusted CE as the task term (not in the default rows). Also: inference latency (batch 1 and 32, CPU),
the median training step of a student alone / with cached teacher logits / with the teacher run on every batch / with EMA, the
one-off cache pass, and EMA's own update time as a share of a student step. One JSON line per result is appended to `--out`.
The cached rows (kd, kd_la, dist) reuse the teacher's logits of the training items that the first of them saved in
`--teacher-dir` (`train_logits.pt`; `cache_reused` in the row): their wall seconds then exclude the one-off fill, which the
`steps` line times.
"""
import argparse, json, time, types, warnings, statistics
from pathlib import Path
import torch
import fastai.callback.channelslast  # noqa: F401  (Learner.to_channelslast)
from fastai.vision.all import Callback, CancelFitException, set_seed, accuracy, CrossEntropyLossFlat
from fastcls.data.datasets import elpv_dls
from fastcls.learner import cls_learner
from fastcls.losses.longtail import losses
from fastcls.metrics.longtail import balanced_acc
from fastcls.callback.distill import KDCallback, CSKD, PSKD, pair_dls
from fastcls.callback.ema import EMA
from fastcls.callback.mixup import CutMixUp
from fastcls.weights import load_cls_learner
import fastcls.ssl.learner  # noqa: F401  (Learner.linear_probe)

warnings.filterwarnings('ignore')
ROWS = 'alone,kd,ema,dist,at,cskd,pskd,ls,cutmix'

def scores(learn):
    with learn.no_bar(): p,y = learn.get_preds(dl=learn.dls.valid)
    return dict(top1=round(100*float((p.argmax(1) == y).float().mean()), 1), balanced=round(100*float(balanced_acc(p, y)), 1))

def teacher(a):
    "The teacher: ImageNet lite0 from fastcls's registered offline source, fine-tuned with `--teacher-loss`; cached in `--teacher-dir`"
    d = Path(a.teacher_dir)
    if (d/'config.json').exists(): return load_cls_learner(d), json.loads((d/'scores.json').read_text())
    set_seed(a.seed)
    dls = elpv_dls(size=a.teacher_size, bs=a.bs)
    learn = cls_learner(dls, 'tf_efficientnet_lite0', pretrained=True, metrics=accuracy, loss_func=losses[a.teacher_loss](dls),
                        head=a.teacher_head, pool=a.teacher_pool)
    learn.to_channelslast(use_amp=False)  # 1.36x faster on this CPU (§8); the saved weights are the same
    start = time.time()
    with learn.no_bar(), learn.no_logging():
        if a.teacher_probe: learn.linear_probe(a.teacher_probe, cache=True)  # the default run's recipe (BENCHMARKS.md §8)
        else: learn.fine_tune(a.teacher_epochs, 2e-3, freeze_epochs=1)
    res = dict(scores(learn), wall=round(time.time() - start, 1), loss=a.teacher_loss,
               **(dict(probe=a.teacher_probe, head=a.teacher_head, pool=a.teacher_pool) if a.teacher_probe else {}))
    learn.loss_func = CrossEntropyLossFlat()
    learn.save_weights(d); (d/'scores.json').write_text(json.dumps(res))
    cache_file(a).unlink(missing_ok=True)  # logits of an earlier teacher
    return load_cls_learner(d), res

def student_dls(a): return elpv_dls(size=a.size, bs=a.bs)

def cache_file(a): return Path(a.teacher_dir)/'train_logits.pt'

def reuse_cache(a, cbs):
    """Give the cached `KDCallback`s in `cbs` the teacher's logits of the training items saved in `--teacher-dir` by an earlier row:
    they depend only on the teacher and the items (validation transforms, the teacher's size), not on the student or the seed.
    The one-off fill is timed by `step_times`. Returns whether a saved cache was used"""
    kds = [cb for cb in cbs if isinstance(cb, KDCallback) and cb.cache]
    if not kds or not cache_file(a).exists(): return False
    for cb in kds: cb.cached = torch.load(cache_file(a))
    return True

def save_cache(a, cbs):
    for cb in cbs:
        if isinstance(cb, KDCallback) and cb.cached is not None and not cache_file(a).exists(): torch.save(cb.cached, cache_file(a))

def stage(model, reduction):
    return [f['module'] for f in model[0].model.feature_info if f['reduction'] == reduction][0]

def run(a, arch, row, t):
    set_seed(a.seed)
    dls = student_dls(a)
    loss,cbs = None,[]
    if row == 'kd': cbs = [KDCallback(t, T=a.kd_T, alpha=a.kd_alpha, cache=True)]
    elif row == 'kd_la': cbs,loss = [KDCallback(t, T=4., alpha=.9, cache=True)],losses['logit_adjusted'](dls)  # KD whose task term is logit-adjusted CE
    elif row == 'kd_live': cbs = [KDCallback(t, T=2., alpha=.5)]
    elif row == 'dist': cbs = [KDCallback(t, T=1., alpha=.5, loss={'dist': 2.}, cache=True)]
    elif row == 'ema': cbs = [EMA(decay=.998)]
    elif row == 'cskd': dls,cbs = pair_dls(dls, seed=a.seed),[CSKD(lam=1., T=4.)]
    elif row == 'pskd': cbs = [PSKD(alpha_T=.8)]
    elif row == 'ls': loss = CrossEntropyLossFlat(label_smoothing=.1)
    elif row == 'la': loss = losses['logit_adjusted'](dls)  # the control for a logit-adjusted teacher: the student alone, same loss
    elif row == 'cutmix': cbs = [CutMixUp(cutmix_alpha=1., switch_prob=1.)]
    learn = cls_learner(dls, arch, pretrained=False, metrics=accuracy, loss_func=loss)
    if row == 'at': cbs = [KDCallback(t, alpha=.5, loss={'at': 2000.}, layers=[(stage(learn.model, 16), stage(t.model, 32))])]
    learn.add_cbs(cbs)  # kept after the fit: `ema_weights` needs the EMA callback
    reused = reuse_cache(a, cbs)
    start = time.time()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(a.epochs, a.lr)
    wall = round(time.time() - start, 1)
    save_cache(a, cbs)
    if row == 'ema':
        with learn.ema_weights(): sc = scores(learn)
    else: sc = scores(learn)
    return dict(kind='row', arch=arch, row=row, **sc, wall=wall, epochs=a.epochs, size=a.size, seed=a.seed,
                **(dict(cache_reused=reused) if any(isinstance(cb, KDCallback) and cb.cache for cb in cbs) else {}),
                **(dict(T=a.kd_T, alpha=a.kd_alpha) if row == 'kd' and (a.kd_T, a.kd_alpha) != (4., .9) else {}))

@torch.inference_mode()
def latency(model, size, bs, n=20):
    model.eval(); x = torch.randn(bs, 3, size, size)
    for _ in range(3): model(x)
    ts = []
    for _ in range(n): s = time.perf_counter(); model(x); ts.append(time.perf_counter() - s)
    return round(1000*statistics.median(ts), 2)

class StepTimer(Callback):
    "Seconds of each training step (before_batch to after_batch), and from the start of the fit to the first batch; stops after `n` steps"
    order = 100
    def __init__(self, n): self.n,self.steps = n,[]
    def before_fit(self): self.t0 = time.perf_counter(); self.setup = None
    def before_batch(self):
        if self.setup is None: self.setup = time.perf_counter() - self.t0
        self.t = time.perf_counter()
    def after_batch(self):
        self.steps.append(time.perf_counter() - self.t)
        if len(self.steps) >= self.n: raise CancelFitException()

class TimedEMA(EMA):
    "EMA that records the time of each of its own updates"
    def before_fit(self): self.ts = []; super().before_fit()
    def after_step(self):
        s = time.perf_counter(); super().after_step(); self.ts.append(time.perf_counter() - s)

def step_times(a, arch, t, n=24):
    """Median seconds of a training step (first 4 steps dropped) of the student alone, with cached teacher logits, with the teacher
    run on each batch, and with EMA; `cache_fill_s`: the one-off teacher pass over the training set (the 24-step fit with the cache
    less the one without); `ema_update_pct`: EMA's own median
    update time (same steps) as % of the student-alone step; `ema_update_mean_pct`: the mean over every step, the first ones included"""
    out,fit_s = {},{}
    for nm,cb in (('alone', None), ('kd_cached', KDCallback(t, cache=True)), ('kd_live', KDCallback(t)), ('ema', TimedEMA(.998))):
        set_seed(a.seed)
        learn = cls_learner(student_dls(a), arch, pretrained=False)
        tm = StepTimer(n)
        s = time.perf_counter()
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[c for c in (cb, tm) if c is not None])
        fit_s[nm] = time.perf_counter() - s
        out[nm] = round(statistics.median(tm.steps[4:] or tm.steps), 4)
        if nm == 'kd_cached': out['cache_fill_s'] = round(fit_s['kd_cached'] - fit_s['alone'], 1)  # the fill runs in KDCallback.before_fit
        if nm == 'ema':  # the median update of the steps timed for the step medians (the first 4 dropped), and the mean of all of them
            out['ema_update_pct'] = round(100*statistics.median(cb.ts[4:] or cb.ts)/out['alone'], 2)
            out['ema_update_mean_pct'] = round(100*statistics.mean(cb.ts)/out['alone'], 2)
    out.update(cached_ratio=round(out['kd_cached']/out['alone'], 2), live_ratio=round(out['kd_live']/out['alone'], 2),
               ema_step_ratio=round(out['ema']/out['alone'], 3), student_epoch_s=round(out['alone']*len(student_dls(a).train), 1))
    return out

def micro(a):
    """No data, no training run (under a minute): per architecture, with random inputs of `--bs` at `--size` px, the median of a
    training step (forward, backward, Adam step), of timm's ModelEmaV3 update, and of the teacher's no-grad forward at `--teacher-size`
    (what KD without a cache adds per step); inference latency at batch 1 and 32"""
    import timm
    from timm.utils.model_ema import ModelEmaV3
    teach = timm.create_model('tf_efficientnet_lite0', num_classes=4).eval()
    def med(f, n=8):
        for _ in range(2): f()
        ts = []
        for _ in range(n): s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
        return statistics.median(ts)
    for arch in a.archs.split(','):
        m = timm.create_model(arch, num_classes=4)
        opt,ema = torch.optim.Adam(m.parameters(), 1e-3),ModelEmaV3(m, decay=.998, use_warmup=True)
        x,y,xt = torch.randn(a.bs, 3, a.size, a.size),torch.randint(0, 4, (a.bs,)),torch.randn(a.bs, 3, a.teacher_size, a.teacher_size)
        def step(): opt.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); opt.step()
        st = med(step); eu = med(lambda: ema.update(m, step=100))
        ours = EMA(.998); ours.learn = types.SimpleNamespace(model=m); ours.reset()
        fu = med(ours.after_step)  # fastcls's EMA update (the same lerp, tensors collected once)
        with torch.inference_mode(): tf = med(lambda: teach(xt))
        print(json.dumps(dict(kind='micro', arch=arch, bs=a.bs, size=a.size, teacher_size=a.teacher_size, step_ms=round(1000*st, 1),
                              ema_update_ms=round(1000*eu, 2), ema_pct_of_step=round(100*eu/st, 2),
                              fastcls_ema_update_ms=round(1000*fu, 2), fastcls_ema_pct_of_step=round(100*fu/st, 2), fastcls_vs_timm_ema=round(fu/eu, 2), teacher_fwd_ms=round(1000*tf, 1),
                              live_kd_step_ratio=round((st + tf)/st, 2),
                              **{f'student_bs{b}_ms': latency(m, a.size, b, n=10) for b in (1, 32)},
                              **{f'teacher_bs{b}_ms': latency(teach, a.teacher_size, b, n=10) for b in (1, 32)})), flush=True)

def table(files):
    rows = [json.loads(l) for f in files for l in Path(f).read_text().splitlines() if l.strip()]
    names = dict(alone='student alone', kd='+ KD (T=4, α=0.9, cached)', kd_live='+ KD (T=2, α=0.5, teacher on each batch)', dist='+ DIST (cached)', at='+ AT', ema='+ EMA (0.998)',
                 cskd='+ CS-KD', pskd='+ PS-KD', ls='+ label smoothing 0.1', cutmix='+ CutMix',
                 la='student alone, logit-adjusted CE', kd_la='+ KD (cached), task loss logit-adjusted CE')
    for r in {json.dumps(r): r for r in rows if r['kind'] == 'teacher'}.values():
        if r['kind'] == 'teacher': print(f"teacher tf_efficientnet_lite0 (ImageNet, {r.get('size')} px): top-1 {r['top1']}, balanced {r['balanced']}, {r['wall']} s\n")
    archs = sorted({r['arch'] for r in rows if r['kind'] == 'row'})
    print('| method | ' + ' | '.join(f'{a} top-1 | balanced | s' for a in archs) + ' |')
    print('|---|' + '---|---|---|'*len(archs))
    for k,nm in names.items():
        cells = []
        for a in archs:
            r = [r for r in rows if r['kind'] == 'row' and r['arch'] == a and r['row'] == k]
            cells += [str(r[-1]['top1']), str(r[-1]['balanced']), str(r[-1]['wall'])] if r else ['–']*3
        print(f'| {nm} | ' + ' | '.join(cells) + ' |')
    for r in rows:
        if r['kind'] in ('latency', 'steps'): print(json.dumps(r))
    seeds_table(rows, names)

def seeds_table(rows, names):
    "Where a row ran with more than one seed: per seed, mean ± sd, and the balanced-accuracy gain over `alone` of the same seed (the last run of each)"
    rows = [dict(r, row=f"kd_T{r['T']:g}_a{r['alpha']:g}") if 'alpha' in r else r for r in rows]
    names = {**names, **{r['row']: f"+ KD (T={r['T']:g}, α={r['alpha']:g}, cached)" for r in rows if 'alpha' in r}}
    last = {(r['arch'], r['row'], r.get('seed', 42)): r for r in rows if r['kind'] == 'row'}
    fmt = lambda v: f'{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}'
    print('\n| student, row | seeds | top-1 | balanced | mean top-1 ± sd | mean balanced ± sd | balanced gain per seed (mean) |\n|---|---|---|---|---|---|---|')
    for arch in sorted({k[0] for k in last}):
        for row in names:
            seeds = [k[2] for k in last if k[:2] == (arch, row)]
            if len(seeds) < 2: continue
            rs = [last[arch, row, s] for s in seeds]
            t1,ba = [r['top1'] for r in rs],[r['balanced'] for r in rs]
            gain = [last[arch, row, s]['balanced'] - last[arch, 'alone', s]['balanced'] for s in seeds if (arch, 'alone', s) in last]
            g = ' / '.join(f'{x:+.1f}' for x in gain) + f' ({statistics.mean(gain):+.2f})' if gain and row != 'alone' else '–'
            print(f"| {arch} {names[row]} | {' / '.join(map(str, seeds))} | {' / '.join(map(str, t1))} | {' / '.join(map(str, ba))} | {fmt(t1)} | {fmt(ba)} | {g} |")

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--out', default='benchmarks/distill/elpv.jsonl'); p.add_argument('--table', nargs='*')
    p.add_argument('--archs', default='mobilenetv3_small_100,resnet18'); p.add_argument('--rows', default=ROWS)
    p.add_argument('--epochs', type=int, default=3); p.add_argument('--size', type=int, default=64)
    p.add_argument('--teacher-size', type=int, default=96); p.add_argument('--teacher-epochs', type=int, default=2)
    p.add_argument('--teacher-dir', default='runs/distill_teacher'); p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--teacher-probe', type=int, default=0, help='train the teacher as the default run does: `linear_probe(N, cache=True)` instead of `fine_tune`')
    p.add_argument('--teacher-head', default='fastai'); p.add_argument('--teacher-pool', default='avg')
    p.add_argument('--teacher-loss', default='wce', help="a `fastcls.losses.longtail.losses` name ('wce': CE weighted (n_max/n_c)^0.5)")
    p.add_argument('--bs', type=int, default=32); p.add_argument('--seed', type=int, default=42)
    p.add_argument('--skip-timing', action='store_true'); p.add_argument('--micro', action='store_true')
    p.add_argument('--kd-T', type=float, default=4.); p.add_argument('--kd-alpha', type=float, default=.9, help='T and α of the `kd` row')
    a = p.parse_args()
    if a.table is not None: return table(a.table)
    torch.set_num_threads(2)
    if a.micro: return micro(a)
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    def emit(d):
        print(json.dumps(d), flush=True)
        with open(out, 'a') as f: f.write(json.dumps(d) + '\n')
    t,tres = teacher(a)
    emit(dict(kind='teacher', **tres, size=a.teacher_size, epochs=a.teacher_epochs))
    tmodel = t.model
    for arch in a.archs.split(','):
        if not a.skip_timing:
            s = cls_learner(student_dls(a), arch, pretrained=False).model
            emit(dict(kind='latency', arch=arch, size=a.size, **{f'student_bs{b}_ms': latency(s, a.size, b) for b in (1, 32)},
                      **{f'teacher_bs{b}_ms': latency(tmodel, a.teacher_size, b) for b in (1, 32)}))
            emit(dict(kind='steps', arch=arch, **step_times(a, arch, t)))
        for row in a.rows.split(','): emit(run(a, arch, row, t))

if __name__ == '__main__': main()
