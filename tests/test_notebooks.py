"The notebooks render as documentation: real markdown, a title and a summary nbdev can read"
import json, re
from pathlib import Path
import pytest

nbs = sorted((Path(__file__).parents[1]/'nbs').glob('*.ipynb'))

def comment_block(src:str) -> bool:
    "A markdown cell written as a script's comments: every line `# ...` (renders as a heading per line)"
    lines = [l for l in src.splitlines() if l.strip()]
    return bool(lines) and all(l.rstrip() == '#' or l.startswith('# ') for l in lines) and (len(lines) > 1 or not re.match(r'# [A-Z`]', lines[0]))

def test_comment_block_detector():
    assert comment_block("# # Title\n#\n# > summary") and comment_block("# Some prose.\n# More prose.")
    assert not comment_block("# Title\n\n> summary\n\nProse.") and not comment_block("## Design")

@pytest.mark.parametrize('nb', nbs, ids=lambda p: p.stem)
def test_markdown_is_markdown(nb):
    cells = json.loads(nb.read_text())['cells']
    bad = [''.join(c['source'])[:60] for c in cells if c['cell_type'] == 'markdown' and comment_block(''.join(c['source']))]
    assert not bad, f"{nb.name}: markdown cells written as '# ' comment blocks: {bad}"
    first = ''.join(cells[0]['source'])
    assert cells[0]['cell_type'] == 'markdown' and re.match(r'# \S', first) and '\n> ' in first, f"{nb.name} starts without '# Title' and '> summary'"

def test_modules_carry_the_notebook_summary():
    "nbdev turns each notebook's `> summary` into its module's docstring: the docs and `help()` show it"
    import importlib
    for nb in nbs:
        src = '\n'.join(''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code')
        m = re.search(r'#\| default_exp (\S+)', src)
        if m: assert importlib.import_module(f'fastcls.{m.group(1)}').__doc__, nb.name

def test_index_matches_readme():
    "nbs/index.ipynb (the docs home) says what README.md says"
    root = Path(__file__).parents[1]
    cells = json.loads((root/'nbs'/'index.ipynb').read_text())['cells']
    assert all(c['cell_type'] == 'markdown' for c in cells)
    norm = lambda s: re.sub(r'\s+', ' ', s).strip()
    assert norm('\n'.join(''.join(c['source']) for c in cells)) == norm((root/'README.md').read_text())

def test_tutorial_cells_keep_their_results():
    "The ELPV tutorial cell of 40_interpret keeps its training table and its Grad-CAM grid; no other cell keeps outputs"
    cells = [c for c in json.loads((nbs[0].parent/'40_interpret.ipynb').read_text())['cells'] if c['cell_type'] == 'code']
    kept = [c for c in cells if c.get('outputs')]
    assert len(kept) == 1 and 'show_gradcam' in ''.join(kept[0]['source'])
    text = ''.join(t for o in kept[0]['outputs'] for t in o.get('text', []))
    assert re.search(r'epoch\s+train_loss\s+valid_loss\s+accuracy', text) and re.search(r'^1\s+\d\.\d+', text, re.M)
    imgs = [o['data'] for o in kept[0]['outputs'] if 'image/jpeg' in o.get('data', {}) or 'image/png' in o.get('data', {})]
    assert len(imgs) == 1 and len(json.dumps(imgs)) < 150_000  # one small grid
    assert not any('█' in t for o in kept[0]['outputs'] for t in o.get('text', []))  # no progress-bar debris
