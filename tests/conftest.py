import os, tempfile, pytest

@pytest.fixture(scope='session', autouse=True)
def _quiet_fastai():
    os.environ.setdefault('FASTCLS_HOME', os.path.join(tempfile.gettempdir(), 'fastcls-test-home'))
