"Retrieval: parity with PML's AccuracyCalculator, Recall@K by brute force, get_embeddings, metrics leave no hook, bad input."
import pytest, torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from fastai.metrics import accuracy
from fastcls.learner import cls_learner
from fastcls.metrics.retrieval import recall_at_k, precision_at_1, map_at_r, retrieval_scores, retrieval_metrics, RetrievalMetric
from fastcls.test_utils import synth_dls

@pytest.fixture(scope='module')
def dls(): return synth_dls(n=64, size=32, n_classes=3, bs=16)

def _data(seed, n=90, c=7, d=12, singleton=True):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    if singleton: y[0] = c  # a class seen once: left out as a query (PML's rule)
    return torch.randn(n, d, generator=g) + 1.2*F.one_hot(y, d).float(), y

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_parity_with_pml_accuracy_calculator(seed):
    e, y = _data(seed)
    calc = AccuracyCalculator(include=('precision_at_1', 'mean_average_precision_at_r'), knn_func=CustomKNN(CosineSimilarity()))
    ref = calc.get_accuracy(e, y, e, y, ref_includes_query=True)
    assert abs(precision_at_1(e, y) - ref['precision_at_1']) < 1e-6
    assert abs(map_at_r(e, y) - ref['mean_average_precision_at_r']) < 1e-6
    # PML's default distance (euclidean on normalised embeddings; its default faiss kNN is not installed) ranks the same way
    ref2 = AccuracyCalculator(include=('precision_at_1', 'mean_average_precision_at_r'), knn_func=CustomKNN(LpDistance(normalize_embeddings=True))
                              ).get_accuracy(e, y, e, y, ref_includes_query=True)
    assert abs(map_at_r(e, y) - ref2['mean_average_precision_at_r']) < 1e-5

@pytest.mark.parametrize('k', [1, 2, 5, 20])
def test_recall_at_k_brute_force(k):
    e, y = _data(3)
    s = F.normalize(e) @ F.normalize(e).T
    keep = [i for i in range(len(y)) if (y == y[i]).sum() > 1]
    hits = [bool((y[[j for j in s[i].argsort(descending=True).tolist() if j != i][:k]] == y[i]).any()) for i in keep]
    assert abs(recall_at_k(e, y, k) - sum(hits)/len(keep)) < 1e-6

def test_perfect_and_scores_dict():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    e = F.one_hot(y, 3).float() + 0.01*torch.randn(7, 3)
    s = retrieval_scores(e, y, ks=(1, 3))
    assert s == pytest.approx({'precision_at_1': 1., 'recall_at_1': 1., 'recall_at_3': 1., 'map_at_r': 1.})

def test_bad_input():
    e, y = _data(0)
    with pytest.raises(ValueError, match='k must be >= 1'): recall_at_k(e, y, 0)
    with pytest.raises(ValueError, match='Valid choices'): RetrievalMetric('recall@5')

def test_metrics_match_get_embeddings_and_leave_no_hook(dls):
    torch.manual_seed(0)
    learn = cls_learner(dls, 'resnet18', head='cosface', embed_dim=16, pretrained=False, metrics=[accuracy, *retrieval_metrics(ks=(3,))])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    vals = list(learn.recorder.values[-1])
    assert not any(m._forward_hooks for m in learn.model.modules())
    e, y = learn.get_embeddings()
    assert e.shape == (len(dls.valid_ds), 16) and torch.equal(y, torch.tensor([int(t) for _, t in dls.valid_ds]))
    assert vals[-3] == pytest.approx(precision_at_1(e, y), abs=1e-5)
    assert vals[-2] == pytest.approx(recall_at_k(e, y, 3), abs=1e-5)
    assert vals[-1] == pytest.approx(map_at_r(e, y), abs=1e-5)
    assert not any(m._forward_hooks for m in learn.model.modules())
    en, _ = learn.get_embeddings(normalize=True)
    assert torch.allclose(en.norm(dim=1), torch.ones(len(en)), atol=1e-5)

def test_get_embeddings_linear_head_and_neighbors(dls):
    import matplotlib; matplotlib.use('Agg')
    learn = cls_learner(dls, 'resnet18', pretrained=False)
    e, y = learn.get_embeddings()
    assert e.shape == (len(dls.valid_ds), learn.model[1][-1][-1].in_features)
    nb = learn.show_neighbors(1, k=4, embs=(e, y))
    s = F.normalize(e) @ F.normalize(e)[1]; s[1] = -2
    assert nb.tolist() == s.topk(4).indices.tolist()

def test_one_embedding_pass_and_one_similarity_matrix_per_validation(dls, monkeypatch):
    "The metrics of `retrieval_metrics` share the validation forward and one N×N matrix (only the very first validation re-runs a batch)"
    import fastcls.metrics.retrieval as R
    learn = cls_learner(dls, 'resnet18', head='arcface', embed_dim=16, pretrained=False, metrics=retrieval_metrics(ks=(1, 3)))
    fwd, mats, orig = [0], [0], R._ranked_matches
    def counted(*a, **k): mats[0] += 1; return orig(*a, **k)
    monkeypatch.setattr(R, '_ranked_matches', counted)
    learn.model.register_forward_pre_hook(lambda m, i: fwd.__setitem__(0, fwd[0] + 1))
    n = len(learn.dls.valid)
    with learn.no_bar(), learn.no_logging():
        learn.validate()
        assert (fwd[0], mats[0]) == (n + 1, 1)  # the store meets the model at the first batch of the first validation
        fwd[0] = mats[0] = 0
        vals = list(learn.validate()[1:])
        assert (fwd[0], mats[0]) == (n, 1)
    e, y = learn.get_embeddings()
    want = retrieval_scores(e, y, ks=(1, 3))
    assert vals == pytest.approx([want['precision_at_1'], want['recall_at_1'], want['recall_at_3'], want['map_at_r']], abs=1e-5)
    assert not any(m._forward_hooks for m in learn.model.modules())

def test_retrieval_metrics_survive_export(dls, tmp_path):
    from fastai.learner import load_learner
    learn = cls_learner(dls, 'resnet18', head='cosface', embed_dim=16, pretrained=False, metrics=retrieval_metrics(ks=(2,)))
    with learn.no_bar(), learn.no_logging(): v = list(learn.validate()[1:])
    learn.export(tmp_path/'export.pkl')
    back = load_learner(tmp_path/'export.pkl'); back.dls = learn.dls
    with back.no_bar(), back.no_logging(): assert list(back.validate()[1:]) == pytest.approx(v, abs=1e-5)
