"""Hand-written: README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which these machines lack).
Run `python tools/make_readme.py`; `--check` exits 1 if README.md differs from what the notebook gives."""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def render() -> str:
    "The markdown cells of the index notebook, joined, with image paths made relative to the repository root"
    nb = json.loads((ROOT/'nbs'/'index.ipynb').read_text())
    mds = [''.join(c['source']).strip() for c in nb['cells'] if c['cell_type'] == 'markdown']
    return '\n\n'.join(mds).replace('](images/', '](nbs/images/') + '\n'

if __name__ == '__main__':
    text = render()
    if '--check' in sys.argv:
        ok = (ROOT/'README.md').read_text() == text
        print('README.md matches nbs/index.ipynb' if ok else 'README.md differs from nbs/index.ipynb: run python tools/make_readme.py')
        sys.exit(0 if ok else 1)
    (ROOT/'README.md').write_text(text)
