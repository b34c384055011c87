"""Run every Python block and shell command of README.md and docs/*.md, so the docs cannot drift from the code.

    python tools/check_docs.py            # every document; a loopback Hub test double stands in for the Hub
    python tools/check_docs.py --list     # what would run, what is skipped and why

Each document runs as one program, its blocks in order and sharing one namespace (a page reads top to bottom), in a
fresh temporary directory that mirrors the repository (symlinks), so relative paths such as
``diffusers_mixdq/demo/pipeline`` work and what the docs write (``my-plan/``, ``mixdq-demo/``) lands there.

- ``python`` blocks run as written; ``>>>`` blocks run their statements (their printed outputs hold commit shas and
  are not compared).
- ``bash`` / ``sh`` blocks run each command; ``console`` blocks run the lines after ``$ ``. ``.venv/bin/`` and a
  bare ``mixdq`` become this interpreter's scripts directory.
- The README's set-up prefix (``python3 -m venv .venv && .venv/bin/pip install ...``) is not run again: it is what
  ``.ci/run`` itself runs before the tests, so CI verifies it by running at all; the rest of the command line runs.
- The Hub is ``tests/hub_server.py``'s loopback test double (``HF_ENDPOINT``), with the user ``you`` logged in.
- :data:`SKIPPED` is the reviewed list of blocks that do not run, each with why; :data:`SETUP` the reviewed code
  run before a block or a document (what the page says exists, e.g. a plan repository on the Hub). An entry that
  matches no block is an error, so neither list can go stale.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what .ci/run runs before the test suite: the set-up half of the README's first command lines
CI_SETUP = 'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[test]"'
CI_TESTS = ".venv/bin/python -m pytest"
COMMAND_LANGS = {"python", "bash", "sh", "shell", "console"}
HUB_USER, HUB_TOKEN = "you", "hf_docs_check_token"

#: (document, text found in exactly one block) -> why that block is not run
SKIPPED = {
    ("README.md", CI_TESTS): "it is the test command: .ci/run runs exactly this, and this check runs inside it",
    ("docs/hub.md", 'quantization_config=MixDQConfig(plan="you/sd-turbo-mixdq", subfolder="unet"),'):
        "downloads stabilityai/sd-turbo's UNet (3.5 GB) from the real Hub; the same call on the bundled model runs "
        "in the README",
    ("docs/hub.md", "quantization_config=pipeline_quantization_config(\"you/sd-turbo-mixdq\"),"):
        "downloads the stabilityai/sd-turbo pipeline (5 GB) from the real Hub; the README runs the same one-liner on "
        "the bundled model",
}

#: (document, text found in exactly one block, or "" for the start of the document) -> code run before it
SETUP = {
    ("docs/hub.md", ""): (
        "# the plan repository the page uses, published as its 'Publishing' section says\n"
        "from diffusers_mixdq import BitPlan\n"
        "from diffusers_mixdq.hub import push_plan\n"
        "BitPlan(defaults={'weights': 'int8', 'activations': 'int8', 'act_range': 'dynamic'},\n"
        "        rules=[{'targets': ['*.attn2.to_k', '*.attn2.to_v'], 'weights': 'int4'}]).save('my-plan/unet')\n"
        "push_plan('my-plan', 'you/sd-turbo-mixdq')\n"
    ),
    ("docs/plan-format.md", 'plan = BitPlan.load("plan.json")'): (
        "# the page's `plan.json` and `model`: a bundled plan and the bundled model's UNet (config only)\n"
        "import shutil\n"
        "from diffusers_mixdq.cli import load_model_skeleton\n"
        "shutil.copytree('diffusers_mixdq/demo/plans/shapes/w8a8', '.', dirs_exist_ok=True)\n"
        "model = load_model_skeleton('diffusers_mixdq/demo/pipeline')\n"
    ),
}


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def documents() -> list[str]:
    return ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


def blocks(doc: str) -> list[Block]:
    """The fenced blocks of ``doc`` whose language is a command language."""
    out, lang, start, body = [], None, 0, []
    for number, line in enumerate((ROOT / doc).read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^```(\S*)\s*$", line)
        if fence and lang is None:
            lang, start, body = fence.group(1) or "text", number + 1, []
        elif line.rstrip() == "```" and lang is not None:
            if lang in COMMAND_LANGS:
                out.append(Block(doc, start, lang, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    return out


def shell_commands(block: Block) -> list[str]:
    """The commands of a shell block (continuations joined, comments and output lines left out)."""
    lines = block.code.replace("\\\n", " ").splitlines()
    if block.lang == "console":
        return [line[2:].strip() for line in lines if line.startswith("$ ")]
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def python_code(block: Block) -> str:
    """A python block's code; for a ``>>>`` session, its statements."""
    lines = block.code.splitlines()
    if not any(line.startswith(">>> ") for line in lines):
        return block.code
    return "\n".join(line[4:] for line in lines if line.startswith((">>> ", "... "))) + "\n"


def _matching(doc: str, table: dict, all_blocks: list[Block]) -> dict[str, Block | None]:
    """``{text: block}`` for ``doc``'s entries of ``table`` (``""``: the document's start, no block)."""
    found: dict[str, Block | None] = {}
    for (d, text), _ in table.items():
        if d != doc:
            continue
        hits = [b for b in all_blocks if text and text in b.code]
        if text and len(hits) != 1:
            raise SystemExit(f"check_docs: {d}: {len(hits)} blocks contain {text!r}; update SKIPPED / SETUP.")
        found[text] = hits[0] if text else None
    return found


def local_command(command: str) -> str | None:
    """``command`` as run here (``None``: not run); see the module docstring."""
    if command.startswith(CI_SETUP):
        command = command[len(CI_SETUP):].lstrip(" &")
    if not command:
        return None
    scripts = str(Path(sys.executable).parent) + "/"
    command = command.replace(".venv/bin/", scripts)
    return scripts + command if command.startswith("mixdq ") else command


def program(doc: str) -> tuple[str, list[str]]:
    """The program that runs ``doc``'s blocks in order, and the lines saying what is skipped."""
    all_blocks = blocks(doc)
    skipped = {id(b): SKIPPED[(doc, t)] for t, b in _matching(doc, SKIPPED, all_blocks).items()}
    setup = {id(b) if b else None: SETUP[(doc, t)] for t, b in _matching(doc, SETUP, all_blocks).items()}
    parts, notes = [_PRELUDE], []
    if None in setup:
        parts.append(_run_python(setup[None], f"{doc}: set-up"))
    for block in all_blocks:
        if id(block) in skipped:
            notes.append(f"skipped {block.where}: {skipped[id(block)]}")
            continue
        if id(block) in setup:
            parts.append(_run_python(setup[id(block)], f"{block.where}: set-up"))
        if block.lang == "python":
            parts.append(_run_python(python_code(block), block.where))
            continue
        for command in shell_commands(block):
            if CI_TESTS in command:
                raise SystemExit(f"check_docs: {block.where} runs the test suite; list it in SKIPPED.")
            local = local_command(command)
            if command.startswith(CI_SETUP):
                notes.append(f"set-up of {block.where} not re-run: {CI_SETUP} (what .ci/run itself runs)")
            if local is None:
                notes.append(f"not re-run {block.where}: {command} (what .ci/run itself runs)")
            else:
                parts.append(f"_sh({local!r}, {block.where!r})\n")
    return "".join(parts), notes


_PRELUDE = '''import subprocess, sys
NS = {"__name__": "__main__"}
def _sh(command, where):
    print(f"--- {where}: $ {command}", flush=True)
    code = subprocess.run(command, shell=True).returncode
    if code:
        sys.exit(f"FAILED {where}: exit status {code} of: {command}")
'''


def _run_python(code: str, where: str) -> str:
    return f"print({('--- ' + where + ': python')!r}, flush=True)\nexec(compile({code!r}, {where!r}, 'exec'), NS)\n"


def workdir(tmp: Path) -> Path:
    """``tmp`` with the repository's top-level entries linked in (not .git, not a virtual environment)."""
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv") and not (tmp / entry.name).exists():
            (tmp / entry.name).symlink_to(entry)
    return tmp


def run_doc(doc: str, hub_url: str | None, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run ``doc``'s program in a fresh directory; the Hub at ``hub_url`` (None: offline)."""
    code, _ = program(doc)
    with tempfile.TemporaryDirectory(prefix="mixdq-docs-") as tmp:
        cwd = workdir(Path(tmp))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "HF_HOME": str(cwd / ".hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        if hub_url:
            env.update(HF_ENDPOINT=hub_url, HF_TOKEN=HUB_TOKEN)
        else:
            env["HF_HUB_OFFLINE"] = "1"
        return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)


def loopback_hub():
    """The test suite's Hub test double, started, with the docs' user logged in."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hub_server import LoopbackHub

    server = LoopbackHub(tokens={HUB_TOKEN: HUB_USER})
    server.start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="*", help="documents (default: README.md and docs/*.md)")
    parser.add_argument("--list", action="store_true", help="print what would run and what is skipped")
    args = parser.parse_args(argv)
    docs = args.docs or documents()
    if args.list:
        for doc in docs:
            code, notes = program(doc)
            print(f"{doc}: {code.count('exec(compile(') + code.count('_sh(') - 1} steps", *notes, sep="\n  ")
        return 0
    server, failed = loopback_hub(), 0
    try:
        for doc in docs:
            result = run_doc(doc, server.url)
            print(f"{'ok' if result.returncode == 0 else 'FAILED'}: {doc}")
            if result.returncode:
                failed += 1
                print(result.stdout[-4000:], result.stderr[-8000:], sep="\n")
    finally:
        server.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
