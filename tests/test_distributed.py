"DDP on CPU: a 2-process torchrun run matches the single-process run at the same global batch size."
import json, os, socket, subprocess, sys
from pathlib import Path
import pytest, torch

SCRIPT = Path(__file__).parent/'ddp_train.py'

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _run(out, nproc, bs, *args):
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1]), 'OMP_NUM_THREADS': '1'}
    pre = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', str(_free_port())] if nproc > 1 else [sys.executable]
    r = subprocess.run(pre + [str(SCRIPT), '--out', str(out), '--bs', str(bs), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.load(open(out/f'rank{i}.json')) for i in range(nproc)]
    return (ranks, torch.load(out/'model.pth'), torch.load(out/'init.pth')) if not args else ranks

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp('ddp')
    return _run(d/'single', 1, 16), _run(d/'ddp', 2, 8)

def test_ranks_are_distributed(runs):
    (single,*_),(ddp,*_) = runs
    assert single[0]['world'] <= 1 and [r['world'] for r in ddp] == [2, 2] and [r['rank'] for r in ddp] == [0, 1]

def test_model_matches_single_process(runs):
    (_,m1,i1),(_,m2,_) = runs
    assert m1.keys() == m2.keys()
    for k in m1:
        if m1[k].is_floating_point(): torch.testing.assert_close(m2[k], m1[k], atol=1e-4, rtol=1e-3, msg=k)
    assert any(not torch.equal(m1[k], i1[k]) for k in m1 if m1[k].is_floating_point())  # training moved the weights

def test_shards_disjoint_in_stream_order_and_balanced(runs):
    (single,*_),(ddp,*_) = runs
    bs, n_ep = 8, len(single[0]['seen'])
    assert n_ep == 2 and all(len(r['seen']) == n_ep for r in ddp)
    for e in range(n_ep):
        s0,s1 = ddp[0]['seen'][e], ddp[1]['seen'][e]
        assert len(s0) == len(s1) == 24  # 48 training items, global batches of 16
        # rank r holds batches r, r+2, ...: interleaved they are the single-process epoch (a sampler's draw from rank 0)
        inter = [i for b in range(0, 24, bs) for i in s0[b:b+bs] + s1[b:b+bs]]
        assert inter == single[0]['seen'][e][:48]
        for r in ddp:  # the sampler's per-group class balance survives on every rank
            ys = r['ys'][e]
            assert all(sum(ys[b:b+bs]) == bs//2 for b in range(0, len(ys), bs))

def test_gathered_predictions_and_metrics(runs):
    (single,*_),(ddp,*_) = runs
    p1,p2 = torch.tensor(single[0]['preds']), torch.tensor(ddp[0]['preds'])
    assert p1.shape == p2.shape == (17, 2)  # odd validation set: the padded sample is removed after gathering
    assert single[0]['targs'] == ddp[0]['targs'] == ddp[1]['targs']
    torch.testing.assert_close(p2, p1, atol=1e-4, rtol=1e-3)
    v1,v2 = torch.tensor(single[0]['values']), torch.tensor(ddp[0]['values'])
    assert v1.shape == v2.shape == (2, 3)  # train loss, valid loss, accuracy per epoch, on rank 0 from all ranks
    torch.testing.assert_close(v2[:, 1:], v1[:, 1:], atol=0.02, rtol=0)  # scalar averages include 1 padded item of 17

def test_nan_on_one_rank_stops_every_rank(tmp_path):
    "Rank 1's loss is NaN: both ranks raise NonFiniteLossError at the same batch (rank 0 does not wait in an all-reduce)"
    ranks = _run(tmp_path, 2, 8, '--nan-rank', 1)
    assert [r['rank'] for r in ranks] == [0, 1]
    assert all(r['error'] and 'at epoch 0, batch 1' in r['error'] for r in ranks), ranks
    assert 'not finite on rank 1' in ranks[0]['error'] and 'nan at epoch 0' in ranks[1]['error']
    assert ranks[0]['batches'] == ranks[1]['batches'] == [0]  # neither rank stepped past the poisoned batch

def test_kd_and_ema_under_ddp(tmp_path):
    "KDCallback + EMA on 2 ranks: the EMA weights agree across ranks and with one process at the same global batch"
    single = _run(tmp_path/'single', 1, 16, '--kd-ema')
    ddp = _run(tmp_path/'ddp', 2, 8, '--kd-ema')
    assert [r['world'] for r in ddp] == [2, 2]
    assert [r['updates'] for r in ddp] == [single[0]['updates']] * 2 and single[0]['updates'] == 6  # 48 training items, global batch 16, 2 epochs
    e1, e0, r1 = (torch.load(tmp_path/d/f'ema{i}.pth') for d,i in (('ddp', 1), ('ddp', 0), ('single', 0)))
    for k in e0:
        if not e0[k].is_floating_point(): continue
        torch.testing.assert_close(e1[k], e0[k], atol=0, rtol=0, msg=k)  # every rank holds the same EMA
        torch.testing.assert_close(e0[k], r1[k], atol=1e-4, rtol=1e-3, msg=k)
