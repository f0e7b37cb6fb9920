"Losses: long-tail (focal, class-balanced, LDAM, balanced softmax, logit-adjusted) and metric (center, triplet, PML)"
from ..compat import old_name as _old_name
def __getattr__(name): return _old_name(__name__, name)  # 0.1's `fastcls.losses` module names (now `fastcls.losses.longtail`)
