"""The README's layout table names every module of the package (rlr_fast/ and kernels/)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Layout\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end != -1 else None]


def test_the_readme_layout_names_every_module():
    section = _layout_section()
    named = set(re.findall(r"`([\w/]+\.py)`", section))  # as written: a path, or a bare file name in a row
    missing = []
    for path in sorted([*ROOT.glob("rlr_fast/**/*.py"), *ROOT.glob("kernels/**/*.py")]):
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(ROOT).as_posix()
        if rel not in named and path.name not in named:
            missing.append(rel)
    assert not missing, f"README's Layout table does not name: {missing}"


def test_every_path_the_layout_names_exists():
    section = _layout_section()
    for rel in re.findall(r"`((?:rlr_fast|kernels)/[\w/]*)`", section):
        assert (ROOT / rel).exists(), rel
