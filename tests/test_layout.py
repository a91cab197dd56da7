"""The package's shape: modules under 600 lines, no import cycles between our modules, the method chosen in one place,
no private names imported across modules, and configs whose comments are one line each."""
import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "oneflow_jax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(tree: ast.Module, names: set[str], top_level_only: bool):
    """(module, imported name) pairs of our modules that `tree` imports (module level only, if asked)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("oneflow_jax"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub if sub in names else node.module), alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("oneflow_jax"):
                    yield alias.name, None


def test_every_module_is_under_600_lines():
    long = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) >= 600}
    assert not long, long


def test_no_import_cycles_between_modules():
    mods = modules()
    graph = {name: {m for m, _ in imported(tree, set(mods), top_level_only=True) if m in mods and m != name}
             for name, tree in mods.items()}
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path[path.index(nxt):] + [nxt])}"
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert len(state) == len(mods) > 40


def test_no_private_names_imported_across_modules():
    mods = modules()
    private = [(name, module, what) for name, tree in mods.items()
               for module, what in imported(tree, set(mods), top_level_only=False)
               if what and what.startswith("_") and module != name]
    assert not private, private


def test_the_method_is_read_in_one_place():
    hits = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") for line in p.read_text().splitlines()
            if re.search(r"""get\(["']model_type["']""", line) and "hf.get" not in line]
    assert hits == ["oneflow_jax/methods/__init__.py"], hits


def test_config_comments_are_one_line():
    for path in sorted((REPO / "configs").glob("*.py")):
        lines = path.read_text().splitlines()
        for i, (a, b) in enumerate(zip(lines, lines[1:]), 2):
            # a trailing comment continued on the next line (a comment-only line indented past the code) is a wrap
            if "#" in a and not a.lstrip().startswith("#") and b.lstrip().startswith("#"):
                assert len(b) - len(b.lstrip()) <= len(a) - len(a.lstrip()), f"{path.name}:{i}: wrapped comment"
            assert not re.search(r"#.*\b\d\.\d\d\b.*/", a), f"{path.name}:{i - 1}: a score in a comment"
