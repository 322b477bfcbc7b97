"""The README's generated parts stay equal to the code they describe."""

from conftest import REPO


def test_readme_argument_table_matches_code():
    from megatune.argmap.table import BEGIN, END, markdown_table

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert BEGIN in readme and END in readme, "README.md lost its argmap table markers"
    embedded = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert embedded == markdown_table(), "README.md's table is stale: paste `python -m megatune.argmap.table`"


def test_readme_shows_the_two_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "pip install nox && nox -s demo" in readme and "nox -s tests" in readme
