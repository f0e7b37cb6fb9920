"Self-supervised pretraining (fastcls.ssl): parity of the losses and updates with lightly/timm, bad input, hand-over, CLI"
import copy, json, os, subprocess, sys, warnings
from pathlib import Path
import pytest, torch
from torch import nn
from fastai.torch_core import set_seed
from fastcls.ssl.methods import (nt_xent, info_nce, neg_cosine, dino_loss, teacher_temperature, ema_update, enqueue,
                                 update_center, momentum_schedule)
from fastcls.ssl.data import ssl_dls
from fastcls.ssl.learner import ssl_learner, CollapseWarning
from fastcls.learner import cls_learner
from fastcls.test_utils import synth_dls


from lightly.loss import NTXentLoss, NegativeCosineSimilarity, DINOLoss
from lightly.models.utils import update_momentum

def _close(a, b, eps=1e-6): assert torch.allclose(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=eps, rtol=0), (a, b)

@pytest.fixture(scope='module')
def z():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)

@pytest.mark.parametrize('t', [0.1, 0.5, 1.])
def test_nt_xent_equals_lightly(z, t): _close(nt_xent(*z, t), NTXentLoss(temperature=t)(*z))

def test_neg_cosine_equals_lightly(z): _close(neg_cosine(*z), NegativeCosineSimilarity()(*z))

def test_moco_queue_semantics_equal_lightly():
    "Loss against the queue before the keys of this batch are added, then the keys enqueued at the pointer, wrapping at the end"
    K,d,bs = 12, 8, 4
    ref = NTXentLoss(temperature=0.2, memory_bank_size=(K, d))
    queue,ptr = ref.memory_bank.bank.clone(),torch.zeros(1, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    for step in range(5):  # 5*4 = 20 keys: the queue of 12 wraps once
        q,k = torch.randn(bs, d, generator=g).requires_grad_(),torch.randn(bs, d, generator=g)
        _close(info_nce(q, k, queue, 0.2), ref(q, k))
        enqueue(queue, ptr, torch.nn.functional.normalize(k, dim=1))
        _close(queue, ref.memory_bank.bank); assert int(ptr) == int(ref.memory_bank.bank_ptr)

@pytest.mark.parametrize('epoch', [0, 5, 40])
def test_dino_loss_and_center_equal_lightly(epoch):
    g = torch.Generator().manual_seed(2)
    D,B = 64, 8
    ref = DINOLoss(output_dim=D, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9)
    center = torch.randn(1, 1, D, generator=g) * 0.1
    ref.center.copy_(center)
    t = [torch.randn(B, D, generator=g) for _ in range(2)]
    s = [torch.randn(B, D, generator=g) for _ in range(6)]  # 2 global + 4 local
    expected = ref(t, s, epoch=epoch)
    _close(dino_loss(torch.stack(t), torch.stack(s), center, teacher_temperature(epoch, 0.04, 0.07, 30), 0.1), expected)
    update_center(center, torch.stack(t), 0.9)
    _close(center, ref.center)

def test_momentum_update_equals_lightly_and_timm():
    from timm.utils import ModelEmaV2
    set_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    t_ours,t_lightly = copy.deepcopy(student),copy.deepcopy(student)
    ema = ModelEmaV2(student, decay=0.99)
    with torch.no_grad():
        for p in student.parameters(): p.add_(torch.randn_like(p))
    ema_update(student, t_ours, 0.99); update_momentum(student, t_lightly, 0.99); ema.update(student)
    for a,b,c in zip(t_ours.parameters(), t_lightly.parameters(), ema.module.parameters()): _close(a, b); _close(a, c)
    assert abs(momentum_schedule(0.5, 0.996) - 0.998) < 1e-9

@pytest.fixture(scope='module')
def dls(): return ssl_dls(synth_dls(n=32, size=32), size=32, bs=8)

def test_one_image_per_batch(dls):
    with pytest.raises(ValueError, match='bs >= 2'): ssl_dls(synth_dls(n=32, size=32), bs=1)
    d1 = ssl_dls(synth_dls(n=32, size=32), size=32, bs=2); d1.train.bs = 1
    with pytest.raises(ValueError, match='bs >= 2'): ssl_learner(d1, 'test_resnet')
    learn = ssl_learner(dls, 'test_resnet')
    learn.xb,learn.training = (torch.rand(1, 3, 32, 32),),True
    with pytest.raises(ValueError, match='training batch of 1 image'): learn.ssl_cb.before_batch()

def test_batch_too_small_for_moco_queue(dls):
    with pytest.raises(ValueError, match='multiple of the batch size'): ssl_learner(dls, 'test_resnet', 'mocov2', queue_len=20)
    with pytest.raises(ValueError, match='at most the 24 keys'): ssl_learner(dls, 'test_resnet', 'mocov2', queue_len=4096)

def test_collapse_warns_with_epoch(dls):
    class Collapsed(nn.Module):
        def __init__(self): super().__init__(); self.conv = nn.Conv2d(3, 4, 3)
        def forward_features(self, x): return self.conv(x)*0 + 1
    def collapsed(pretrained=False, **kw): return Collapsed()
    learn = ssl_learner(dls, collapsed, 'byol', hidden=32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)
    msgs = [str(x.message) for x in w if issubclass(x.category, CollapseWarning)]
    assert [m.split(':')[0] for m in msgs] == ['epoch 0', 'epoch 1'], msgs

def test_saved_folder_of_another_arch(dls, tmp_path):
    learn = ssl_learner(dls, 'test_resnet', 'simsiam', out_dim=32, pred_hidden=8)
    d = learn.save_encoder(tmp_path/'ssl')
    cdls = synth_dls(n=32, size=32)
    with pytest.raises(ValueError, match="pretrained as 'test_resnet', not 'test_convnext'"): cls_learner(cdls, 'test_convnext', pretrained=d)
    with pytest.raises(ValueError, match='n_in=3'): cls_learner(cdls, 'test_resnet', pretrained=d, n_in=1)

def test_state_in_checkpoint_and_resume(dls, tmp_path):
    "The momentum teacher, MoCo's queue and DINO's centre are in `learn.resumable`'s checkpoint and come back on resume"
    import fastcls.callback.checkpoint  # noqa: F401 (Learner.resumable)
    for method,kw,key in (('mocov2', dict(queue_len=8), 'queue'), ('dino', dict(out_dim=32, hidden=32, bottleneck=8, n_local=2), 'center')):
        set_seed(0)
        learn = ssl_learner(dls, 'test_resnet', method, **kw)
        with learn.no_bar(), learn.no_logging(), learn.resumable(tmp_path/method): learn.fit(1, 1e-3)
        st = torch.load(tmp_path/method/'last.pth', weights_only=True)['model']
        assert key in st and any(k.startswith('teacher.') for k in st)
        torch.testing.assert_close(st[key], learn.model.state_dict()[key])
        fresh = ssl_learner(dls, 'test_resnet', method, **kw)
        with fresh.no_bar(), fresh.no_logging(), fresh.resumable(tmp_path/method): fresh.fit(1, 1e-3)  # finished: loads, trains nothing
        torch.testing.assert_close(fresh.model.state_dict()[key], learn.model.state_dict()[key])

def test_vit_encoder_and_lr_find(dls):
    set_seed(0)
    learn = ssl_learner(dls, 'test_vit', 'dino', out_dim=32, hidden=32, bottleneck=8, n_local=2)  # local crops: 16-px views (one patch) for a 32-px ViT
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4)
    assert torch.isfinite(torch.tensor(learn.recorder.values[0][:2])).all()
    clf = cls_learner(synth_dls(n=32, size=32), 'test_vit', pretrained=learn)  # the ViT encoder goes to a classifier as a CNN's does
    w = learn.model.encoder.body.model.patch_embed.proj.weight
    torch.testing.assert_close(clf.model[0].model.patch_embed.proj.weight, w, rtol=0, atol=0)
    with clf.no_bar(), clf.no_logging(): clf.fine_tune(1, 1e-3, freeze_epochs=0)
    assert not torch.equal(clf.model[0].model.patch_embed.proj.weight, w)
    l2 = ssl_learner(dls, 'test_resnet', 'simclr')
    with l2.no_bar(), l2.no_logging(): res = l2.lr_find(num_it=6, show_plot=False)
    assert res.valley > 0

def test_encoder_round_trip_fresh_process(dls, tmp_path):
    learn = ssl_learner(dls, 'test_resnet', 'simclr')
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    d = learn.save_encoder(tmp_path/'enc')
    w = learn.model.encoder.body.model.conv1[0].weight.detach()
    code = (f"from fastcls.learner import cls_learner; from fastcls.test_utils import synth_dls; import torch\n"
            f"l = cls_learner(synth_dls(n=32, size=32), 'test_resnet', pretrained={str(d)!r})\n"
            f"torch.save(l.model[0].model.conv1[0].weight.detach(), {str(tmp_path/'w.pt')!r})")
    subprocess.run([sys.executable, '-c', code], check=True, env={**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1])})
    torch.testing.assert_close(torch.load(tmp_path/'w.pt'), w, rtol=0, atol=0)

def _cli(*args, cwd):
    "Run `fastcls ARGS` in-process in folder `cwd`: (exit code, stderr)"
    import contextlib, io
    from fastcls.cli.core import main
    err,old = io.StringIO(),os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), warnings.catch_warnings(): rc = main(list(args))
    finally: os.chdir(old)
    return rc, err.getvalue()

def test_cli_pretrain_then_train(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for c in ('a', 'b'):
        (tmp_path/'data'/c).mkdir(parents=True)
        for i in range(12): Image.fromarray((rng.random((24, 24, 3))*255).astype('uint8')).save(tmp_path/'data'/c/f'{i}.png')
    r = _cli('pretrain', '--data', 'data', '--method', 'simclr', '--arch', 'test_resnet', '--epochs', '1', '--size', '24', '--bs', '8',
             '--out', 'runs/ssl', '--quiet', cwd=tmp_path)
    assert r[0] == 0, r[1]
    assert (tmp_path/'runs/ssl/encoder.safetensors').is_file() and json.loads((tmp_path/'runs/ssl/ssl_config.json').read_text())['arch'] == 'test_resnet'
    data = str(tmp_path/'data')  # `fastcls train` reads folders through absolute paths
    r = _cli('train', '--data', data, '--arch', 'test_resnet', '--pretrained', 'runs/ssl', '--epochs', '1', '--size', '24', '--bs', '8',
             '--out', 'runs/clf', '--quiet', cwd=tmp_path)
    assert r[0] == 0, r[1]
    r = _cli('train', '--data', data, '--arch', 'test_convnext', '--pretrained', 'runs/ssl', '--epochs', '1', '--out', 'runs/x', '--quiet', cwd=tmp_path)
    assert r[0] == 2 and "pretrained as 'test_resnet'" in r[1] and 'Traceback' not in r[1]
    r = _cli('pretrain', '--data', 'data', '--method', 'swav', '--out', 'runs/y', cwd=tmp_path)
    assert r[0] == 2 and 'simclr' in r[1]

def test_queue_and_center_across_ranks(tmp_path):
    "Under DDP every rank enqueues the keys of all ranks and centres on the mean over all ranks' batches"
    import socket, torch.multiprocessing as mp
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    sys.path.insert(0, str(Path(__file__).parent))
    from ssl_ranks import ranks  # a small module: each spawned process imports only it
    mp.spawn(ranks, args=(2, port, tmp_path), nprocs=2)
    r0,r1 = torch.load(tmp_path/'0.pt'),torch.load(tmp_path/'1.pt')
    ts = torch.cat([torch.arange(12.).view(2, 3, 2) + 100*r for r in range(2)], 1)
    for r in (r0, r1):
        torch.testing.assert_close(r['center'], 0.5*ts.mean((0, 1)).view(1, 1, 2))
        torch.testing.assert_close(r['queue'][:6], ts[0]); assert int(r['ptr']) == 6

def test_full_ddp_fit_of_ssl_learner(tmp_path):
    "A whole `distrib_ctx` fit on 2 gloo processes: MoCo v2's queue and DINO's centre and teacher end the same on both ranks, as the student does"
    import os, socket, subprocess
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1]), 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port),
                        str(Path(__file__).parent/'ssl_ddp_train.py'), '--out', str(tmp_path), '--bs', '8'],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = torch.load(tmp_path/'rank0.pth'), torch.load(tmp_path/'rank1.pth')
    for m in ('mocov2', 'dino'):
        run = r0[m + '_run']
        assert run == r1[m + '_run'] and run['world'] == 2 and run['steps'] == run['n_train'] // 16 > 0  # 2 ranks x 8 images a step: each rank half the epoch
        assert r0[m].keys() == r1[m].keys()
        for k in r0[m]: torch.testing.assert_close(r1[m][k], r0[m][k], atol=1e-6, rtol=0, msg=f'{m} {k}')
    q = r0['mocov2']
    assert int(q['queue_ptr']) == (16 * r0['mocov2_run']['steps']) % 16  # every step enqueues both ranks' 2x8 keys
    assert float(r0['dino']['center'].abs().sum()) > 0  # the centre moved, from both ranks' teacher outputs

def test_moco_queue_must_hold_whole_steps_of_every_rank(dls, monkeypatch):
    "Under DDP a step enqueues the keys of all ranks: queue_len must be a multiple of bs × world size"
    import torch.distributed as dist
    learn = ssl_learner(dls, 'test_resnet', 'mocov2', queue_len=24, hidden=32, out_dim=16)  # 3 × bs 8: fine on one process
    ok = ssl_learner(dls, 'test_resnet', 'mocov2', queue_len=16, hidden=32, out_dim=16)
    learn.ssl_cb.before_fit()
    monkeypatch.setattr(dist, 'is_initialized', lambda: True); monkeypatch.setattr(dist, 'get_world_size', lambda: 2)
    with pytest.raises(ValueError, match=r'queue_len=24 is not a multiple of the 16 keys a step adds \(bs 8 × 2 ranks\); valid: 16, 32, 48'):
        learn.ssl_cb.before_fit()
    ok.ssl_cb.before_fit()  # 16 = 2 ranks × bs 8
