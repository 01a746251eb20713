"""The package's rooms keep to one concern each, read from the imports of dalipipe/ (ast).

A room is a subpackage of dalipipe (dalipipe/world/ is room `world`) or a top-level module
(dalipipe/config.py is room `config`). Imports inside functions count as much as those at the
top: a lazy import is still an arrow. A failure names the module and what it imports.

    pytest tests/test_rooms.py -q
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dalipipe"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).is_dir() or (PACKAGE.parent / relative).with_suffix(
        ".py"
    ).is_file()


def room(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports() -> list[tuple[str, str]]:
    """(module, what it imports) for every dalipipe module that a dalipipe module imports;
    `from dalipipe.x import y` is dalipipe.x.y where y is a module, else dalipipe.x."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [
                    f"{node.module}.{alias.name}"
                    if is_module(f"{node.module}.{alias.name}")
                    else node.module
                    for alias in node.names
                ]
            else:
                continue
            found += [(importer, name) for name in names if name.split(".")[0] == "dalipipe"]
    return found


def crossings(into: str, allowed_from: set[str] = frozenset()) -> list[str]:
    return [
        f"{importer} imports {name}"
        for importer, name in imports()
        if room(name) == into and room(importer) not in {into, *allowed_from}
    ]


def forbidden(importer_room: str, rooms: set[str]) -> list[str]:
    return [
        f"{importer} imports {name}"
        for importer, name in imports()
        if room(importer) == importer_room and room(name) in rooms
    ]


def test_the_scan_sees_lazy_imports_and_names_submodules():
    found = set(imports())
    # inside a function, and `from package import module` resolved to the module
    assert ("dalipipe.caption.bootstrap", "dalipipe.world.classes") in found
    assert ("dalipipe.memory.architectures", "dalipipe.models.llava_config") in found
    assert ("dalipipe.evaluate.run", "dalipipe.scoring.metrics") in found


def test_no_production_module_imports_the_test_factories():
    # make-tiny reaches dalipipe.testing through cli.py's table of command modules, by name
    # (importlib, when a person runs it), so it is no import here.
    assert crossings("testing") == []


def test_only_the_make_tiny_command_names_the_test_factories():
    named = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if room(module_name(path)) == "testing":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and str(node.value).startswith("dalipipe.testing"):
                named.append(f"{module_name(path)} names {node.value}")
    assert named == ["dalipipe.cli names dalipipe.testing.checkpoints"]


def test_the_papers_artifacts_stand_on_the_evaluation_never_under_it():
    assert crossings("paper") == []


def test_scoring_reads_captions_and_references_only():
    pipeline = {"align", "caption", "data", "describe", "evaluate", "memory", "models", "world"}
    assert forbidden("scoring", pipeline | {"paper", "testing"}) == []


def test_the_world_is_a_data_source_that_knows_no_captioner():
    above = {"align", "caption", "describe", "evaluate", "memory", "models", "paper", "scoring"}
    assert forbidden("world", above | {"testing"}) == []


def test_the_evaluation_imports_no_paper_artifact_and_no_training_stage():
    assert forbidden("evaluate", {"paper", "testing", "caption", "align"}) == []


def test_the_user_facing_layer_stands_on_the_models_and_stages_never_under_them():
    # describe/ (the Captioner API and the commands for people) imports models/ and caption/;
    # they import nothing of it, not even lazily: the arrow runs one way.
    assert forbidden("models", {"describe"}) == []
    assert forbidden("caption", {"describe"}) == []
