"""CUDA and mixed-precision checks that CI (CPU only) cannot run. Asserts, then prints what it checked.

    python benchmarks/check_cuda.py
"""
import torch, timm
from fastai.vision.all import accuracy
from fastcls.learner import cls_learner
from fastcls.layers.attention import attentions, add_attention, blend_params
from fastcls.test_utils import synth_dls, pretrained_like

assert torch.cuda.is_available(), 'needs a GPU'
dev = torch.device('cuda')
print('device:', torch.cuda.get_device_name(), 'torch', torch.__version__)

# identity-preserving insertion on the GPU, fp32 and under autocast, for every attention
x = torch.randn(4, 3, 64, 64, device=dev)
for arch in ['resnet50', 'convnext_atto', 'efficientnet_b0']:
    for nm in sorted(set(attentions.names) - {'ca'}):
        m = pretrained_like(timm.create_model(arch, pretrained=False)).to(dev).eval()
        with torch.no_grad(): before = m(x)
        add_attention(m, nm); m.to(dev)
        with torch.no_grad(): after = m(x)
        assert (after - before).abs().max() < 1e-4, (arch, nm, (after - before).abs().max())
        for dt in (torch.float16, torch.bfloat16):
            with torch.no_grad(), torch.autocast('cuda', dtype=dt): out = m(x)
            assert torch.isfinite(out).all(), (arch, nm, dt)
print('insertion: identity on CUDA and finite under fp16/bf16 autocast for every attention')

# training on the GPU with fastai's mixed precision, attention trainable while frozen
dls = synth_dls(n=128, size=64, n_classes=4, bs=32, device=dev)
for prec in ('to_fp16', 'to_bf16'):
    learn = cls_learner(dls, 'resnet18', attn='cbam', pretrained=False, metrics=accuracy)
    getattr(learn, prec)()
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(4, 2e-3, freeze_epochs=1)
    assert next(learn.model.parameters()).is_cuda
    losses = [v[0] for v in learn.recorder.values]
    print(f'{prec}: train losses {[round(l, 3) for l in losses]}, final accuracy {learn.recorder.values[-1][2]:.3f}')
    assert losses[-1] < losses[0]
    gam = [g.item() for g in blend_params(learn.model)]
    assert any(g != 0 for g in gam)
print('training: fp16 and bf16 fine_tune on CUDA lower the loss; attention gammas moved')
