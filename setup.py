"Classic nbdev setup.py: all metadata comes from settings.ini."
from configparser import ConfigParser
from packaging.version import Version
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']

licenses = {'apache2': 'Apache-2.0'}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
lic = licenses[cfg['license']]
min_python = cfg['min_python']
py_versions = [v for v in '3.10 3.11 3.12 3.13'.split() if Version(v) >= Version(min_python)]

requirements = cfg.get('requirements', '').split()
extras = {'dev': cfg.get('dev_requirements', '').split(), 'elpv': cfg.get('elpv_requirements', '').split(),
          'weights': cfg.get('weights_requirements', '').split(), 'onnx': cfg.get('onnx_requirements', '').split()}

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], description=cfg['description'],
    license=lic, author=cfg['author'], author_email=cfg['author_email'],
    keywords=cfg['keywords'].split(), url=cfg['git_url'],
    classifiers=['Development Status :: ' + statuses[int(cfg['status'])],
                 'Intended Audience :: ' + cfg['audience'].title(),
                 'Natural Language :: ' + cfg['language'].title()]
                + ['Programming Language :: Python :: ' + v for v in py_versions],
    packages=setuptools.find_packages(include=['fastcls', 'fastcls.*']),
    include_package_data=True, package_data={'fastcls': ['splits/*.csv']},
    install_requires=requirements, extras_require=extras,
    python_requires='>=' + min_python,
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f"{cfg['lib_name']}={cfg['lib_name']}._modidx:d"]},
)
