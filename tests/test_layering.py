"""The layers of the code, checked on its import statements (lazy ones inside functions included):

    kernels   composable_kv.kernels.*        import nothing of ours but other kernels
    core      the stage protocol, summaries, cache, config, pipeline and fused launch
    policies  composable_kv.policies.*       one folder per method (training commands excepted)
    runtime   decode layers, the decode runtime, hf, tensor parallelism, traces, integrations
    tools     evaluation, the command line, training commands

A module imports only from its own layer or the ones below it (the package's facade, `composable_kv`,
re-exports core and registers the built-in policies: runtime and tools may import it), and no two modules
import each other, directly or through others (`if TYPE_CHECKING:` imports aside).
"""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["kernels", "core", "policies", "runtime", "tools"]
CORE = {"errors", "ints", "contracts", "stages", "summaries", "cache", "config", "pipeline", "fused", "assets",
        "cuda_graphs", "seq_rows"}
RUNTIME = {"decoder", "runtime", "hf", "distributed", "tp", "traces", "longrun", "integrations"}
TOOLS = {"cli", "eval"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for composable_kv/ and the repo-root packages it installs as its own."""
    out = {}
    for base in ("composable_kv", "policies", "kernels"):
        for path in (ROOT / base).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[0] != "composable_kv":
                parts.insert(0, "composable_kv")
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "facade"
    top = parts[1]
    if top == "kernels":
        return "kernels"
    if top == "policies":
        return "tools" if parts[-1] == "train" else "policies"
    if top in CORE:
        return "core"
    if top in RUNTIME:
        return "runtime"
    if top in TOOLS:
        return "tools"
    raise AssertionError(f"{module}: add it to a layer in tests/test_layering.py")


def _type_checking_nodes(tree) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return skip


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in known]
            if subs:
                found.update(subs)
            elif name.startswith("composable_kv"):
                found.add(name)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("composable_kv"))
    return {m for m in found if m != module}


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_every_module_has_a_layer(graph):
    for m in graph:
        layer(m)


def test_no_module_imports_a_layer_above_it(graph):
    bad = []
    for m, deps in sorted(graph.items()):
        mine = layer(m)
        if mine == "facade":
            continue
        for d in sorted(deps):
            theirs = layer(d)
            if theirs == "facade" and mine not in ("runtime", "tools"):
                bad.append(f"{m} ({mine}) imports the package facade `composable_kv`; import the module it needs")
            elif theirs != "facade" and LAYERS.index(theirs) > LAYERS.index(mine):
                bad.append(f"{m} ({mine}) imports {d} ({theirs})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles(graph):
    cycles = []
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d not in graph or layer(d) == "facade":
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# Writes into another object's private attributes that are allowed, with why.
PRIVATE_WRITES_ALLOWED = {
    # Triton's interpreter lacks Tensor.__index__ on CPU: the shim replaces its private patch function.
    "kernels/_interpret_compat.py": {"_patch_lang_tensor._ckv_patched", "_interp._patch_lang_tensor"},
}


def test_no_module_writes_another_objects_private_attributes():
    """`obj._name = ...` / `setattr(obj, "_name", ...)` only on self or cls (issue 13)."""
    found = []
    for path in sorted(p for root in ("composable_kv", "policies", "kernels") for p in (ROOT / root).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                  and str(node.args[1].value).startswith("_")):
                found.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
            for target in targets:
                for sub in ast.walk(target):
                    private = isinstance(sub, ast.Attribute) and sub.attr.startswith("_") and not sub.attr.startswith("__")
                    if private and not (isinstance(sub.value, ast.Name) and sub.value.id in ("self", "cls")):
                        if ast.unparse(sub) not in PRIVATE_WRITES_ALLOWED.get(rel, ()):
                            found.append(f"{rel}:{sub.lineno} {ast.unparse(sub)}")
    assert not found, found
