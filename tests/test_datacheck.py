"Data checks: every fault is reported with its file or label; skip mode drops exactly the bad rows."
import warnings
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image
from fastai.vision.all import ImageDataLoaders
from fastcls.data.check import check_image, check_images, check_image_df, check_image_folder, check_dls

RGB = (np.random.default_rng(0).random((32, 32, 3))*255).astype(np.uint8)

def _faults(d):
    "One file per fault: name -> (writer, words the message must contain)"
    return {
        'rgba':      (lambda f: Image.fromarray(RGB).convert('RGBA').save(f), 'alpha channel'),
        'la':        (lambda f: Image.fromarray(RGB[..., 0]).convert('LA').save(f), 'alpha channel'),
        'palette_t': (lambda f: Image.fromarray(RGB).convert('P').save(f, transparency=0), 'alpha channel'),
        'deep16':    (lambda f: Image.fromarray(RGB[..., 0].astype(np.uint16)*257).save(f), 'I;16 (16-bit)'),
        'tiny':      (lambda f: Image.fromarray(RGB[:5, :40]).save(f), '32x5 pixels, smaller than min_size=16'),
        'truncated': (lambda f: f.write_bytes(_png_bytes(d)[:len(_png_bytes(d))//2]), 'truncated'),
        'trunc_jpg': (lambda f: f.write_bytes(_jpg_bytes(d)[:len(_jpg_bytes(d))//2]), 'truncated'),  # fails in the header
        'garbage':   (lambda f: f.write_bytes(b'\x89PNG not really'), 'cannot identify'.replace('cannot', 'PIL can')),
        'empty':     (lambda f: f.write_bytes(b''), 'PIL can identify'),
    }

def _png_bytes(d):
    f = d/'_src.png'
    if not f.exists(): Image.fromarray(RGB).save(f)
    return f.read_bytes()

def _jpg_bytes(d):
    f = d/'_src.jpg'
    if not f.exists(): Image.fromarray(RGB).save(f, quality=95)
    return f.read_bytes()

@pytest.fixture
def folder(tmp_path):
    for split in ('train', 'valid'):
        for lbl in ('a', 'b'):
            (tmp_path/split/lbl).mkdir(parents=True)
            for i in range(2): Image.fromarray(RGB).save(tmp_path/split/lbl/f'{i}.png')
    return tmp_path

@pytest.mark.parametrize('name', list(_faults(Path('.'))))
def test_each_fault_named(tmp_path, name):
    write, words = _faults(tmp_path)[name]
    f = tmp_path/f'{name}.png'; write(f)
    problem, _ = check_image(f)
    assert problem and words in problem, problem
    ok = tmp_path/'ok.png'; Image.fromarray(RGB).save(ok)
    with pytest.raises(ValueError) as e: check_images([ok, f])
    assert f'{f}: {problem}' in str(e.value) and '1 of 2 images' in str(e.value) and "on_error='skip'" in str(e.value)
    with pytest.warns(UserWarning, match=name):
        assert list(check_images([ok, f], on_error='skip')) == [True, False]

def test_good_modes_pass(tmp_path):
    for mode in ('RGB', 'L', 'P', 'CMYK'):
        f = tmp_path/f'{mode}.{"jpg" if mode == "CMYK" else "png"}'
        Image.fromarray(RGB).convert(mode).save(f)
        assert check_image(f) == (None, mode)

def test_missing_file_and_label(tmp_path):
    ok = tmp_path/'ok.png'; Image.fromarray(RGB).save(ok)
    with pytest.raises(ValueError, match='gone.png: file not found'): check_images([ok, tmp_path/'gone.png'])
    with pytest.raises(ValueError, match='ok.png: missing label'): check_images([ok], [None])

def test_valid_label_missing_from_train(folder):
    (folder/'valid'/'c').mkdir(); Image.fromarray(RGB).save(folder/'valid'/'c'/'0.png')
    with pytest.raises(ValueError, match=r"valid/c/0.png: label 'c' is in the validation set but not in training"):
        check_image_folder(folder)
    with pytest.warns(UserWarning, match="label 'c'"): kept = check_image_folder(folder, on_error='skip')
    assert len(kept) == 8 and not any('/c/' in str(f) for f in kept)

def test_grayscale_mixed_warns(folder):
    Image.fromarray(RGB[..., 0]).save(folder/'train'/'a'/'gray.png')
    with pytest.warns(UserWarning, match='1 grayscale'): assert len(check_image_folder(folder)) == 9

def test_dataframe_skip_drops_exactly_bad_rows(tmp_path):
    for i in range(4): Image.fromarray(RGB).save(tmp_path/f'{i}.png')
    Image.fromarray(RGB).convert('RGBA').save(tmp_path/'4.png')
    df = pd.DataFrame({'f': [f'{i}.png' for i in range(5)], 'y': list('ababa'), 'v': [0, 0, 1, 1, 0]})
    with pytest.warns(UserWarning): out = check_image_df(df, 'f', 'y', 'v', path=tmp_path, on_error='skip')
    assert list(out.index) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="column 'fname' not in the DataFrame; columns: f, y, v"): check_image_df(df, path=tmp_path)
    with pytest.raises(ValueError, match="valid choices: 'raise', 'skip'"): check_image_df(df, 'f', 'y', 'v', path=tmp_path, on_error='warn')

def test_check_dls(tmp_path):
    for i in range(6): Image.fromarray(RGB).save(tmp_path/f'{i}.png')
    (tmp_path/'5.png').write_bytes((tmp_path/'5.png').read_bytes()[:200])
    df = pd.DataFrame({'fname': [f'{i}.png' for i in range(6)], 'label': list('ababca'), 'is_valid': [0, 0, 0, 1, 1, 0]})
    dls = ImageDataLoaders.from_df(df, path=tmp_path, valid_col='is_valid', bs=2)  # builds fine: the faults are latent
    with pytest.raises(ValueError) as e: check_dls(dls)
    msg = str(e.value)
    assert '2 of 6 images' in msg and "4.png: label 'c' is in the validation set" in msg and '5.png: corrupt or truncated' in msg
