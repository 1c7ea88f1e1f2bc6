"""The README and the pages under docs/: every relative link resolves, the README stays short and keeps
the two set-up commands CI runs, and the numbers the pages quote agree with the data they come from."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from test_examples import EXPECTED_EXAMPLES, github_anchors

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README] + sorted(DOCS.glob("*.md"))
USER_PAGES = ["training.md", "finetuning.md", "translation.md", "gpu.md", "reliability.md", "learning-track.md",
              "backprop.md", "benchmarks.md"]  # fmt: skip

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(markdown: str) -> str:
    """The text outside fenced code blocks and inline code spans, where links are links."""
    markdown = re.sub(r"(?ms)^\s*```.*?^\s*```[^\n]*$", "", markdown)
    return re.sub(r"`[^`\n]*`", "", markdown)


def relative_links(page: Path) -> list[str]:
    links = LINK.findall(prose(page.read_text(encoding="utf-8")))
    return [t for t in links if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not ours


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(REPO) if file.is_relative_to(REPO) else file})")
        elif anchor and (file.suffix != ".md" or anchor not in github_anchors(file.read_text(encoding="utf-8"))):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    return broken


def test_the_link_checker_finds_what_is_broken(tmp_path):
    (tmp_path / "a.md").write_text("# A\n## Two words\n[ok](#two-words) [ok](b.md#b) [bad](#nope) [bad](c.md)\n"
                                   "[bad](b.md#x) `[not a link](nowhere.md)` [web](https://example.com)\n"
                                   "```\n[in code](nowhere.md)\n```\n![img](b.md)\n", encoding="utf-8")  # fmt: skip
    (tmp_path / "b.md").write_text("# B\n", encoding="utf-8")
    assert relative_links(tmp_path / "a.md") == ["#two-words", "b.md#b", "#nope", "c.md", "b.md#x", "b.md"]
    assert [b.split(" ")[0] for b in broken_links(tmp_path / "a.md")] == ["#nope", "c.md", "b.md#x"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert not broken_links(page), f"{page.relative_to(REPO)}: broken links {broken_links(page)}"


def test_the_pages_link_to_each_other_at_all():
    assert len(relative_links(README)) >= 12 and len(relative_links(DOCS / "learning-track.md")) >= 20


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size < 15_000, f"README.md is {size:,} bytes; move detail to a page under docs/ and link it"


def test_readme_opens_with_the_two_setup_commands_ci_runs():
    readme = README.read_text(encoding="utf-8")
    top = readme.split("\n## ", 1)[0]  # before the first section
    ci_command = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert f"```bash\n{ci_command}\n```" in top, "the README's test command and .ci/run's must be the same line"
    assert "```bash\npython3 -m venv .venv && . .venv/bin/activate && pip install . && npgpt train\n```" in top


def test_readme_has_a_path_for_each_kind_of_user_and_links_every_page():
    readme = README.read_text(encoding="utf-8")
    links = set(relative_links(README))
    for page in USER_PAGES:
        assert f"docs/{page}" in links, f"README.md does not link docs/{page}"
    paths = readme.split("## Where to start", 1)[1].split("\n## ", 1)[0]
    for user, page in [("**Learning how GPT-2 trains, by hand.**", "docs/learning-track.md"),
                       ("**Training on a GPU.**", "docs/gpu.md"),
                       ("**Checking gradients, yours included.**", "docs/backprop.md#checking-a-derivation")]:  # fmt: skip
        start = paths.index(user)
        section = paths[start : paths.find("\n**", start + 1) if "\n**" in paths[start + 1 :] else len(paths)]
        assert f"]({page})" in section, f"the path {user} does not link {page}"


# --- the lecture map ---------------------------------------------------------------------------------

TRACK = DOCS / "learning-track.md"
LECTURE = ["实验任务 19-20", "实验任务 21", "实验任务 22", "GPT 模型", "实验任务 24-25", "实验任务 26", "实验任务 27",
           "实验任务 28", "课后作业"]  # fmt: skip


def slug(heading: str) -> str:
    (anchor,) = github_anchors(f"# {heading}")
    return anchor


def test_the_lecture_map_gives_each_task_its_example_command_and_derivation():
    text = TRACK.read_text(encoding="utf-8")
    headings = re.findall(r"(?m)^### (.+)$", text.split("## All fifteen scripts")[0])
    assert len(headings) == len(LECTURE)
    for heading, task in zip(headings, LECTURE):
        assert heading.startswith(task), f"{heading!r} should be the lecture's {task!r}"
        chinese, english = heading.split(" (", 1)
        assert re.search(r"[\u4e00-\u9fff]", chinese) and re.fullmatch(r"[A-Z][\w ,:-]+[a-z]\)", english), (
            f"{heading!r}: a heading in Chinese, then in English in parentheses")
        body = text.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        examples = re.findall(r"examples/(\d\d_\w+\.py)", body)
        assert examples and all(name in EXPECTED_EXAMPLES for name in examples), heading
        assert re.search(r"Commands?: `(python examples/\d\d_\w+\.py|npgpt \w+)", body), f"{heading}: no command"
        assert re.search(r"Derivations?: .*(\]\(backprop\.md#|no gradient|forward only)", body, re.S), (
            f"{heading}: no section of backprop.md")
    table = text.split("## 实验任务对照", 1)[1].split("\n### ", 1)[0]
    assert re.findall(r"^\| \[[^\]]+\]\(#([^)]+)\)", table, re.M) == [slug(h) for h in headings]


# --- numbers quoted from data ---------------------------------------------------------------------------


def test_the_book_comparison_is_at_the_same_step():
    """docs/training.md compares npgpt with the book at the book's last published step (85), and names
    npgpt's own last evaluation (step 90, book step 89) as such: the numbers are docs/book-ch5.json's."""
    spec = importlib.util.spec_from_file_location("book_ch5", REPO / "benchmarks" / "book_ch5.py")
    book_ch5 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(book_ch5)
    evals = {int(e[0]): e for e in json.loads((DOCS / "book-ch5.json").read_text(encoding="utf-8"))["npgpt"]["evals"]}
    last_book = max(book_ch5.BOOK)
    assert last_book == 85 and max(evals) == 89  # the book's step s is npgpt's step s + 1
    ours, theirs = evals[last_book], book_ch5.BOOK[last_book]
    text = re.sub(r"\s+", " ", (DOCS / "training.md").read_text(encoding="utf-8"))
    assert (f"at the book's last published step ({last_book}) npgpt's train loss (evaluated) is {ours[1]:.2f} and its "
            f"val loss {ours[2]:.2f}, against the book's {theirs[0]:.2f} and {theirs[1]:.2f}") in text
    assert f"the run ends one evaluation later, at step 90, at {evals[89][1]:.2f} / {evals[89][2]:.2f}" in text
    worst = max(abs(evals[s][2] - book_ch5.BOOK[s][1]) for s in book_ch5.BOOK)
    assert f"every val point lies within {round(worst, 2):.2f} of the book's" in text


def test_the_instruction_loss_is_described_as_one_token_weighted_mean():
    """Issue 30: not "the mean over the response tokens" (the end token counts; one mean over the batch)."""
    for path in [DOCS / "finetuning.md", DOCS / "backprop.md", REPO / "examples" / "15_instruction_finetuning.py"]:
        text = re.sub(r"\s+", " ", path.read_text(encoding="utf-8"))
        assert "the mean over the response tokens" not in text, path.name
        assert "end token" in text and ("token-weighted" in text or "weighs an example by its number" in text), path.name
