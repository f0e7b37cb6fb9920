"The package as users import it: star imports beside fastai, and the nbdev layout."
import configparser, subprocess, sys, tomllib
from pathlib import Path

root = Path(__file__).parents[1]

def test_star_import_does_not_shadow_fastai():
    code = ("from fastai.vision.all import *\nbefore = dict(globals())\nfrom fastcls.all import *\n"
            "clash = [k for k,v in before.items() if not k.startswith('_') and globals()[k] is not v]\n"
            "print(clash); assert not clash, clash\nassert callable(cls_learner)")
    subprocess.run([sys.executable, '-c', code], check=True)

def test_all_exports_every_public_name():
    import importlib, pkgutil, fastcls, fastcls.all as a
    assert {'cls_learner', 'add_attention', 'attentions', 'pools', 'heads'} <= set(a.__all__)
    not_api = {'all', 'cli', 'compat', 'test_utils'}  # the command line, 0.1's import paths, test helpers
    mods = [m.name[len('fastcls.'):] for m in pkgutil.walk_packages(fastcls.__path__, 'fastcls.')
            if not m.ispkg and not m.name.split('.')[-1].startswith('_') and m.name.split('.')[1] not in not_api]
    assert len(mods) >= 20 and 'layers.heads' in mods
    for m in mods:  # every library module found on disk, not the list all.py was built from
        names = importlib.import_module(f'fastcls.{m}').__all__
        assert set(names) <= set(a.__all__), (m, set(names) - set(a.__all__))
        assert all(hasattr(a, n) for n in names), m

def test_pyproject_holds_only_build_and_nbdev():
    cfg = tomllib.loads((root/'pyproject.toml').read_text())
    assert set(cfg) == {'build-system', 'tool'} and set(cfg['tool']) == {'nbdev'}
    assert cfg['tool']['nbdev']['update_pyproject'] is False

def test_settings_ini_is_the_metadata_source():
    ini = configparser.ConfigParser(delimiters=['=']); ini.read(root/'settings.ini')
    d = ini['DEFAULT']
    for k in ('lib_name', 'version', 'description', 'requirements', 'dev_requirements'): assert d.get(k)
    reqs = d['requirements'].split()
    assert any(r.startswith('torch') for r in reqs) and any(r.startswith('timm') for r in reqs)
    from importlib.metadata import version
    assert version('fastcls') == d['version']

def test_all_exports_registries_not_same_named_modules():
    "`losses` and `samplers` are registries in `fastcls.all`, not the modules of the same name"
    ns = {}
    exec('from fastcls.all import *', ns)
    from fastcls.core import Registry
    assert isinstance(ns['losses'], Registry) and isinstance(ns['samplers'], Registry)
    assert 'pk' in ns['samplers'].names and 'arcface' in ns['heads'].names and 'gem' in ns['pools'].names

import pytest
@pytest.mark.parametrize('module,registry,names', [
    ('fastcls.layers.heads', 'heads', {'fastai', 'linear', 'arcface', 'bnneck', 'normed_linear'}),
    ('fastcls.layers.pooling', 'pools', {'avg', 'catavgmax', 'gem', 'bilinear', 'bap'}),
    ('fastcls.data.samplers', 'samplers', {'instance', 'sqrt', 'progressive', 'pk'}),
    ('fastcls.layers.attention', 'attentions', {'se', 'cbam', 'nl'}),
    ('fastcls.losses.longtail', 'losses', {'ce', 'focal', 'ldam', 'logit_adjusted'})])
def test_registry_complete_on_import(module, registry, names):
    "The module that owns a registry gives all of it, imported alone in a fresh interpreter"
    code = f"import {module} as m; print(' '.join(m.{registry}.names))"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()
    assert names <= set(out), names - set(out)

def test_flat_module_paths_of_0_1_still_import():
    code = ("from fastcls.margin import ArcFaceHead\nfrom fastcls.losses import LDAMLoss, NormedLinear\n"
            "from fastcls.samplers import samplers\nfrom fastcls.metric_losses import pk_dls\nimport fastcls.layers.heads as h\n"
            "assert ArcFaceHead is h.ArcFaceHead and NormedLinear is h.NormedLinear and 'pk' in samplers.names")
    subprocess.run([sys.executable, '-c', code], check=True)
