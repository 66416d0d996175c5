"""Every Python file of the project passes pyflakes: no unused import or variable, no undefined
name, no import shadowed by another. Dead names are where refactors leave stale joints."""
from pathlib import Path

from pyflakes.api import check, checkPath
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("rlr_fast", "kernels", "benchmarks", "tests")


class _Collect(Reporter):
    def __init__(self):
        self.messages = []

    def unexpectedError(self, filename, msg):
        self.messages.append(f"{filename}: {msg}")

    def syntaxError(self, filename, msg, lineno, offset, text):
        self.messages.append(f"{filename}:{lineno}: {msg}")

    def flake(self, message):
        self.messages.append(str(message))


def test_the_checker_reports_what_it_is_meant_to():
    reporter = _Collect()
    assert check("import os\n\ndef f():\n    return undefined_name\n", "snippet.py", reporter) == 2
    assert any("'os' imported but unused" in m for m in reporter.messages)
    assert any("undefined name 'undefined_name'" in m for m in reporter.messages)


def test_every_project_file_passes_pyflakes():
    files = [ROOT / "setup.py", *(p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py")))]
    assert len(files) > 100
    reporter = _Collect()
    for path in files:
        checkPath(str(path), reporter)
    assert reporter.messages == [], "\n".join(m.replace(str(ROOT) + "/", "") for m in reporter.messages)
