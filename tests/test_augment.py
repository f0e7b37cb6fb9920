"AlbumentationsTransform, presets, TimmErasing: splits, grayscale/RGB, export round trip in a fresh process, bad input."
import json, subprocess, sys, textwrap
import numpy as np, pytest, torch
import albumentations as A
from fastai.vision.all import PILImage, PILImageBW, Resize, Normalize, imagenet_stats, ImageDataLoaders, TensorImage
from fastcls.data.augment import AlbumentationsTransform, aug_presets, presets, TimmAugment, TimmErasing
from fastcls.callback.mixup import CutMixUp
from fastcls.learner import cls_learner
from fastcls.test_utils import synth_df

@pytest.fixture(scope='module')
def img(): return PILImage.create(synth_df(n=32, size=32).fname[0])

def test_train_split_only_unless_valid_aug(img):
    t = AlbumentationsTransform(A.HorizontalFlip(p=1))
    assert np.array_equal(np.asarray(t(img, split_idx=0)), np.asarray(img)[:, ::-1])
    assert np.array_equal(np.asarray(t(img, split_idx=1)), np.asarray(img))
    assert np.array_equal(np.asarray(t(img)), np.asarray(img))  # inference (no split): untouched
    t = AlbumentationsTransform(A.HorizontalFlip(p=1), valid_aug=A.VerticalFlip(p=1))
    assert np.array_equal(np.asarray(t(img, split_idx=1)), np.asarray(img)[::-1])

def test_grayscale_stays_grayscale(img):
    bw = PILImageBW(img.convert('L'))
    for nm in presets.names:
        out = aug_presets(nm)(bw, split_idx=0)
        assert (type(out), out.mode, out.size) == (PILImageBW, 'L', bw.size), nm

@pytest.mark.parametrize('name', ['light', 'medium', 'heavy', 'randaugment', 'autoaugment', 'augmix'])
def test_every_preset_changes_training_images_only(img, name):
    t = aug_presets(name)
    outs = [t(img, split_idx=0) for _ in range(8)]
    assert all((type(o), o.mode, o.size) == (PILImage, 'RGB', img.size) for o in outs)
    assert any(not np.array_equal(np.asarray(o), np.asarray(img)) for o in outs)
    assert np.array_equal(np.asarray(t(img, split_idx=1)), np.asarray(img))

def test_timm_policies_are_timms_own():
    from timm.data.auto_augment import RandAugment, AutoAugment, AugMixAugment
    for nm,cls in [('randaugment', RandAugment), ('autoaugment', AutoAugment), ('augmix', AugMixAugment)]:
        assert isinstance(aug_presets(nm).tfm, cls)
    assert len(aug_presets('randaugment', config='rand-m5-n1').tfm.ops) > 0

@pytest.mark.parametrize('aug,msg', [
    (A.Normalize(), 'Leave out `Normalize`'),
    (A.ToGray(num_output_channels=1, p=1), 'HxWxC'),
])
def test_wrong_output_is_refused(img, aug, msg):
    with pytest.raises(ValueError, match=msg): AlbumentationsTransform(aug)(img, split_idx=0)

def test_tensor_output_is_refused(img):
    from albumentations.pytorch import ToTensorV2
    with pytest.raises(ValueError, match='got Tensor'): AlbumentationsTransform(ToTensorV2())(img, split_idx=0)

def test_unknown_preset():
    with pytest.raises(ValueError, match='Valid choices: augmix, autoaugment, heavy, light, medium, randaugment'): aug_presets('strong')

def test_timm_erasing_on_normalised_training_batches():
    x = Normalize.from_stats(*imagenet_stats)(TensorImage(torch.rand(8, 3, 16, 16)))
    er = TimmErasing(p=1., mode='const')
    xe = er(x, split_idx=0)
    assert (xe != x).flatten(1).any(1).all() and ((xe == 0) | (xe == x)).all()
    assert torch.equal(er(x, split_idx=1), x)

def test_export_round_trip_in_fresh_process(tmp_path):
    "A learner trained with AlbumentationsTransform, a timm policy and CutMixUp exports and predicts the same elsewhere"
    torch.manual_seed(0)
    df = synth_df(n=48, size=32, n_classes=3)
    tfms = [Resize(32), AlbumentationsTransform(A.Compose([A.HorizontalFlip(), A.RandomBrightnessContrast()])), aug_presets('randaugment')]
    dls = ImageDataLoaders.from_df(df, path='/', fn_col='fname', label_col='label', valid_col='is_valid', item_tfms=tfms, bs=8)
    learn = cls_learner(dls, 'resnet18', pretrained=False, cbs=CutMixUp(generator=torch.Generator().manual_seed(0)))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    fn = tmp_path/'model.pkl'
    learn.export(fn)
    files = list(df.fname[:5])
    with learn.no_bar(): here = [learn.predict(f)[2].tolist() for f in files]
    code = textwrap.dedent(f"""
        import json
        from fastai.vision.all import load_learner
        learn = load_learner({str(fn)!r})
        names = [type(t).__name__ for t in learn.dls.valid.after_item.fs]
        assert 'AlbumentationsTransform' in names and 'TimmAugment' in names, names
        with learn.no_bar(): print(json.dumps([learn.predict(f)[2].tolist() for f in {files!r}]))
    """)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert torch.allclose(torch.tensor(here), torch.tensor(there), atol=1e-6)


def test_randaugment_at_full_magnitude_never_asks_pillow_for_0_bits():
    "timm's increasing Posterize keeps 0 bits at magnitude 10 (reached by m9-mstd0.5 draws); Pillow >= 11 raises on it"
    import random
    from PIL import Image
    t = TimmAugment('rand-m10-n3-inc1')  # magnitude exactly 10, 3 ops per image: Posterize is drawn often
    img = PILImage(Image.new('RGB', (16, 16), (200, 90, 30)))
    random.seed(0)
    outs = [t.encodes(img) for _ in range(60)]
    assert all(o.size == img.size and o.mode == 'RGB' for o in outs)
