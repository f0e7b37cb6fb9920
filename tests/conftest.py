import os, tempfile, pytest

@pytest.fixture(scope='session', autouse=True)
def _quiet_fastai():
    os.environ.setdefault('FASTCLS_HOME', os.path.join(tempfile.gettempdir(), 'fastcls-test-home'))

import json, subprocess, sys, textwrap

@pytest.fixture
def predict_in_fresh_process():
    "`f(fn, files, check='')`: `load_learner(fn)` in a new Python process, run `check` on `learn`, return its probabilities on `files`"
    def _f(fn, files, check=''):
        code = "\n".join([
            "import json", "from fastai.vision.all import load_learner, PILImage",
            f"learn = load_learner({str(fn)!r})", textwrap.dedent(check),
            f"with learn.no_bar(): print(json.dumps([learn.predict(PILImage.create(f))[2].tolist() for f in {[str(f) for f in files]!r}]))"])
        out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    return _f
