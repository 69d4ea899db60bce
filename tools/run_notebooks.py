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

def html_progress():
    "fastai's progress bars and training tables as HTML, as Jupyter shows them, not as text bars (before fastai is imported)"
    import fastprogress.fastprogress as fp
    fp.IN_NOTEBOOK = True
    fp.master_bar,fp.progress_bar = fp.NBMasterBar,fp.NBProgressBar

def _skip(cell) -> bool:
    "Cells `nbdev_test` would not run either: markdown, the export call, `#| eval: false`"
    if cell.cell_type != 'code': return True
    src = cell.source
    return 'nbdev_export' + '(' in src or bool(re.search(r'^#\|\s*eval:\s*false', src, re.M | re.I))

def _html(o) -> str: return ''.join(o.get('data', {}).get('text/html', ''))

def _progress(outs) -> list:
    "HTML progress outputs: bars dropped (each update is an output), a training table kept once (its last state), bars out of it"
    html = [_html(o) for o in outs]
    tables = [i for i,h in enumerate(html) if '<th>epoch</th>' in h]
    keep = []
    for i,(o,h) in enumerate(zip(outs, html)):
        if 'text/html' in o.get('data', {}) and not h.strip(): continue      # an emptied bar: shows as '<IPython...HTML object>'
        if not h or i in tables[-1:]: keep.append(o); continue
        if '<progress' in h or (h.strip().startswith('<style>') and 'progress' in h) or i in tables: continue
        keep.append(o)
    for o in keep:
        h = _html(o)
        if '<th>epoch</th>' in h:
            o['data'] = {'text/html': re.sub(r'<div>\s*<progress.*?</div>', '', h, flags=re.S), 'text/plain': ['(the training table)']}
    return keep

def _size(o) -> int: return len(str(o.get('data', o.get('text', ''))))

def run(fn:Path, max_kb:int) -> float:
    nb = read_nb(fn)
    t0 = time.time()
    sh = CaptureShell(fn, mpl_format='jpeg')   # overlays on photos: a fifth of PNG's bytes ('retina', the default, doubles the pixels too)
    with working_directory(fn.parent): sh.run_all(nb, exc_stop=True, preproc=_skip)
    for c in nb.cells:
        if c.cell_type != 'code': continue
        outs = []
        for o in _progress(c.get('outputs', [])):
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
    html_progress()
    fns = [ROOT/'nbs'/(n if n.endswith('.ipynb') else n + '.ipynb') for n in a.names] or sorted((ROOT/'nbs').glob('[0-9]*.ipynb'))
    for fn in fns:
        print(f'{fn.name}: {run(fn, a.max_kb):.0f} s', flush=True)
