"""Hand-written: `nbdev_test`, with the slowest notebooks started first.

`nbdev_test` hands its workers the notebooks in name order, so the slowest (11_evaluate, the tutorial) start last and
one worker runs on alone at the end. This runs the same `nbdev.test.test_nb` on the same notebooks with the same flags
(`tst_flags` of settings.ini skipped unless named in `--flags`), but hands out the notebooks named in `--first` before
the others: with two workers they finish together. Prints what `nbdev_test --timing` prints; exits 1 if a notebook fails.

    python tools/test_notebooks.py --flags slow --n_workers 2 --first 11_evaluate tutorial 04_methods
"""
import argparse, sys, time
from fastcore.parallel import parallel
from fastcore.xtras import working_directory
from nbdev.config import get_config
from nbdev.doclinks import nbglob
from nbdev.test import test_nb, _keep_file

def order(files, first) -> list:
    "`files` sorted by name, those whose stem is in `first` moved to the front in `first`'s order"
    rank = {s: i for i,s in enumerate(first)}
    if missing := [s for s in first if s not in {f.stem for f in files}]:
        raise SystemExit(f"--first names notebooks that do not exist: {missing} (give stems, e.g. 11_evaluate)")
    return sorted(files, key=lambda f: (rank.get(f.stem, len(first)), f.name))

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--flags', default='', help='space separated flags to run that are normally skipped (as nbdev_test)')
    p.add_argument('--n_workers', type=int, default=2)
    p.add_argument('--first', nargs='*', default=[], help='notebook stems to start before the others, slowest first')
    a = p.parse_args()
    cfg = get_config()
    files = order([f.absolute() for f in nbglob(as_path=True) if _keep_file(f, '.notest')], a.first)
    t0 = time.time()
    with working_directory(cfg.nbs_path):
        results = parallel(test_nb, files, skip_flags=cfg.tst_flags.split(), force_flags=a.flags.split(),
                           n_workers=a.n_workers, basepath=cfg.config_path, pause=0.01)
    passed,times = zip(*results)
    for i in sorted(range(len(files)), key=lambda i: times[i], reverse=True): print(f"{files[i].name}: {int(times[i])} secs")
    print(f"{len(files)} notebooks in {time.time() - t0:.0f} s on {a.n_workers} workers ({sum(times):.0f} s of work)")
    if failed := [f.name for ok,f in zip(passed, files) if not ok]:
        sys.stderr.write("\nnbdev Tests Failed On The Following Notebooks:\n" + '='*50 + '\n\t' + '\n\t'.join(failed) + '\n')
        sys.exit(1)
    print("Success.")

if __name__ == '__main__': main()
