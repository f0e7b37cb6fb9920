"Data: datasets (ELPV, digits), checks, augmentation, samplers"
from ..compat import old_name as _old_name
def __getattr__(name): return _old_name(__name__, name)  # 0.1's `fastcls.data` module names (now `fastcls.data.datasets`)
