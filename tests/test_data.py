"The published ELPV split: complete, stratified, and a clear error when an image has no split"
import pandas as pd, pytest
import fastcls.data.datasets as data

def test_elpv_split_is_complete_and_stratified():
    df = data.elpv_df()
    assert len(df) == 2624 and df.is_valid.dtype == bool
    frac = df.groupby('label').is_valid.mean()
    assert ((frac - 0.25).abs() < 0.02).all(), frac

def test_image_missing_from_split_is_an_error(tmp_path, monkeypatch):
    split = pd.read_csv(data._split_dir/'elpv.csv')
    split.iloc[1:].to_csv(tmp_path/'elpv.csv', index=False)  # drop one image from the split
    monkeypatch.setattr(data, '_split_dir', tmp_path)
    with pytest.raises(ValueError, match=r"1 ELPV images are not in the published split"): data.elpv_df()
