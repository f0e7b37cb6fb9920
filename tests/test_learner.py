"cls_learner: training, freezing, discriminative LRs, export in a fresh process, bad input."
import json, subprocess, sys, textwrap
import pytest, torch
from fastai.vision.all import vision_learner, load_learner, PILImage, set_seed
from fastcls.learner import cls_learner
from fastcls.layers.attention import attention_params
from fastcls.test_utils import synth_dls, synth_df

@pytest.fixture(scope='module')
def dls():
    set_seed(0)  # the DataLoaders' shuffle RNG is drawn from `random` when they are built
    return synth_dls(n=64, size=32, n_classes=2, bs=16)

def test_fine_tune_lowers_loss(dls):
    torch.manual_seed(0)
    learn = cls_learner(dls, 'resnet18', attn='eca', pretrained=False)
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(4, 2e-3, freeze_epochs=1)
    train_losses = [v[0] for v in learn.recorder.values]  # per-epoch training loss, both phases
    assert train_losses[-1] < 0.7 * train_losses[0]

@pytest.mark.parametrize('arch', ['convnext_atto', 'mobilenetv2_035'])
def test_attention_trains_while_body_frozen(dls, arch):
    learn = cls_learner(dls, arch, attn='se', pretrained=False)
    learn.freeze()
    attn = attention_params(learn.model)
    assert attn and all(p.requires_grad for p in attn)
    ids = {id(p) for p in attn}
    frozen = [p for p in learn.model[0].parameters() if id(p) not in ids and p.ndim == 4]
    assert frozen and not any(p.requires_grad for p in frozen)
    w0 = [p.detach().clone() for p in frozen]
    a0 = [p.detach().clone() for p in attn]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert all(torch.equal(p, q) for p,q in zip(frozen, w0))
    assert any(not torch.equal(p, q) for p,q in zip(attn, a0))

def test_param_groups_and_discriminative_lrs(dls):
    learn = cls_learner(dls, 'resnet18', attn='se', pretrained=False)
    learn.create_opt()
    assert len(learn.opt.param_lists) == 3
    learn.opt.set_hyper('lr', slice(1e-5, 1e-3))
    lrs = [h['lr'] for h in learn.opt.hypers]
    assert lrs[0] < lrs[1] < lrs[2]
    assert {id(p) for p in learn.opt.param_lists[1]} == {id(p) for p in attention_params(learn.model)}  # group 1: attention

def test_same_net_as_vision_learner(dls):
    "With fastai's concat pooling, cls_learner builds the very model vision_learner does"
    a = cls_learner(dls, 'resnet18', pool='catavgmax', pretrained=False)
    b = vision_learner(dls, 'resnet18', pretrained=False)
    assert [tuple(p.shape) for p in a.model.parameters()] == [tuple(p.shape) for p in b.model.parameters()]
    assert len(a.splitter(a.model)) == len(b.splitter(b.model)) == 2

def test_n_out_from_dls(dls):
    learn = cls_learner(dls, 'resnet18', pretrained=False)
    assert learn.model(torch.randn(2, 3, 32, 32)).shape == (2, dls.c)

def test_export_round_trip_in_fresh_process(dls, tmp_path, predict_in_fresh_process):
    torch.manual_seed(0)
    learn = cls_learner(dls, 'resnet18', attn='cbam', pretrained=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    fn = tmp_path/'model.pkl'
    learn.export(fn)
    files = list(synth_df(n=64, size=32, n_classes=2).fname[:4])
    with learn.no_bar(): here = [learn.predict(PILImage.create(f))[2].tolist() for f in files]
    there = predict_in_fresh_process(fn, files)
    assert torch.allclose(torch.tensor(here), torch.tensor(there), atol=1e-6)

@pytest.mark.parametrize('kwargs,msg', [
    (dict(arch='resnet18', attn='squeeze_excite'), 'Valid choices'),
    (dict(arch='resnet18', pool='gap'), 'Valid choices: avg'),
    (dict(arch='resnet18', head='mlp'), r"Unknown head 'mlp'\. Valid choices: .*fastai, linear"),
    (dict(arch='resnet_18'), 'Closest timm names: resnet18'),
    (dict(arch='test_vit', attn='se'), 'Supported families'),
    (dict(arch='test_vit', pool='gem'), 'not a spatial map'),
    (dict(arch='resnet18', n_out=0), 'positive number'),
])
def test_bad_input(dls, kwargs, msg):
    with pytest.raises(ValueError, match=msg): cls_learner(dls, pretrained=False, **kwargs)

def test_vit_trains_with_timm_pooling(dls):
    "A ViT in cls_learner: timm's own pooling under the fastai head, rebuilt by timm for the data's size"
    learn = cls_learner(dls, 'test_vit3', pretrained=False)  # built for 160 px
    assert type(learn.model[1][0]).__name__ == 'TimmPool' and tuple(learn.model_config.model_kwargs['img_size']) == tuple(dls.one_batch()[0].shape[-2:])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert learn.recorder.values[-1][0] == learn.recorder.values[-1][0]

def test_fixed_size_model_names_the_size_it_needs(dls):
    with pytest.raises(ValueError, match='resize the data to 224x224'): cls_learner(dls, 'efficientformer_l1', pretrained=False)

def test_patch_size_model_names_the_nearest_multiple():
    "A model whose patch embedding needs a multiple of its patch size (DeepSeek's ViT, 14 px patches) names the nearest one, which then trains"
    small = dict(depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(ValueError, match=r'resize the data to 70x70, a multiple of its patch size .*or 546x546'):
        cls_learner(synth_dls(n=8, size=64, n_classes=2, bs=4), 'deepseek_vit_412m', pretrained=False, model_kwargs=small)
    learn = cls_learner(synth_dls(n=8, size=70, n_classes=2, bs=4), 'deepseek_vit_412m', pretrained=False, model_kwargs=small)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert learn.model_config.model_kwargs['img_size'] == (70, 70) and learn.recorder.values[-1][0] == learn.recorder.values[-1][0]
