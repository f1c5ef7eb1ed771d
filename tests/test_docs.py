"""Every copy-paste example in README.md and docs/*.md runs, and every local link resolves.

Which fenced blocks run:

- ```python: executed, each block in a fresh interpreter (a block that registers an attention leaves
  this process's registry alone), in a temp dir. A python block whose first line is ``# <path>.py`` is
  also a file of its page: it is written to ``<path>`` in the temp dir of every block of that page, so
  the page's bash blocks can import it (docs/attentions.md's ``my_pkg/my_attention.py``).
- ```bash: run as one bash script (``set -euo pipefail``) in a fresh temp dir, with W&B disabled and
  its dirs there, a temp cache dir, the data dir ``../shared/data`` (``EFFICIENT_ATTN_DATA``) when it
  exists, this checkout first on ``PYTHONPATH`` (so the console commands run its code) and ``results``
  linked to the checkout's results/ (examples read it and write elsewhere). A block that needs the
  shared data (Multi30k or Tiny Shakespeare) is skipped without it.
  Install lines are not run: in a line that starts with ``pip install``, every ``pip install ... &&``
  is dropped; the rest runs if it is the main training command (with ``QUICKSTART_SHRINK`` appended,
  so it takes seconds instead of minutes) and is not run if it is ``python -m pytest`` (the whole
  suite, this test included).
- ```console and ```text: shown, never run; a console block opens with a ``# not run: <why>`` line.
- ```toml and ```yaml: file contents, never run.

Any other fence, or a fence without a language, fails ``test_every_fence_is_known``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN = {"python", "bash"}
SHOWN = {"console", "text", "toml", "yaml"}
QUICKSTART_SHRINK = "task.synthetic_sizes=[64,16,16] trainer.max_epochs=1 hydra.sweep.dir=sweep"
SLOW_COMMANDS = ("efficient-attn-train", "efficient-attn-bench", "--checkpoint")  # > 20 s on 2 shared cores
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
FILE_LINE = re.compile(r"^# ([\w/]+\.py)$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def file(self) -> str | None:
        """The path this block is the content of (first line ``# <path>.py``), else None."""
        first = self.code.splitlines()[0] if self.code else ""
        match = FILE_LINE.match(first) if self.lang == "python" else None
        return match.group(1) if match else None


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, dedented to their fence (fences inside list items too)."""
    found, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang, start = len(opening.group(1)), opening.group(2), i
        i += 1
        body = []
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        assert i < len(lines), f"{page.name}:{start + 1}: fence never closed"
        found.append(Block(page, start + 1, lang, "\n".join(body) + "\n"))
        i += 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]
RUNNABLE = [b for b in ALL if b.lang in RUN]


def param(block: Block):
    slow = block.lang == "bash" and any(cmd in block.code for cmd in SLOW_COMMANDS)
    return pytest.param(block, id=block.id, marks=[pytest.mark.slow] if slow else [])


def install_line(line: str) -> str | None:
    """What of a ``pip install ... && ... && CMD`` line runs here: CMD (shrunk), or None."""
    rest = line
    while rest.startswith("pip install"):
        if "&&" not in rest:
            return None
        rest = rest.split("&&", 1)[1].strip()
    if rest.startswith("python -m pytest"):
        return None  # the whole suite, this test included
    if rest.startswith("efficient-attn-train") and "experiment=quickstart" in rest:
        return f"{rest} {QUICKSTART_SHRINK}"
    raise AssertionError(f"an install line runs an unexpected command: {rest!r}")


def script(block: Block) -> str:
    """The bash that runs: the block, with install lines reduced by :func:`install_line`."""
    out = []
    for line in block.code.splitlines():
        if line.startswith("pip install"):
            line = install_line(line) or ": install line, not run"
        out.append(line)
    return "set -euo pipefail\n" + "\n".join(out) + "\n"


def needs_shared_data(code: str) -> bool:
    """A command on Multi30k (translation without task.source) or Tiny Shakespeare (lm without a file)."""
    for line in code.splitlines():
        if re.search(r"\btask=translation\b", line) and "task.source=" not in line:
            return True
        if re.search(r"\btask=lm\b", line) and "task.dataset=file" not in line and "--cfg" not in line:
            return True
    return False


def environment(tmp: Path, cache: Path) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "EFFICIENT_ATTN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[var] = str(tmp / "_wandb" / var.lower())
    if SHARED_DATA.exists():
        env["EFFICIENT_ATTN_DATA"] = str(SHARED_DATA)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(tmp), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """Generated data and tokenizers, shared by the blocks (cached by their parameters)."""
    return tmp_path_factory.mktemp("docs_cache")


def prepare(block: Block, tmp: Path) -> None:
    """The page's files (python blocks that name a path) and the link to results/."""
    for other in blocks(block.page):
        if other.file:
            path = tmp / other.file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(other.code, encoding="utf-8")
    (tmp / "results").symlink_to(REPO / "results", target_is_directory=True)


@pytest.mark.parametrize("block", [param(b) for b in RUNNABLE])
def test_example_runs(block: Block, tmp_path: Path, shared_cache: Path):
    if block.lang == "bash" and needs_shared_data(block.code) and not SHARED_DATA.exists():
        pytest.skip("needs ../shared/data")
    if block.lang == "bash" and all(line.startswith("pip install") and install_line(line) is None
                                    for line in block.code.splitlines()):
        pytest.skip("install line: not run (its command is the whole test suite)")
    prepare(block, tmp_path)
    if block.lang == "python":
        cmd, stdin = [sys.executable, "-"], block.code
    else:
        cmd, stdin = ["bash", "-c", script(block)], None
    out = subprocess.run(cmd, check=False, input=stdin, capture_output=True, text=True, cwd=tmp_path,
                         env=environment(tmp_path, shared_cache), timeout=900)
    assert out.returncode == 0, f"{block.id} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    if "experiment=quickstart attention=softmax,favor_plus,additive,bilinear" in script(block):
        table = out.stdout[out.stdout.index("4 run(s) in"):]  # the front-door command's summary
        for attention in ("softmax", "favor_plus", "additive", "bilinear"):
            assert f"| {attention} | 1 |" in table


def test_every_fence_is_known_and_shown_commands_say_why():
    for block in ALL:
        assert block.lang in RUN | SHOWN, f"{block.id}: fence language {block.lang!r} is neither run nor shown"
        if block.lang == "console":
            assert block.code.startswith("# not run: "), f"{block.id}: a console block opens with '# not run: <why>'"


def test_the_front_door_commands_are_there_and_run():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 200
    train = ('pip install torch==2.13.0 && pip install ".[train]" && efficient-attn-train -m experiment=quickstart '
             "attention=softmax,favor_plus,additive,bilinear")
    tests = 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q'
    bash = [b.code for b in blocks(REPO / "README.md") if b.lang == "bash"]
    assert f"{train}\n" in bash and f"{tests}\n" in bash
    assert install_line(train).startswith("efficient-attn-train -m experiment=quickstart")
    assert install_line(tests) is None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_local_links_and_anchors_resolve():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: link to missing {target}"
            if anchor and file.suffix == ".md":
                target_text = file.read_text(encoding="utf-8")
                headings = {slug(h) for h in re.findall(r"^#+ (.+)$", target_text, flags=re.MULTILINE)}
                assert anchor in headings, f"{page.name}: no heading for #{anchor} in {path}"
