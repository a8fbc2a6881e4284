import re

from conftest import REPO

from rsoft_nlp import patched_layers


def notebook_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## In a notebook") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_notebook_example_runs_on_the_local_minilm(minilm_dir, tmp_path, monkeypatch):
    code = notebook_example()
    assert '"bert-base-uncased"' in code
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code.replace('"bert-base-uncased"', repr(str(minilm_dir))), "README.md", "exec"), namespace)

    assert 0.1 < namespace["stats"]["overall"] < 0.35 and len(namespace["stats"]["layers"]) == 6
    assert (tmp_path / "my-model" / "config.json").is_file()
    assert patched_layers(namespace["model"]) == {} and not hasattr(namespace["model"].config, "rsoftmax")
