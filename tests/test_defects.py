"Known defects of issue 15 §4, each with a test that failed before its fix."
import shutil
from pathlib import Path
import pytest, torch
from fastcls.callback.mixup import CutMixUp
from fastcls.data.datasets import _write_atomic_dir
from fastcls.losses.metric import batch_hard_triplet

def test_cutmixup_alpha_zero_turns_that_mix_off():
    "timm's `Mixup(mixup_alpha=0, cutmix_alpha=1)` is CutMix only (train.py --mixup 0 --cutmix 1)"
    cb = CutMixUp(mixup_alpha=0., cutmix_alpha=1., generator=torch.Generator().manual_seed(0))
    assert cb.switch_prob == 1.
    assert all(bool(cb.draw(8, (32, 32))[1].all()) for _ in range(20))  # every draw is a CutMix
    cb = CutMixUp(mixup_alpha=0.4, cutmix_alpha=0., generator=torch.Generator().manual_seed(0))
    assert cb.switch_prob == 0. and not any(bool(cb.draw(8, (32, 32))[1].any()) for _ in range(20))
    with pytest.raises(ValueError, match='both off'): CutMixUp(mixup_alpha=0., cutmix_alpha=0.)

def test_cutmixup_batch_lambda_read_on_cpu():
    "'batch' mode weighs the losses with λ from the CPU draw, not by reading the device tensor back"
    cb = CutMixUp(switch_prob=0., generator=torch.Generator().manual_seed(0))
    cb.draws = cb.draw(4, (8, 8)); cb.lam = torch.full((1,), 0.123)  # a device copy that must not be read
    cb.lam0 = float(cb.draws[0][0])
    assert cb._lam(torch.ones(4)) == pytest.approx(cb.lam0) and cb.lam0 != pytest.approx(0.123)

def test_write_atomic_dir_raises_real_errors(tmp_path, monkeypatch):
    dest = tmp_path/'d'
    def boom(self, target): raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(Path, 'rename', boom)
    with pytest.raises(PermissionError): _write_atomic_dir(dest, lambda d: (d/'f').write_text('x'))
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # no temporary folder left behind
    monkeypatch.undo()
    dest.mkdir(); (dest/'f').write_text('theirs')  # another process got there first: fine
    monkeypatch.setattr(Path, 'rename', boom)
    _write_atomic_dir(dest, lambda d: (d/'f').write_text('mine'))
    assert (dest/'f').read_text() == 'theirs' and list(tmp_path.iterdir()) == [dest]

def test_batch_hard_triplet_gram_matches_pairwise():
    g = torch.Generator().manual_seed(0)
    e,y = torch.randn(32, 16, generator=g, dtype=torch.float64),torch.randint(0, 4, (32,), generator=g)
    d = (e[:, None] - e[None]).pow(2).sum(-1).add(1e-12).sqrt()  # the B×B×d reference
    same = y[:, None] == y[None]
    pos,neg = same & ~torch.eye(32, dtype=torch.bool),~same
    ref = torch.relu(torch.where(pos, d, -torch.inf).amax(1) - torch.where(neg, d, torch.inf).amin(1) + 0.3).mean()
    torch.testing.assert_close(batch_hard_triplet(e, y, 0.3), ref)

def test_cam_rejects_extra_targets():
    from fastcls.learner import cls_learner
    import fastcls.interpret  # noqa: F401
    from fastcls.test_utils import synth_dls
    learn = cls_learner(synth_dls(n=24, size=32, n_classes=3, bs=8), 'test_resnet', pretrained=False, head='linear')
    x = torch.randn(3, 3, 32, 32)
    assert learn.cam(x, targets=[0, 1, 2]).shape[0] == 3
    with pytest.raises(ValueError, match='got 5 targets for 3 images'): learn.cam(x, targets=[0, 1, 2, 0, 1])

def test_sphereface_lambda_counts_optimizer_steps():
    "Under MixUp the margin loss runs twice per batch; λ's iteration counter follows the optimizer steps"
    from fastcls.learner import cls_learner
    from fastcls.test_utils import synth_dls
    dls = synth_dls(n=24, size=32, n_classes=3, bs=8)
    learn = cls_learner(dls, 'test_resnet', pretrained=False, head='sphereface', embed_dim=8, cbs=CutMixUp(switch_prob=0.))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3); learn.get_preds()
    assert int(learn.model[1][-1].it) == learn.n_steps == len(dls.train)

def test_wsdan_crop_without_host_syncs(monkeypatch):
    "The crop boxes are computed on the device for the whole batch: no `.item()`/`.tolist()` per image"
    from fastcls.callback.wsdan import attention_crop
    torch.manual_seed(0)
    x,A = torch.randn(4, 3, 40, 48),torch.rand(4, 1, 5, 6)
    expected = attention_crop(x, A, torch.full((4,), 0.5), 0.1)
    def no_sync(*a, **k): raise AssertionError('host sync')
    monkeypatch.setattr(torch.Tensor, 'item', no_sync); monkeypatch.setattr(torch.Tensor, 'tolist', no_sync)
    torch.testing.assert_close(attention_crop(x, A, torch.full((4,), 0.5), 0.1), expected)
