"""Every Python block and shell command of README.md and docs/*.md runs (tools/check_docs.py), against the bundled
model and the loopback Hub test double. The README's set-up commands (``python3 -m venv .venv && .venv/bin/pip
install ...``) are not run again here: they are what ``.ci/run`` runs before this suite, so CI verifies them by
getting here at all; its test command is this suite itself. Blocks that need the real Hub or multi-GB downloads are
skipped by the reviewed ``SKIPPED`` list in tools/check_docs.py, each with its reason."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check_docs():
    spec = importlib.util.spec_from_file_location("check_docs", ROOT / "tools" / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_docs", module)
    spec.loader.exec_module(module)
    return module


check_docs = _check_docs()


@pytest.fixture(scope="module")
def docs_hub():
    server = check_docs.loopback_hub()
    yield server
    server.stop()


def test_every_document_is_checked_and_every_skip_says_why():
    docs = check_docs.documents()
    assert "README.md" in docs and "docs/hub.md" in docs
    for (doc, text), reason in check_docs.SKIPPED.items():
        assert doc in docs and len(reason) > 40, (doc, text)
    # the README's set-up is what .ci/run runs (so it is verified by CI itself); its remainder still runs
    assert check_docs.CI_SETUP in (ROOT / ".ci" / "run").read_text()
    assert check_docs.local_command(check_docs.CI_SETUP + " && .venv/bin/mixdq demo").endswith("/mixdq demo")
    assert check_docs.local_command(check_docs.CI_SETUP) is None


def test_extraction(tmp_path, monkeypatch):
    doc = tmp_path / "page.md"
    doc.write_text("text\n```python\n>>> x = 1\n>>> x\n1\n```\n```console\n$ mixdq --help\nUsage: ...\n```\n"
                   "```bash\n# a comment\nmixdq inspect \\\n  my-plan\n```\n```yaml\na: 1\n```\n")
    monkeypatch.setattr(check_docs, "ROOT", tmp_path)
    blocks = check_docs.blocks("page.md")
    assert [b.lang for b in blocks] == ["python", "console", "bash"]
    assert check_docs.python_code(blocks[0]) == "x = 1\nx\n"
    assert check_docs.shell_commands(blocks[1]) == ["mixdq --help"]
    assert check_docs.shell_commands(blocks[2]) == ["mixdq inspect    my-plan"]


def test_a_failing_block_fails_the_check(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("```python\nimport diffusers_mixdq\nassert diffusers_mixdq.nope\n```\n")
    monkeypatch.setattr(check_docs, "ROOT", tmp_path)
    monkeypatch.setattr(check_docs, "SKIPPED", {})
    monkeypatch.setattr(check_docs, "SETUP", {})
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = check_docs.run_doc("README.md", None)
    assert result.returncode != 0 and "README.md:2" in result.stderr and "nope" in result.stderr
    # an allow-list entry that matches no block is an error, so the list cannot go stale
    monkeypatch.setattr(check_docs, "SKIPPED", {("README.md", "no such text"): "a reason long enough to pass review"})
    with pytest.raises(SystemExit, match="0 blocks contain 'no such text'"):
        check_docs.program("README.md")


@pytest.mark.slow
@pytest.mark.parametrize("doc", check_docs.documents())
def test_document_runs(doc, docs_hub):
    result = check_docs.run_doc(doc, docs_hub.url)
    assert result.returncode == 0, f"{doc}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    docs_hub.check()  # every request the docs made is one the Hub answers
