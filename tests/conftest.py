import os, tempfile, pytest

_worker = os.environ.get('PYTEST_XDIST_WORKER')  # `make test` runs two pytest-xdist workers on the 2 cores
if _worker:
    import torch
    torch.set_num_threads(1)  # one intra-op thread each: two workers do not fight over the cores

@pytest.fixture(scope='session', autouse=True)
def _quiet_fastai():
    os.environ.setdefault('FASTCLS_HOME', os.path.join(tempfile.gettempdir(), f"fastcls-test-home-{_worker or 'main'}"))

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

import os, signal
from pathlib import Path

def run_training_script(script, *args, kill_on=None):
    "Run `script` (a training script in tests/) to the end, or SIGKILL it when it prints the line `kill_on`"
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1])}
    cmd = [sys.executable, str(script), *map(str, args)]
    if kill_on is None:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in p.stdout:
            if line.strip() == kill_on: break
        else: pytest.fail(f'training ended without printing {kill_on}')
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        if p.poll() is None: p.kill()

@pytest.fixture(scope='module')
def one_thread():
    "One intra-op thread: on a shared 2-core machine two make every convolution many times slower"
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
