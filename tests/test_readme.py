"The README: generated from nbs/index.ipynb, and its Python examples run exactly as pasted, one after the other, into a fresh file."
import os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
from make_readme import render

def python_blocks(text): return re.findall(r'```python\n(.*?)```', text, re.S)

def test_readme_is_the_index_notebook():
    assert (ROOT/'README.md').read_text() == render(), "README.md differs from nbs/index.ipynb: run python tools/make_readme.py"

def test_readme_example_runs_as_pasted(tmp_path):
    blocks = python_blocks((ROOT/'README.md').read_text())
    assert len(blocks) == 2, f"expected two Python examples in the README (the API, the snapshot store), found {len(blocks)}"
    (tmp_path/'example.py').write_text('\n'.join(blocks))
    env = dict(os.environ, MPLBACKEND='Agg', OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, 'example.py'], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ('evolution.gif', 'frames.png', 'gradcam.png', 'fullgrad.png', 'layers.png', 'store.gif', 'color_dim.png'):
        assert (tmp_path/f).stat().st_size > 1000, f
    assert re.search(r'torch\.Size\(\[\d+, 512, 2, 2\]\)', r.stdout), r.stdout[-500:]
    assert re.search(r'torch\.Size\(\[\d+, 64, 64\]\)', r.stdout), r.stdout[-500:]
