"""The README's code examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_quick_start_is_two_commands():
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    first_para = quick.split("The first sets", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", first_para, flags=re.S)
    assert [b.strip() for b in blocks] == [
        "bash scripts/lab.sh",
        "bash scripts/test.sh",
    ]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci


def test_readme_tre_snippet_runs():
    block = _python_blocks()[0]
    block = block.replace("151_936", "2_000")  # same code, a smaller vocabulary for a quick test
    exec(compile(block, "README-tre", "exec"), {})


def test_readme_ppo_example_runs(capsys):
    block = next(b for b in _python_blocks() if "README-EXAMPLE" in b)
    exec(compile(block, "README-ppo", "exec"), {})
    out = capsys.readouterr().out
    for kind in ("none", "entropy", "tre-k", "tre-p", "forking", "kl-cov", "clip-cov"):
        assert re.search(rf"^{re.escape(kind)}\s+policy loss", out, flags=re.M), kind
