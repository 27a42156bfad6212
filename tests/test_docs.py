"""The documentation site builds offline with ``mkdocs build --strict``, and its code runs.

- the build: every page of the nav exists, every link and every ``::: batchplate.X``
  reference resolves (``--strict`` turns warnings into errors), with the network
  made unreachable through a dead proxy, so a plugin that fetches fails the test;
- the API page documents every public name of ``batchplate``;
- no page of the built site shows raw Sphinx/reST markup (roles, directives,
  ``::`` before a code block), math is emitted in arithmatex's form, and the
  KaTeX that typesets it is a local file of the site, never a CDN;
- public docstrings put their prose before their ``:param:`` fields (the API
  page's parser gives whatever follows the fields to the last one);
- docs, README and tools cite the Contract page (docs/contract.md) and Pyro
  issue #2220, not internal notes;
- the code of the migration guide and of the home page runs, in order;
- every error of the troubleshooting page is raised by its program, with the
  message the page shows.
"""

from __future__ import annotations

import inspect
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


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once per module with ``--strict`` and the network made unreachable."""
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
    site = tmp_path_factory.mktemp("docs") / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return site


def _pages(site: Path) -> dict[str, str]:
    """Every built HTML page (the vendored assets excluded), by path in the site."""
    return {
        str(path.relative_to(site)): path.read_text(encoding="utf-8")
        for path in sorted(site.rglob("*.html"))
        if "assets" not in path.relative_to(site).parts
    }


def test_site_builds_strict_and_offline(site):
    pages = ("index", "why", "migration", "objectives", "contract", "troubleshooting", "api", "vae")
    for page in pages:
        assert (site / ("index.html" if page == "index" else f"{page}/index.html")).is_file()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    # mkdocstrings rendered the docstrings (not just the page's own text).
    assert "per-datum" in api.lower() and "num_particles" in api


# Raw reST that mkdocstrings passes through when a docstring is written for Sphinx.
RST_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|math|obj|exc|ref|py:\w+):`?")
RST_DIRECTIVE = re.compile(r"(?<![.\w])\.\. (?:math|code|code-block|note|warning|seealso)\b")
PRE = re.compile(r"<pre\b.*?</pre>", flags=re.S)
CODE = re.compile(r"<code\b.*?</code>", flags=re.S)
PARAGRAPH = re.compile(r"<p\b[^>]*>(.*?)</p>", flags=re.S)
TAG = re.compile(r"<[^>]+>")


def test_no_raw_sphinx_markup_on_any_page(site):
    """Docstrings are Markdown with ``:param:``/``:returns:`` fields: no role, no
    directive, no paragraph ending in ``::``, no stray double backticks reach a page
    (code blocks aside)."""
    problems = []
    for name, html in _pages(site).items():
        text = PRE.sub("", html)
        problems += [f"{name}: role {m.group(0)!r}" for m in RST_ROLE.finditer(text)]
        problems += [f"{name}: directive {m.group(0)!r}" for m in RST_DIRECTIVE.finditer(text)]
        # Backticks left in the text: a ``literal`` or a broken code fence.
        for line in TAG.sub("", CODE.sub("", text)).splitlines():
            if "``" in line:
                problems.append(f"{name}: raw backticks: {line.strip()!r}")
        for paragraph in PARAGRAPH.findall(text):
            for line in TAG.sub("", paragraph).splitlines():
                if line.rstrip().endswith("::"):
                    problems.append(f"{name}: paragraph line ending in '::': {line.strip()!r}")
    assert not problems, "\n".join(problems)


def test_math_is_typeset_by_a_local_katex(site):
    pages = _pages(site)
    # pymdownx.arithmatex (generic) wraps math for the browser to typeset.
    for page in ("contract/index.html", "objectives/index.html", "api/index.html"):
        assert 'class="arithmatex"' in pages[page], page
    # No display math left raw (a $$ block the Markdown did not see as one).
    raw = [name for name, html in pages.items() if "$$" in CODE.sub("", PRE.sub("", html))]
    assert not raw, raw
    katex = ("assets/katex/katex.min.js", "assets/katex/contrib/auto-render.min.js")
    for name, html in pages.items():
        # Nothing is loaded from the network: no remote script or stylesheet.
        remote = re.findall(r"<(?:script|link)\b[^>]*(?:src|href)=\"(?:https?:)?//[^\"]*", html)
        remote = [tag for tag in remote if "stylesheet" in tag or "<script" in tag]
        assert not remote, (name, remote)
        if 'class="arithmatex"' in html:
            for asset in katex + ("assets/javascripts/katex-init.js",):
                assert asset in html, (name, asset)
    for asset in katex + ("assets/katex/katex.min.css", "assets/katex/LICENSE"):
        assert (site / asset).is_file(), asset
    # The fonts the stylesheet names first (woff2) are in the site.
    css = (site / "assets/katex/katex.min.css").read_text(encoding="utf-8")
    fonts = set(re.findall(r"url\((fonts/[\w-]+\.woff2)\)", css))
    assert fonts and all((site / "assets/katex" / font).is_file() for font in fonts)


# Internal notes users of the package do not have, and an old nickname for
# Pyro issue #2220 and its programs ("seed" as a random seed is fine).
INTERNAL = re.compile(r"design[.]md|\bthe[ ]seed\b(?!-)|\bseed[']s\b|\bseed[ ]discussion", re.I)


def test_docs_cite_the_contract_page_not_internal_notes():
    files = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md", ROOT / "mkdocs.yml"]
    files += [*sorted((ROOT / "tools").glob("*.py")), Path(__file__), ROOT / "tests/test_readme.py"]
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if INTERNAL.search(line)
    ]
    assert not hits, "\n".join(hits)
    contract = (DOCS / "contract.md").read_text(encoding="utf-8")
    assert "https://github.com/pyro-ppl/pyro/issues/2220" in contract


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


FIELDS = (":param", ":returns", ":return:", ":raises", ":type", ":rtype", ":yields")


def _public_docstrings():
    for name in batchplate.__all__:
        obj = getattr(batchplate, name)
        yield name, inspect.getdoc(obj)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                function = member.fget if isinstance(member, property) else member
                if callable(function):
                    yield f"{name}.{attr}", inspect.getdoc(function)


def test_docstring_prose_comes_before_the_fields():
    """The Sphinx-style parser of the API page gives every line after a `:param:`
    field to the fields: prose placed after them shows up inside the last
    parameter's description."""
    late = []
    for name, doc in _public_docstrings():
        in_fields = False
        for line in (doc or "").splitlines():
            if line.startswith(FIELDS):
                in_fields = True
            elif in_fields and line.strip() and not line.startswith((" ", ":")):
                late.append(f"{name}: {line.strip()}")
                break
    assert not late, "\n".join(late)
