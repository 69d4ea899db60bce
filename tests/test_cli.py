"The install and the console script: `fastai-saliency demo`, its errors and its outputs."
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent/'fastai-saliency'

def run(*args, **kw):
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=600, **kw)

def test_console_script_installed():
    assert EXE.exists(), f'{EXE} missing: is the package installed (pip install -e .)?'
    r = run('--help')
    assert r.returncode == 0 and 'demo' in r.stdout

@pytest.mark.parametrize('args,msg', [(['demo', '--epochs', '0'], '--epochs'), (['demo', '--size', '8'], '--size'),
                                      (['demo', '--size', 'big'], 'expected an integer'), (['demo', '--bogus'], 'unrecognized')])
def test_bad_arguments_exit_2(args, msg, capsys):
    "The console script's `main`, in this process (the subprocess above shows the script calls it)"
    from fastai_saliency.cli import main
    with pytest.raises(SystemExit) as e: main(args)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err

def test_setup_py_has_no_pkg_resources():
    assert 'pkg_resources' not in (ROOT/'setup.py').read_text()

def test_runtime_requirements_are_loose():
    import configparser
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    reqs = cfg['DEFAULT']['requirements'].split()
    assert 'fastai>=2.8' in reqs and not any('==' in r for r in reqs)

def test_demo_small_run(tmp_path):
    r = run('demo', '--out', 'out', '--epochs', '1', '--size', '32', '--n-per-class', '8', '--cpu', cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ['out']          # nothing written beside the output folder
    res = json.loads((tmp_path/'out'/'results.json').read_text())
    assert 0 <= res['accuracy'] <= 1 and res['epochs'] == 1
    for f in res['files']: assert (tmp_path/'out'/f).stat().st_size > 0, f
