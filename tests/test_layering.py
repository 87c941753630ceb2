"""The package imports only downwards, has no import cycles, and no launcher imports another.

Parses every module with `ast` (imports inside functions count too), so the rule stays true
whatever the import style.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("mediclip_jax", "data_pipelines", "launch", "configs")

# Lowest first. A module may import modules of its own layer or of lower layers.
LAYERS: list[tuple[str, ...]] = [
    ("mediclip_jax", "mediclip_jax.config_utils", "mediclip_jax.rngs", "mediclip_jax.parallel", "mediclip_jax.filters",
     "mediclip_jax.checkpoints", "mediclip_jax.flops"),
    ("data_pipelines", "mediclip_jax.synthesis", "mediclip_jax.weights"),
    ("mediclip_jax.models",),
    ("mediclip_jax.methods",),
    ("mediclip_jax.config_defaults", "mediclip_jax.evaluate", "mediclip_jax.export"),
    ("mediclip_jax.train",),
    ("launch", "configs"),
]
# Modules that must stay method-agnostic: nothing of a particular method or network.
METHOD_AGNOSTIC = ("mediclip_jax.train.loop", "mediclip_jax.evaluate.scoring", "mediclip_jax.evaluate.restore",
                   "mediclip_jax.export")
METHOD_SPECIFIC = ("mediclip_jax.methods.mediclip", "mediclip_jax.models")


def _modules() -> dict[str, Path]:
  mods = {}
  for root in ROOTS:
    for path in (REPO / root).rglob("*.py"):
      name = ".".join(path.relative_to(REPO).with_suffix("").parts)
      mods[name.removesuffix(".__init__")] = path
  return mods


MODULES = _modules()


def _imports(path: Path) -> set[str]:
  """Project modules imported by the file (`from a.b import c` counts as a.b.c when that is a module)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        out.add(full if full in MODULES else node.module)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
  return {m for m in out if m.split(".")[0] in ROOTS}


def _layer(module: str) -> int:
  best, depth = None, -1
  for i, prefixes in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and len(p) > depth:
        best, depth = i, len(p)
  assert best is not None, f"{module} is in no layer of tests/test_layering.py"
  return best


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
  for m in MODULES:
    _layer(m)


def test_imports_only_go_downwards():
  upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
            for m, deps in GRAPH.items() for d in deps if _layer(d) > _layer(m)]
  assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_launcher_imports_another():
  bad = [f"{m} imports {d}" for m, deps in GRAPH.items() if m.startswith("launch") for d in deps
         if d.startswith("launch")]
  assert not bad, bad


def test_configs_import_only_config_helpers():
  allowed = ("mediclip_jax.config_defaults", "mediclip_jax.config_utils")
  bad = [f"{m} imports {d}" for m, deps in GRAPH.items() if m.startswith("configs") for d in deps
         if not d.startswith(allowed)]
  assert not bad, bad


def test_no_import_cycles():
  state: dict[str, int] = {}  # 1 = on the stack, 2 = done
  cycles = []

  def visit(m, stack):
    state[m] = 1
    for d in sorted(GRAPH.get(m, ())):
      if d not in GRAPH:
        continue
      if state.get(d) == 1:
        cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d, stack + [d])
    state[m] = 2

  for m in sorted(GRAPH):
    if m not in state:
      visit(m, [m])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_generic_modules_import_no_method():
  for m in METHOD_AGNOSTIC:
    bad = [d for d in GRAPH[m] if d.startswith(METHOD_SPECIFIC)]
    assert not bad, f"{m} imports method-specific modules {bad}"


def test_the_checker_catches_an_upward_import(tmp_path):
  """The rule itself works: a synthetic upward import is found (guards against a vacuous test)."""
  fake = tmp_path / "x.py"
  fake.write_text("from mediclip_jax.train import loop\nimport mediclip_jax.methods.mediclip\n")
  deps = _imports(fake)
  assert "mediclip_jax.train.loop" in deps and "mediclip_jax.methods.mediclip" in deps
  assert _layer("mediclip_jax.train.loop") > _layer("mediclip_jax.models.clip")
