"""The documentation site builds offline with ``mkdocs build --strict``, and its code runs.

- the build: every page of the nav exists, every link and every ``::: batchplate.X``
  reference resolves (``--strict`` turns warnings into errors), with the network
  made unreachable through a dead proxy, so a plugin that fetches fails the test;
- the API page documents every public name of ``batchplate``;
- the code of the migration guide and of the home page runs, in order;
- every error of the troubleshooting page is raised by its program, with the
  message the page shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import batchplate
from batchplate import BatchPlateError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RAISES = "# raises BatchPlateError"


def _fenced(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M)


def _normalized(text: str) -> str:
    return " ".join(text.split())


def test_site_builds_strict_and_offline(tmp_path):
    dead_proxy = "http://127.0.0.1:9"  # the discard port: any fetch fails at once
    env = dict(
        os.environ,
        NO_MKDOCS_2_WARNING="1",
        HTTP_PROXY=dead_proxy,
        HTTPS_PROXY=dead_proxy,
        http_proxy=dead_proxy,
        https_proxy=dead_proxy,
        NO_PROXY="",
        no_proxy="",
    )
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("index", "why", "migration", "objectives", "troubleshooting", "api", "vae"):
        assert (site / ("index.html" if page == "index" else f"{page}/index.html")).is_file()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    # mkdocstrings rendered the docstrings (not just the page's own text).
    assert "per-datum" in api.lower() and "num_particles" in api


def test_api_page_documents_the_public_api():
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: batchplate\.(\w+)", text, flags=re.M))
    assert documented == set(batchplate.__all__)


@pytest.mark.parametrize("page", ["index.md", "migration.md"])
def test_code_on_the_page_runs(page):
    blocks = [body for lang, body in _fenced((DOCS / page).read_text("utf-8")) if lang == "python"]
    assert blocks
    namespace: dict = {"__name__": f"docs_{page[:-3]}"}
    for body in blocks:
        exec(compile(body, str(DOCS / page), "exec"), namespace)


def test_troubleshooting_messages_are_the_real_ones():
    blocks = _fenced((DOCS / "troubleshooting.md").read_text("utf-8"))
    namespace: dict = {"__name__": "docs_troubleshooting"}
    checked = 0
    for i, (lang, body) in enumerate(blocks):
        if lang != "python":
            continue
        code = compile(body, str(DOCS / "troubleshooting.md"), "exec")
        if not body.startswith(RAISES):
            exec(code, namespace)
            continue
        with pytest.raises(BatchPlateError) as error:
            exec(code, namespace)
        lang_next, shown = blocks[i + 1]
        assert lang_next == "text"
        actual = f"{type(error.value).__name__}: {error.value}"
        assert _normalized(shown) == _normalized(actual), body
        checked += 1
    assert checked >= 12
