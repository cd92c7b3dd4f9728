"""Every third-party module pagedllm imports comes with `pip install pagedllm`: declared in pyproject's
dependencies, brought by one of them, or an optional extra imported only where it is asked for. httpx (run-batch)
was only in the test extra, so a user's `pagedllm run-batch` ended in ModuleNotFoundError."""
import ast
import re
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# imported only where asked for, each behind its own check: --distributed-executor-backend ray (the ray extra),
# FlashAttention-4 (the fa4 extra), Triton (comes with CUDA builds of torch; the CPU path imports none of it),
# cuDNN's frontend (a Linux-only dependency, imported on CUDA only)
OPTIONAL = {"ray", "flash_attn", "triton", "cudnn"}
# brought by a declared dependency whose API uses them: fastapi (starlette), transformers (huggingface_hub)
TRANSITIVE = {"starlette", "huggingface_hub"}


def _imports() -> set[str]:
    names = set()
    for path in (ROOT / "pagedllm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "pagedllm"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_module_is_a_declared_dependency():
    # the installed package's requirements (pyproject's, as pip installed them), less the extras'
    declared = {_normalized(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0])
                for r in requires("pagedllm") if "extra ==" not in r}
    dists = packages_distributions()
    missing = []
    for module in sorted(_imports() - OPTIONAL - TRANSITIVE):
        if not {_normalized(d) for d in dists.get(module, [module])} & declared:
            missing.append(module)
    assert not missing, f"imported by pagedllm but not in pyproject's dependencies: {missing}"
