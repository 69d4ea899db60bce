"""Hand-written: run notebooks (slow cells included) and keep their outputs, so the figures show on a code host and
in the docs. `python tools/run_notebooks.py [NAME ...]` (default: every notebook in nbs/), then `nbdev_clean`.
Outputs over `--max-kb` (HTML animations mostly) are dropped with a note, stderr (warnings, progress bars) dropped; the notebooks are the source of the library,
so `nbdev_export` must still give the same code afterwards (it does: outputs are not exported)."""
import argparse, os, re, sys, time
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory

ROOT = Path(__file__).resolve().parents[1]

def _skip(cell) -> bool:
    "Cells `nbdev_test` would not run either: markdown, the export call, `#| eval: false`"
    if cell.cell_type != 'code': return True
    src = cell.source
    return 'nbdev_export' + '(' in src or bool(re.search(r'^#\|\s*eval:\s*false', src, re.M | re.I))

def _size(o) -> int: return len(str(o.get('data', o.get('text', ''))))

def run(fn:Path, max_kb:int) -> float:
    nb = read_nb(fn)
    t0 = time.time()
    sh = CaptureShell(fn)
    with working_directory(fn.parent): sh.run_all(nb, exc_stop=True, preproc=_skip)
    for c in nb.cells:
        if c.cell_type != 'code': continue
        outs = []
        for o in c.get('outputs', []):
            if o.get('output_type') == 'stream' and o.get('name') == 'stderr': continue     # warnings and progress: noise
            if _size(o) > max_kb*1024:
                outs.append(dict(output_type='stream', name='stdout',
                                 text=[f'(an output of {_size(o)//1024} kB is left out of the saved notebook: run the cell to see it)\n']))
            else: outs.append(o)
        c['outputs'] = outs
    write_nb(nb, fn)
    return time.time() - t0

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('names', nargs='*', help='notebook names (e.g. 04_methods); default: all')
    p.add_argument('--max-kb', type=int, default=400, help='drop single outputs larger than this (default: 400 kB)')
    a = p.parse_args()
    os.environ.setdefault('MPLBACKEND', 'Agg')
    fns = [ROOT/'nbs'/(n if n.endswith('.ipynb') else n + '.ipynb') for n in a.names] or sorted((ROOT/'nbs').glob('[0-9]*.ipynb'))
    for fn in fns:
        print(f'{fn.name}: {run(fn, a.max_kb):.0f} s', flush=True)
