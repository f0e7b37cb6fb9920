"fastcls: image classification on fastai and timm."
from importlib.metadata import version as _version, PackageNotFoundError as _NotFound
try: __version__ = _version('fastcls')
except _NotFound: __version__ = 'unknown'
from . import compat as _compat
_compat.install()  # 0.1's flat module paths (`fastcls.margin`, ...), so its exports still load
