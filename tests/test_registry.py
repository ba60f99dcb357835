"""The method registry: the only module that tells the methods apart by name, and what it holds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pirl import config as C
from pirl.methods import METHODS, REGISTRY, build_train_transform, fit_to_dataset, get_method

PACKAGE = Path(__file__).resolve().parents[1] / "pirl"
REGISTRY_FILE = PACKAGE / "methods" / "__init__.py"


def _mentions_method(node: ast.AST) -> bool:
    """Does the expression read something named like a method (``cfg.objective.method``,
    ``method``, ``self.method``, ``o.method``...)?"""
    return any((isinstance(n, ast.Name) and "method" in n.id.lower())
               or (isinstance(n, ast.Attribute) and "method" in n.attr.lower())
               for n in ast.walk(node))


def _names_in(node: ast.AST) -> list[str]:
    """The registered method names among the string literals of a constant or a tuple / list /
    set of constants."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [e.value for e in items
            if isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value in METHODS]


def _only_names(node: ast.AST) -> bool:
    """A tuple / list / set of two or more literals, every one a method name (PRETEXTS, which
    shares two names with the methods, is not)."""
    return (isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2
            and len(_names_in(node)) == len(node.elts))


def name_switches(source: str, filename: str = "<src>") -> list[str]:
    """Places in ``source`` that switch on a method name: a comparison (``==``, ``!=``, ``in``,
    ``not in``) of something named like a method against a literal method name or a tuple of
    them, dicts keyed by literal method names (dispatch tables), and groups of method names
    kept apart from the registry (``BANK_METHODS = ("pirl", "npid")``); config_schema.METHODS,
    the list of names itself, is the one group allowed."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Assign) and _only_names(node.value):
            targets = [ast.unparse(t) for t in node.targets]
            if not (filename.endswith("config_schema.py") and targets == ["METHODS"]):
                found.append(f"{filename}:{node.lineno}: {' = '.join(targets)} lists methods")
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            for i, side in enumerate(sides):
                others = sides[:i] + sides[i + 1:]
                if _names_in(side) and any(_mentions_method(o) for o in others):
                    found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
                    break
        elif isinstance(node, ast.Dict):
            keys = [k for k in node.keys if k is not None]
            if keys and sum(bool(_names_in(k)) for k in keys) >= 2:
                found.append(f"{filename}:{node.lineno}: dict keyed by method names")
    return found


def test_no_module_outside_the_registry_switches_on_the_method_name() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == REGISTRY_FILE:
            continue
        offenders += name_switches(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert not offenders, ("ask pirl.methods.get_method(cfg) instead of comparing the method "
                           "name:\n" + "\n".join(offenders))


@pytest.mark.parametrize("code", [
    'if cfg.objective.method == "pirl": pass',
    'if "jigsaw" != self.method: pass',
    'uses_bank = o.method in ("pirl", "npid")',
    'x = method not in ["rotation"]',
    'BUILDERS = {"pirl": f, "npid": g}',
    'BANK_METHODS = ("pirl", "npid")',
])
def test_the_check_catches_each_pattern(code: str) -> None:
    """The patterns the old code used (each one of them is flagged)."""
    assert name_switches(code)


@pytest.mark.parametrize("code", [
    'if cfg.objective.pretext == "rotation": pass',  # a pretext, not a method
    'if key == "rotation": pass',  # the rotation label's batch key
    'if get_method(cfg).uses_bank: pass',
])
def test_the_check_leaves_other_strings_alone(code: str) -> None:
    assert not name_switches(code)


def test_every_config_method_has_one_entry() -> None:
    assert set(REGISTRY) == set(METHODS) == set(C.METHODS)
    for name, method in REGISTRY.items():
        assert method.name == name and get_method(name) is method
    cfg = C.Config()
    cfg.objective.method = "npid"
    assert get_method(cfg) is REGISTRY["npid"]
    with pytest.raises(ValueError, match="simclr"):
        get_method("simclr")


def test_flags() -> None:
    """Which methods keep a bank, draw from a permutation set, have both heads, train on labels."""
    assert {n for n, m in REGISTRY.items() if m.uses_bank} == {"pirl", "npid"}
    assert {n for n, m in REGISTRY.items() if m.needs_permutations} == {"jigsaw"}
    assert {n for n, m in REGISTRY.items() if m.has_f_and_g} == {"pirl"}
    assert {n for n, m in REGISTRY.items() if m.needs_labels} == {"supervised"}


def test_the_bank_flag_is_what_caps_the_negatives() -> None:
    """config.validate caps N at |D| - 1 for the methods with a bank and leaves the others'."""
    for name, method in REGISTRY.items():
        cfg = C.from_preset("demo")
        cfg.objective.method = name
        notes = fit_to_dataset(cfg, dataset_size=100)
        assert (cfg.objective.num_negatives == 99) == method.uses_bank, name
        assert bool(notes) == method.uses_bank, name


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_objective_and_model_follow_the_registry(name: str) -> None:
    """build_objective gives a bank exactly to the bank methods; the views a method declares
    are the keys its sample holds."""
    from PIL import Image

    cfg = C.from_preset("demo")
    cfg.objective.method = name
    cfg.objective.num_permutations = 4
    method = get_method(cfg)
    objective = method.build_objective(cfg, 50, "cpu")
    assert (objective.bank is not None) == method.uses_bank
    assert objective.state_dict()["method"] == name
    sample = build_train_transform(cfg)(Image.new("RGB", (40, 40), (90, 30, 200)))
    views = method.views(cfg)
    expected = ({"image"} if views.image else set()) | ({"patches"} if views.patches else set())
    expected |= {"rotated"} if views.rotated else set()
    expected |= {"perm_label"} if views.patches == "permutation" else set()
    expected |= {"rotation"} if views.rotation_label else set()
    assert set(sample) == expected
