"Parity of the long-tail losses with transcriptions of the official code, registry and bad input"
import pickle
import numpy as np, pytest, torch, torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss
from fastai.losses import FocalLoss
from fastcls.losses.longtail import (losses, class_counts, check_counts, cb_weights, ldam_margins, SoftmaxFocalLoss, SigmoidFocalLoss,
                            ClassBalancedLoss, LDAMLoss, BalancedSoftmaxLoss, LogitAdjustedLoss, LogitAdjust, logit_adjust)
from fastcls.test_utils import synth_dls

torch.manual_seed(0)
Z, Y = torch.randn(16, 5, dtype=torch.float64).float() * 3, torch.randint(0, 5, (16,))
N = [500, 120, 40, 9, 3]

# ---- transcriptions of the official code (see algorithms.md section C) ----
def tf_cb_loss(labels, logits, samples_per_cls, no_of_classes, loss_type, beta, gamma):
    "richardaecn/class-balanced-loss cifar_main.py, in NumPy"
    effective_num = 1.0 - np.power(beta, samples_per_cls)
    weights = (1.0 - beta) / np.array(effective_num)
    weights = weights / np.sum(weights) * no_of_classes
    onehot = np.eye(no_of_classes)[labels]
    w = (weights[None] * onehot).sum(1, keepdims=True)
    if loss_type == 'softmax':
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return float((w[:, 0] * -(onehot * logp).sum(1)).sum() / len(labels))  # SUM_BY_NONZERO_WEIGHTS over B
    w = np.tile(w, [1, no_of_classes])
    bce = np.maximum(logits, 0) - logits * onehot + np.log1p(np.exp(-np.abs(logits)))
    if loss_type == 'sigmoid': return float((w * bce).sum() / onehot.sum())
    modulator = np.exp(-gamma * onehot * logits - gamma * np.log1p(np.exp(-1.0 * logits)))
    return float((w * modulator * bce).sum() / onehot.sum())

class OfficialLDAM(torch.nn.Module):
    "kaidic/LDAM-DRW losses.py LDAMLoss, ported to CPU"
    def __init__(self, cls_num_list, max_m=0.5, weight=None, s=30):
        super().__init__()
        m_list = 1.0 / np.sqrt(np.sqrt(cls_num_list))
        m_list = m_list * (max_m / np.max(m_list))
        self.m_list = torch.FloatTensor(m_list); self.s = s; self.weight = weight
    def forward(self, x, target):
        index = torch.zeros_like(x, dtype=torch.uint8)
        index.scatter_(1, target.data.view(-1, 1), 1)
        index_float = index.type(torch.FloatTensor)
        batch_m = torch.matmul(self.m_list[None, :], index_float.transpose(0, 1)).view((-1, 1))
        output = torch.where(index.bool(), x - batch_m, x)
        return F.cross_entropy(self.s * output, target, weight=self.weight)

def official_ldam_focal(input_values, gamma):
    "kaidic/LDAM-DRW losses.py focal_loss"
    p = torch.exp(-input_values)
    return ((1 - p) ** gamma * input_values).mean()

def official_balanced_softmax(labels, logits, sample_per_class, reduction='mean'):
    "jiawei-ren/BalancedMetaSoftmax-Classification loss/BalancedSoftmaxLoss.py"
    spc = sample_per_class.type_as(logits)
    spc = spc.unsqueeze(0).expand(logits.shape[0], -1)
    return F.cross_entropy(input=logits + spc.log(), target=labels, reduction=reduction)

# ---- parity ----
@pytest.mark.parametrize('gamma,alpha', [(2., .25), (0., .25), (1., -1), (.5, .75)])
def test_sigmoid_focal_torchvision(gamma, alpha):
    got = SigmoidFocalLoss(gamma, alpha)(Z, Y)
    torch.testing.assert_close(got, sigmoid_focal_loss(Z, F.one_hot(Y, 5).float(), alpha, gamma, reduction='mean'))

@pytest.mark.parametrize('gamma', [0., .5, 1., 2.])
def test_softmax_focal(gamma):
    torch.testing.assert_close(SoftmaxFocalLoss(gamma)(Z, Y), official_ldam_focal(F.cross_entropy(Z, Y, reduction='none'), gamma))
    torch.testing.assert_close(SoftmaxFocalLoss(gamma)(Z, Y), FocalLoss(gamma)(Z, Y))
    a = torch.rand(5)
    torch.testing.assert_close(SoftmaxFocalLoss(gamma, alpha=a, reduction='none')(Z, Y), a[Y] * SoftmaxFocalLoss(gamma, reduction='none')(Z, Y))

def test_softmax_focal_small_gamma_grad_finite():
    z = torch.tensor([[30., -30.]], requires_grad=True)
    SoftmaxFocalLoss(gamma=.5)(z, torch.tensor([0])).backward()
    assert torch.isfinite(z.grad).all()

def test_class_balanced_focal_extreme_logits():
    "log(1+exp(-z)) overflows for z < -88: the modulating factor must stay finite, loss and gradient too"
    z = torch.tensor([[-100., 2., 0.]], dtype=torch.float64, requires_grad=True)
    for y in (0, 1):
        loss = ClassBalancedLoss([5, 5, 5], loss_type='focal', gamma=1.)(z.float(), torch.tensor([y]))
        want = tf_cb_loss(np.array([y]), z.detach().numpy(), np.array([5., 5, 5]), 3, 'focal', 0.9999, 1.)
        assert abs(float(loss) - want) < 1e-4 * max(1, abs(want))
        g, = torch.autograd.grad(loss, z)
        assert torch.isfinite(g).all()

@pytest.mark.parametrize('loss_type', ['softmax', 'sigmoid', 'focal'])
@pytest.mark.parametrize('beta', [0.9, 0.999, 0.9999])
def test_class_balanced_official(loss_type, beta):
    got = ClassBalancedLoss(N, beta=beta, loss_type=loss_type, gamma=1.)(Z, Y)
    want = tf_cb_loss(Y.numpy(), Z.double().numpy(), np.array(N, float), 5, loss_type, beta, 1.)
    assert abs(float(got) - want) < 1e-4 * max(1, abs(want))

def test_cb_weights_cifar10_lt():
    n = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    want = torch.tensor([0.0506, 0.0769, 0.1211, 0.1950, 0.3188, 0.5246, 0.8683, 1.4426, 2.4092, 3.9927])
    torch.testing.assert_close(cb_weights(n), want, atol=2e-4, rtol=0)
    torch.testing.assert_close(cb_weights(n, beta=0.), torch.ones(10))  # beta=0: no re-weighting

@pytest.mark.parametrize('weighted', [False, True])
def test_ldam_official(weighted):
    z = F.normalize(torch.randn(16, 5), dim=1)  # cosine logits, as from NormedLinear
    w = cb_weights(N) if weighted else None
    torch.testing.assert_close(LDAMLoss(N, weight=w)(z, Y), OfficialLDAM(N, weight=w)(z, Y))
    torch.testing.assert_close(ldam_margins([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]),
                               torch.tensor([0.158, 0.180, 0.204, 0.232, 0.264, 0.300, 0.341, 0.387, 0.441, 0.5]), atol=1e-3, rtol=0)

@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_balanced_softmax_official(reduction):
    got = BalancedSoftmaxLoss(N, reduction=reduction)(Z, Y)
    torch.testing.assert_close(got, official_balanced_softmax(Y, Z, torch.tensor(N), reduction))
    torch.testing.assert_close(got, LogitAdjustedLoss(N, tau=1., reduction=reduction)(Z, Y))  # same loss when tau=1

@pytest.mark.parametrize('tau', [0.5, 1., 2.])
def test_logit_adjusted_official(tau):
    pi = torch.tensor(N, dtype=torch.float) / sum(N)
    want = F.cross_entropy(Z + torch.log(pi ** tau + 1e-12), Y)  # google-research logit_adjustment main.py (loss mode)
    torch.testing.assert_close(LogitAdjustedLoss(N, tau)(Z, Y), want)
    torch.testing.assert_close(LogitAdjust(N, tau)(Z), Z - torch.log(pi ** tau + 1e-12))  # post-hoc mode
    torch.testing.assert_close(logit_adjust(Z, N, tau), Z - torch.log(pi ** tau + 1e-12))

# ---- fastai interface ----
def test_fastai_interface_and_pickle():
    from fastai.losses import NoneReduce
    for lf in (SoftmaxFocalLoss(), SigmoidFocalLoss(), ClassBalancedLoss(N), LDAMLoss(N), BalancedSoftmaxLoss(N), LogitAdjustedLoss(N)):
        assert lf.y_int and lf.decodes(Z).shape == (16,)
        with NoneReduce(lf) as nr: assert nr(Z, Y).shape == (16,)  # what fastai's MixUp/CutMix rely on
        assert lf.reduction == 'mean'
        torch.testing.assert_close(pickle.loads(pickle.dumps(lf))(Z, Y), lf(Z, Y))

# ---- counts from DataLoaders, registry, bad input ----
def test_class_counts_elpv():
    from fastcls.data.datasets import elpv_dls, elpv_df
    dls = elpv_dls(size=32, bs=8)
    df = elpv_df(); want = df[~df.is_valid].label.value_counts()
    assert class_counts(dls).tolist() == [int(want[c]) for c in dls.vocab]
    assert class_counts(dls).sum() == len(dls.train_ds)

def test_registry_every_name():
    dls = synth_dls(n=48, n_classes=3, bs=8)
    for nm in losses.names:
        z = torch.randn(6, 3, requires_grad=True)
        l = losses[nm](dls)(z, torch.randint(0, 3, (6,)))
        assert l.ndim == 0 and torch.isfinite(l); l.backward()
        assert z.grad is not None
    assert torch.equal(losses['ldam'](dls).counts, class_counts(dls).float())
    assert torch.equal(losses['bsm'](dls, counts=[1, 2, 3]).counts, torch.tensor([1., 2, 3]))

def test_bad_input():
    dls = synth_dls(n=48, n_classes=3, bs=8)
    with pytest.raises(ValueError, match="one count per class"): losses['cb'](dls, counts=[1, 2])
    with pytest.raises(ValueError, match=r"c1 have no training samples"): losses['ldam'](dls, counts=[4, 0, 3])
    with pytest.raises(ValueError, match="Valid choices"): losses['cb_softmx']
    with pytest.raises(ValueError, match="loss_type must be"): ClassBalancedLoss(N, loss_type='hinge')
    with pytest.raises(ValueError, match="beta must be"): cb_weights(N, beta=1.5)
    with pytest.raises(ValueError, match="have no training samples"): BalancedSoftmaxLoss([3, 0])
