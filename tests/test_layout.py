"The package's layers (shared/DESIGN.md): each module imports only from the modules above it, and only public names."
import ast
from pathlib import Path
import pytest

PKG = Path(__file__).resolve().parents[1]/'fastai_saliency'
# Top to bottom: a module may import from the ones before it in this list.
LAYERS = ['test_utils', 'hooks', 'store', 'data', 'learn_io', 'layers', 'targets', 'methods', 'fullgrad', 'attributions', 'plot', 'snapshot', 'scoring', 'saliency', 'learner', 'replay', 'capture',
          'monitor', 'evaluate', 'adversarial', 'cli']
MODULES = sorted(p.stem for p in PKG.glob('*.py') if not p.stem.startswith('_') and p.stem != 'all')

def package_imports(mod):
    "(imported module, names) for every import of a fastai_saliency module in `mod`"
    tree = ast.parse((PKG/f'{mod}.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            name = node.module or ''
            if node.level == 1 and name: yield name.split('.')[0], [a.name for a in node.names]
            elif node.level == 1: yield from ((a.name, []) for a in node.names)           # from . import methods
            elif name.startswith('fastai_saliency.'): yield name.split('.')[1], [a.name for a in node.names]
            elif name == 'fastai_saliency': yield from ((a.name, []) for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith('fastai_saliency.'): yield a.name.split('.')[1], []

def test_every_module_has_a_layer():
    assert set(MODULES) <= set(LAYERS), set(MODULES) - set(LAYERS)

@pytest.mark.parametrize('mod', MODULES)
def test_imports_only_from_layers_above_and_only_public_names(mod):
    for dep,names in package_imports(mod):
        assert LAYERS.index(dep) < LAYERS.index(mod), f"{mod} imports {dep}, which is not above it"
        private = [n for n in names if n.startswith('_')]
        assert not private, f"{mod} imports private names {private} from {dep}"

def test_learner_does_not_import_the_callbacks():
    assert not {d for d,_ in package_imports('learner')} & {'snapshot', 'saliency', 'monitor'}
