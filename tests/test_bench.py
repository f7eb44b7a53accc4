"""bench/ as a set of scripts and libraries: no script imports another script, the profile attribution of
bench_demo.py reads the functions it names, and collect_text_path_runs.py follows the exit convention."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_FOLDERS = ("bench", "train", "eval", "data_scripts")


def is_script(path: Path) -> bool:
    """A file with a `__main__` block is a script; one without is a library of its folder."""
    return '__name__ == "__main__"' in path.read_text()


def imported_modules(path: Path) -> set[str]:
    """The modules a file imports (absolute names, top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_bench_file_imports_a_script():
    scripts = {f"{folder}.{path.stem}" for folder in SCRIPT_FOLDERS for path in (ROOT / folder).glob("*.py")
               if is_script(path)}
    offending = {path.name: sorted(imported_modules(path) & scripts) for path in (ROOT / "bench").glob("*.py")}
    assert {name: modules for name, modules in offending.items() if modules} == {}
    assert {"bench.gpu_bench", "bench.bench_train", "bench.bench_demo"} <= scripts  # the check sees scripts
    assert not is_script(ROOT / "bench" / "gpu_sections.py") and not is_script(ROOT / "bench" / "gpu_table.py")


def test_profile_parts_are_the_named_functions(tmp_path):
    """Two classes with a __call__ each and a decorated function: only the ones that ran get seconds."""
    from bench.bench_demo import part_seconds, profiled

    script = tmp_path / "work.py"
    script.write_text("import functools\n\n\ndef deco(f):\n    @functools.wraps(f)\n    def inner(*a):\n"
                      "        return f(*a)\n    return inner\n\n\nclass A:\n    def __call__(self):\n"
                      "        return sum(i * i for i in range(300_000))\n\n\nclass B:\n    def __call__(self):\n"
                      "        return 0\n\n\n@deco\ndef busy():\n    return sum(i for i in range(300_000))\n\n\n"
                      "if __name__ == '__main__':\n    A()()\n    busy()\n")
    stats = profiled(str(script), [], tmp_path / "work.prof")
    parts = part_seconds(stats, {"a": [("work.py", "A.__call__")], "b": [("work.py", "B.__call__")],
                                 "busy": [("work.py", "busy")], "elsewhere": [("nowhere/", "busy")]})
    assert parts["a"] > 0 and parts["busy"] > 0 and parts["b"] == 0 and parts["elsewhere"] == 0
    assert sum(parts.values()) == pytest.approx(stats.total_tt)


def test_collect_text_path_runs_bad_input_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "collect_text_path_runs.py"),
                           f"run={tmp_path / 'missing'}", "--output", str(tmp_path / "table.md")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("collect_text_path_runs.py: error: ") and "NAME=DEMO_DIR" in lines[0]
    assert not (tmp_path / "table.md").exists()
