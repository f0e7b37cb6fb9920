"The `fastcls` command line: train, predict, experiments, and the run report"
from ..compat import old_name as _old_name
def __getattr__(name): return _old_name(__name__, name)  # 0.1's `fastcls.cli` module names (now `fastcls.cli.core`)
