"The install and the console script: `fastai-saliency demo`, its errors and its outputs."
import html, json, os, re, shutil, subprocess, sys, tempfile
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

@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    "One small run of the console script, shared by the tests below: (its folder, the process result)"
    tmp = tmp_path_factory.mktemp('demo')
    r = run('demo', '--out', 'out', '--epochs', '1', '--size', '32', '--n-per-class', '8', '--cpu', cwd=tmp)
    return tmp,r

def test_demo_small_run(demo):
    tmp_path,r = demo
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ['out']          # nothing written beside the output folder
    res = json.loads((tmp_path/'out'/'results.json').read_text())
    assert 0 <= res['accuracy'] <= 1 and res['epochs'] == 1
    for f in res['files']: assert (tmp_path/'out'/f).stat().st_size > 0, f
    assert list(res['faithfulness']) == ['FullGrad (localising)', "Grad-CAM at '0.5'", 'random order']

# The report in a real browser: every image loads, nothing is wider than the window
BROWSERS = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable', 'chrome')
MEASURE = """<script>window.addEventListener('load', () => {
  const vw = document.documentElement.clientWidth;
  const imgs = [...document.images].map(i => ({src: i.getAttribute('src'), w: i.naturalWidth}));
  const wide = [...document.body.querySelectorAll('*')].map(e => [e, e.getBoundingClientRect()])
    .filter(([e, r]) => r.width > 0 && (r.right > vw + 0.5 || r.left < -0.5))
    .map(([e, r]) => `${e.tagName.toLowerCase()} ${e.getAttribute('src') || ''} ${Math.round(r.left)}..${Math.round(r.right)}`);
  const m = document.createElement('script');
  m.type = 'application/json'; m.id = 'measurements';
  m.textContent = JSON.stringify({vw, scrollWidth: document.documentElement.scrollWidth, imgs, wide});
  document.body.appendChild(m);
});</script>"""

def browser():
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if exe is None: pytest.skip(f"no Chromium or Chrome on PATH (looked for {', '.join(BROWSERS)}): apt-get install -y chromium")
    return exe

def measure(page:Path, width:int) -> dict:
    "Open a copy of `page` (beside it, so relative images resolve) with the measuring script in headless Chromium"
    check = page.with_name(f'_check_{page.name}')
    check.write_text(page.read_text().replace('</body>', MEASURE + '</body>'))
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([browser(), '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                            '--disable-background-networking', '--disable-component-update', '--disable-sync',
                            f'--user-data-dir={profile}', f'--window-size={width},900', '--virtual-time-budget=5000',
                            '--dump-dom', check.as_uri()], capture_output=True, text=True, timeout=120)
    check.unlink()
    m = re.search(r'<script type="application/json" id="measurements">(.*?)</script>', r.stdout, re.S)
    assert m, f"no measurements in the DOM the browser dumped (rc {r.returncode}): {r.stderr[-1500:]}"
    return json.loads(html.unescape(m.group(1)))

def test_measuring_finds_what_overflows(tmp_path):
    "The check itself: a missing image and a too-wide element are found"
    page = tmp_path/'bad.html'
    page.write_text('<!doctype html><html><body><img src="missing.png"><div style="width:3000px">wide</div></body></html>')
    res = measure(page, 800)
    assert res['imgs'] == [{'src': 'missing.png', 'w': 0}] and res['scrollWidth'] > res['vw']
    assert any(w.startswith('div') for w in res['wide'])

@pytest.mark.parametrize('width', [1280, 640])
def test_report_in_a_browser(demo, width):
    tmp_path,r = demo
    assert r.returncode == 0
    res = measure(tmp_path/'out'/'report.html', width)
    files = json.loads((tmp_path/'out'/'results.json').read_text())['files']
    assert sorted(i['src'] for i in res['imgs']) == sorted(f for f in files if f.endswith(('.png', '.gif')))
    assert all(i['w'] > 0 for i in res['imgs']), res['imgs']                 # every image loaded
    assert res['scrollWidth'] <= res['vw'], res                              # no horizontal scrolling
    assert res['wide'] == [], res['wide']                                    # no element wider than the page
