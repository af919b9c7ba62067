"""The package follows the pipeline: no module imports a later stage (data -> mechanisms -> training
-> downstream), function-local imports included."""
import ast
from pathlib import Path

import chmr_jax

STAGES = ("data", "mechanisms", "training", "downstream")
# Helpers every stage uses (config_util, progress) live on top of the package, outside the stages.
ALLOWED: set = set()


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {f"{node.module}.{a.name}" for a in node.names}   # 'from chmr_jax.training import x'
    return {name for name in out if name.startswith("chmr_jax.")}


def test_no_stage_imports_a_later_stage():
    root = Path(chmr_jax.__file__).parent
    arrows = []
    for rank, stage in enumerate(STAGES):
        for path in sorted((root / stage).glob("*.py")):
            module = f"chmr_jax.{stage}.{path.stem}"
            for name in _imports(path):
                target = name.split(".")[1]
                if target in STAGES and STAGES.index(target) > rank:
                    imported = ".".join(name.split(".")[:3])
                    if (module, imported) not in ALLOWED:
                        arrows.append(f"{module} -> {imported}")
    assert not arrows, arrows
