"Sampler statistics, determinism, DDP sharding and use in training"
import json, subprocess, sys, textwrap
import pytest
from fastai.data.core import TfmdDL, torch
from fastai.distributed import DistributedDL
from fastcls.data.samplers import samplers, ClassSamplerDL, class_probs, progressive_probs
from fastcls.losses.longtail import class_counts
from fastcls.data.datasets import digits_dls
from fastcls.test_utils import synth_dls

@pytest.fixture(scope='module')
def dls(): return digits_dls(size=8, bs=32, imbalance=10)

def epoch_freqs(dl, epochs):
    "Fraction of each class over `epochs` drawn epochs"
    c = 0
    for _ in range(epochs): c = c + torch.bincount(dl.labels[dl.get_idxs()], minlength=len(dl.counts)); dl.set_epoch(dl.epoch + 1)
    return c.float() / c.sum()

@pytest.mark.parametrize('name,q', [('instance', 1.), ('class_balanced', 0.), ('sqrt', .5), ('reversed', -1.)])
def test_class_frequencies_match_formula(dls, name, q):
    counts = class_counts(dls).double()
    want = counts**q / (counts**q).sum()
    dl = samplers[name](dls, seed=0).train
    assert dl.n == len(dls.train_ds)
    got = epoch_freqs(dl, 30).double()
    n = 30 * dl.n
    # multinomial: each frequency within 5 standard deviations (instance sampling is exact)
    assert ((got - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-9).all(), (got, want)

def test_reversed_is_bbn_formula(dls):
    n = class_counts(dls).float()
    w = n.max() / n
    torch.testing.assert_close(class_probs(n, -1.), w / w.sum())

def test_instance_is_a_permutation(dls):
    dl = samplers['instance'](dls, seed=0).train
    assert sorted(dl.get_idxs()) == list(range(len(dls.train_ds)))

def test_progressive(dls):
    n = class_counts(dls)
    dl = samplers['progressive'](dls, n_epoch=10, seed=0).train
    for e in (0, 3, 10):
        torch.testing.assert_close(dl.probs(e), (1 - e/10) * class_probs(n, 1.) + e/10 * class_probs(n, 0.))
    dl.set_epoch(9)
    got = epoch_freqs(dl, 1)  # epoch 9 of 10 is nearly balanced
    assert got.min() > 0.5 / len(n)
    assert dl.epoch == 10
    with pytest.raises(ValueError, match="needs `n_epoch`"): samplers['pb'](dls, n_epoch=None)

def test_deterministic_by_seed_and_epoch(dls):
    a,b = samplers['class_balanced'](dls, seed=7).train, samplers['class_balanced'](dls, seed=7).train
    ea = [(a.set_epoch(e), a.get_idxs())[1] for e in range(3)]
    assert ea == [(b.set_epoch(e), b.get_idxs())[1] for e in range(3)]
    assert a.get_idxs() == ea[2]  # drawing does not advance: only a full pass does
    assert ea[0] != ea[1]
    a.set_epoch(1); assert a.get_idxs() == ea[1]
    assert samplers['class_balanced'](dls, seed=8).train.get_idxs() != ea[0]

def test_new_keeps_sampling_and_no_shuffle_is_sequential(dls):
    dl = samplers['sqrt'](dls, seed=1).train
    assert type(dl.new()) is ClassSamplerDL and dl.new().seed == 1 and dl.new().q == .5
    assert dl.new(shuffle=False, drop_last=False).get_idxs() == list(range(len(dls.train_ds)))
    other = dl.new(dls.valid_ds, shuffle=False)  # another dataset: the class labels do not apply, a plain loader
    assert type(other) is TfmdDL and other.get_idxs() == list(range(len(dls.valid_ds)))

@pytest.mark.parametrize('world_size', [2, 3])
def test_distributed_sharding(dls, world_size):
    "fastai's DistributedDL shards what get_idxs returns: ranks' slices partition the (padded) epoch"
    class NoBroadcast(DistributedDL):
        def _broadcast(self, t, rank): return t
    dl = samplers['reversed'](dls, seed=3).train
    dl.set_epoch(5); full = dl.get_idxs()
    shards = []
    for r in range(world_size):
        dl.set_epoch(5)  # every rank computes the same epoch
        shards.append(list(NoBroadcast(dl, rank=r, world_size=world_size).get_idxs()))
    assert len({len(s) for s in shards}) == 1
    flat = [i for s in shards for i in s]
    assert flat[:len(full)] == full and len(flat) - len(full) < world_size

@pytest.mark.parametrize('name', ['class_balanced', 'reversed', 'instance'])
def test_num_replicas_rank_sharding(dls, name):
    "With `num_replicas`/`rank` each rank keeps its strided share of the same (padded) epoch, as DistributedSampler"
    full = samplers[name](dls, seed=11).train
    shards = [samplers[name](dls, seed=11, num_replicas=3, rank=r).train for r in range(3)]
    for e in range(2):  # two epochs: every rank draws the same epoch
        for d in (full, *shards): d.set_epoch(e)
        want = full.get_idxs()
        got = [s.get_idxs() for s in shards]
        pad = want + want[:(-len(want)) % 3]
        assert all(g == pad[r::3] for r, g in enumerate(got))
        assert [s.n for s in shards] == [len(pad) // 3] * 3
    bs = [len(b[1]) for b in shards[0]]  # iterating a rank's loader yields about its share, in len() batches
    assert len(bs) == len(shards[0]) and shards[0].n - shards[0].bs < sum(bs) <= shards[0].n
    with pytest.raises(ValueError, match="needs a `seed`"): samplers[name](dls, num_replicas=2, rank=1)
    with pytest.raises(ValueError, match="rank must be in"): samplers[name](dls, seed=0, num_replicas=2, rank=-1)

def test_shards_agree_across_processes():
    "Ranks in separate processes (different global RNG states) draw the same epoch and partition it"
    code = textwrap.dedent("""
        import json, sys, torch
        rank = int(sys.argv[1]); torch.manual_seed(100 + rank)
        from fastcls.data.samplers import samplers
        from fastcls.data.datasets import digits_dls
        dls = digits_dls(size=8, bs=32, imbalance=10)
        dl = samplers['sqrt'](dls, seed=4, num_replicas=2, rank=rank).train
        dl.set_epoch(3); e3 = dl.get_idxs()
        for _ in dl: pass  # a full pass moves on to epoch 4
        print(json.dumps([e3, dl.get_idxs()]))
    """)
    outs = [subprocess.run([sys.executable, '-c', code, str(r)], capture_output=True, text=True) for r in (0, 1)]
    assert all(o.returncode == 0 for o in outs), [o.stderr[-2000:] for o in outs]
    res = [json.loads(o.stdout.strip().splitlines()[-1]) for o in outs]
    full = samplers['sqrt'](digits_dls(size=8, bs=32, imbalance=10), seed=4).train
    full.set_epoch(3); want = full.get_idxs(); full.set_epoch(4); want4 = full.get_idxs()
    pad = lambda w: w + w[:len(w) % 2]
    for e, w in enumerate((want, want4)):  # epoch 3 and the next one
        assert res[0][e] == pad(w)[0::2] and res[1][e] == pad(w)[1::2]
        assert sorted(res[0][e] + res[1][e]) == sorted(pad(w))

def test_train_and_predict_with_sampler():
    from fastcls.learner import cls_learner
    dls = synth_dls(n=48, n_classes=3, bs=8)
    sdls = samplers['class_balanced'](dls, seed=0)
    assert type(sdls.valid) is type(dls.valid) and sdls.valid.dataset is dls.valid.dataset
    learn = cls_learner(sdls, 'test_resnet', pretrained=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    preds, targs = learn.get_preds(ds_idx=0)  # a sequential pass over the training set
    assert len(preds) == len(dls.train_ds)

def test_bad_input(dls):
    with pytest.raises(ValueError, match="Valid choices"): samplers['balanced']
    with pytest.raises(ValueError, match="labels for a dataset"): ClassSamplerDL(dls.train_ds, labels=[0, 1], bs=4)

def test_epoch_advances_only_with_a_full_pass(dls):
    "one_batch/show_batch and an interrupted pass leave the schedule alone; a trained epoch moves it on"
    dl = samplers['progressive'](dls, n_epoch=4, seed=0).train
    e0 = dl.get_idxs()
    dl.one_batch(); dl.one_batch()
    assert dl.epoch == 0 and dl.get_idxs() == e0
    for i,_ in enumerate(dl):
        if i == 1: break
    assert dl.epoch == 0
    for _ in dl: pass
    assert dl.epoch == 1 and dl.get_idxs() != e0
    assert dl.sampler_state() == dict(seed=0, epoch=1)

def test_fit_advances_one_epoch_per_trained_epoch_across_fits():
    "fine_tune's two fits share one schedule: the sampler's epoch counts the learner's trained epochs"
    from fastcls.learner import cls_learner
    sdls = samplers['progressive'](synth_dls(n=48, n_classes=3, bs=8), n_epoch=3, seed=0)
    learn = cls_learner(sdls, 'test_resnet', pretrained=False)
    with learn.no_bar(), learn.no_logging():
        learn.dls.one_batch()
        learn.fine_tune(2, 1e-3, freeze_epochs=1)
        assert learn.dls.train.epoch == 3
        learn.get_preds(ds_idx=0)  # a sequential pass is another loader: the schedule does not move
    assert learn.dls.train.epoch == 3
