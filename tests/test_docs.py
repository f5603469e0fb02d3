"""The README and docs tell the truth about files: every file they link or name exists, and the bundled
examples they cite are the ones the demo ships."""
import glob
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
        "demos/examples/README.md"]
TOP = ("api", "engine", "eval", "demos", "docs", "examples", "kernels", "pruners", "serving", "tests", ".ci")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")  # [text](target) and ![alt](target)
PATH = re.compile(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|md|png|json|jsonl|yaml|sh|txt|csv|mp4|jinja|safetensors))`")
EXAMPLE = re.compile(r"\b(?:shapes|objects)_\w+\.(?:png|mp4)\b")
EXAMPLES = os.path.join(ROOT, "demos", "examples")


def read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def test_the_docs_are_found():
    assert "README.md" in DOCS and "docs/pruners.md" in DOCS and len(DOCS) >= 5


@pytest.mark.parametrize("doc", DOCS)
def test_every_linked_file_exists(doc):
    base = os.path.dirname(os.path.join(ROOT, doc))
    missing = [t for t in LINK.findall(read(doc)) if not t.startswith(("http://", "https://", "mailto:"))
               and not os.path.exists(os.path.normpath(os.path.join(base, t)))]
    assert not missing, f"{doc} links to missing files: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_repository_file_exists(doc):
    named = [p for p in PATH.findall(read(doc)) if p.split("/")[0] in TOP]
    missing = [p for p in named if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"{doc} names files that are not in the repository: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_cited_bundled_examples_are_the_shipped_ones(doc):
    shipped = set(os.listdir(EXAMPLES))
    cited = set(EXAMPLE.findall(read(doc)))
    assert cited <= shipped, f"{doc} cites examples the demo does not ship: {sorted(cited - shipped)}"


def test_every_shipped_example_is_described():
    shipped = {f for f in os.listdir(EXAMPLES) if f != "README.md"}
    assert shipped == set(EXAMPLE.findall(read("demos/examples/README.md")))


def test_the_checks_catch_a_missing_file():
    """The patterns find what the docs write: a link, a named path and an example name."""
    text = "see [x](docs/nope.png), `eval/nope.py` and shapes_green_cross.png"
    assert LINK.findall(text) == ["docs/nope.png"] and PATH.findall(text) == ["eval/nope.py"]
    assert EXAMPLE.findall(text) == ["shapes_green_cross.png"]


def test_readme_says_what_a_cpu_only_user_installs():
    text = " ".join(read("README.md").split())
    assert "What a CPU-only user installs." in text
    assert "pip install -e . --extra-index-url https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"fresh virtualenv takes [\d.]+ GB", text) and "0.76 GB" in text
