# The two commands of the README: `make demo` (the main job) and `make test` (everything CI checks).
# Both set up what they need on first use: .venv (the pinned dev stack) and, for the tests, .venv-compat (newest fastai).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PY ?= python3.11
VENV := .venv
COMPAT := .venv-compat
# Keep every cache out of the home directory
CACHE := $(CURDIR)/.cache
export FASTAI_HOME := $(CACHE)/fastai
export TORCH_HOME := $(CACHE)/torch
export MPLCONFIGDIR := $(CACHE)/matplotlib
export IPYTHONDIR := $(CACHE)/ipython
export JUPYTER_CONFIG_DIR := $(CACHE)/jupyter
export JUPYTER_DATA_DIR := $(CACHE)/jupyter-data
export MPLBACKEND := Agg
export PYTHONWARNINGS := ignore::FutureWarning:torch.jit._script
DEMO_ARGS ?=
# pytest on both cores, a test file per worker (module fixtures are trained once); PYTEST_N= runs it in one process
PYTEST_N ?= -n 2 --dist loadfile
DEMO_OUT := demo_out

.PHONY: demo test venv export check-export nbtest browser setup-extras pytest compat clean

$(VENV)/.installed: requirements-dev.txt requirements-xcheck.txt settings.ini setup.py
	@echo "==> Setting up $(VENV) with the pinned development stack (first time: a few minutes)"
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --no-compile -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-compile --no-deps -r requirements-xcheck.txt
	$(VENV)/bin/pip install -q --no-compile --no-deps -e .
	@# pip byte-compiles one file after another (half of the set-up's time); compileall does it on every core. The few files
	@# that do not compile under 3.11 (torch's py312_intrinsics.py) pip skips too, hence the `|| true`
	$(VENV)/bin/python -m compileall -qq -j 0 "$$($(VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')" || true
	@touch $@

venv: $(VENV)/.installed

# The demo writes only under $(DEMO_OUT), its caches included
demo: FASTAI_HOME := $(CURDIR)/$(DEMO_OUT)/.cache/fastai
demo: TORCH_HOME := $(CURDIR)/$(DEMO_OUT)/.cache/torch
demo: MPLCONFIGDIR := $(CURDIR)/$(DEMO_OUT)/.cache/matplotlib
demo: $(VENV)/.installed
	@echo "==> Running the demo: synthetic traffic signs, a resnet18 trained from scratch, evolving saliency maps"
	$(VENV)/bin/fastai-saliency demo --out $(DEMO_OUT) $(DEMO_ARGS)

export: $(VENV)/.installed
	$(VENV)/bin/nbdev_export

check-export: $(VENV)/.installed
	@echo "==> Checking that the notebooks and the library agree (nbdev_export, then git diff)"
	$(VENV)/bin/nbdev_export
	git diff --exit-code -- fastai_saliency nbs
	@test -z "$$(git status --porcelain --untracked-files=all -- fastai_saliency)" || \
	  { echo "nbdev_export made files that are not committed:"; git status --porcelain -- fastai_saliency; exit 1; }

# nbdev_test's test_nb on every notebook, as `nbdev_test --flags slow --n_workers 2 --timing` would, but with the slowest
# notebooks (its --timing) handed out first, so that the two workers finish together (tools/test_notebooks.py)
NB_FIRST := 11_evaluate tutorial 04_methods
nbtest: $(VENV)/.installed
	@echo "==> Running every notebook (nbdev's test_nb, slow cells included; the slowest started first)"
	time OMP_NUM_THREADS=1 $(VENV)/bin/python tools/test_notebooks.py --flags slow --n_workers 2 --first $(NB_FIRST)

# A real browser for the report's test (tests/test_cli.py); where none can be installed, that test is skipped and says why
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "==> Installing Chromium (Debian's package) for the report's browser test"; \
	      (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null) || \
	        echo "==> Chromium could not be installed: the browser test will be skipped"; \
	    else echo "==> No Chromium and no way to install it here: the browser test will be skipped"; fi; }

pytest: $(VENV)/.installed
	@echo "==> pytest tests/ with the pinned stack"
	time OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest tests/ -q $(PYTEST_N)

# The compatibility venv takes what the newest fastai needs from PyPI into its own site-packages, and borrows the rest
# (torch and torchvision, 5 GB, are the same versions) from $(VENV): a .pth file appends $(VENV)'s site-packages to
# sys.path *after* its own, so its own fastai and fastcore 2 win, and pip leaves the borrowed packages where they are.
$(COMPAT)/.installed: requirements-compat.txt settings.ini setup.py $(VENV)/.installed
	@echo "==> Setting up $(COMPAT) with the newest fastai (no nbdev) for the compatibility run"
	@test -x $(COMPAT)/bin/python || $(PY) -m venv $(COMPAT)
	$(VENV)/bin/python -c "import site; print(site.getsitepackages()[0])" > \
	  "$$($(COMPAT)/bin/python -c 'import site; print(site.getsitepackages()[0])')/zz_borrow_dev_venv.pth"
	$(COMPAT)/bin/pip install -q -r requirements-compat.txt
	$(COMPAT)/bin/pip install -q --no-deps -e .
	@touch $@

compat: $(COMPAT)/.installed
	@echo "==> Compatibility run: pytest tests/ against the exported library with the newest fastai"
	@$(COMPAT)/bin/python -c "import fastai, fastcore; print('fastai', fastai.__version__, 'fastcore', fastcore.__version__)"
	time OMP_NUM_THREADS=1 $(COMPAT)/bin/python -m pytest tests/ -q $(PYTEST_N)

# The notebooks keep both cores busy for minutes while the browser and the compatibility venv mostly wait on the network
# and the disk: those two are set up beside the notebooks (their output held back until each is done), then both pytests
test: check-export
	@$(MAKE) --no-print-directory -j2 --output-sync=target nbtest setup-extras
	@$(MAKE) --no-print-directory pytest compat

setup-extras: browser $(COMPAT)/.installed

clean:
	rm -rf $(VENV) $(COMPAT) $(CACHE) _proc _docs
