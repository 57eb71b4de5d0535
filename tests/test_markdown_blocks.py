"""The README test's own machinery: the block convention and how blocks run."""

from __future__ import annotations

import os
import sys

import pytest

from tests.markdown_blocks import BlockFailed, Session, parse

MARKED = """\
# Title

<!-- test: file greet.py -->
```python
print("hello from a file")
```

<!-- test: run -->

```sh
python3 greet.py
```

<!-- test: output -->
```text
hello from a file
```

<!-- test: run -->
```python
total = 40
```

<!-- test: run -->
```py
print(total + 2)
```

<!-- test: output -->
```text
42
```

```json
{"needs": "no marker"}
```

<!-- test: skip shown, never run -->
```sh
exit 1
```
"""


def test_a_marked_document_has_no_problems():
    document = parse(MARKED)
    assert document.problems == []
    assert [(b.line, b.language, b.action) for b in document.blocks] == [
        (4, "python", "file"), (10, "sh", "run"), (15, "text", "output"),
        (20, "python", "run"), (25, "py", "run"), (30, "text", "output"),
        (34, "json", None), (39, "sh", "skip")]
    assert document.blocks[-1].argument == "shown, never run"


@pytest.mark.parametrize("text, problem", [
    ("```sh\nls\n```\n", "line 1 (sh block): no test marker"),
    ("```python\nx = 1\n```\n", "line 1 (python block): no test marker"),
    ("<!-- test: skip -->\n```sh\nls\n```\n", "`skip` needs a reason"),
    ("<!-- test: file -->\n```python\nx = 1\n```\n", "`file` needs a file name"),
    ("<!-- test: runn -->\n```sh\nls\n```\n", "unknown test marker 'runn'"),
    ("<!-- test: node -->\n```python\nx = 1\n```\n", "a node is started by a shell block"),
    ("<!-- test: run -->\nSome prose.\n\n```text\nx\n```\n",
     "line 1: a test marker with no block after it"),
])
def test_a_block_that_breaks_the_convention_is_reported(text, problem):
    problems = parse(text).problems
    assert len(problems) == 1 and problem in problems[0], problems


def session(tmp_path):
    environment = dict(os.environ, ORCH8_BIND="127.0.0.1:9")
    return Session(tmp_path / "DOC.md", tmp_path, environment)


def test_blocks_run_in_order_sharing_files_and_a_namespace(tmp_path):
    runner = session(tmp_path)
    for block in parse(MARKED).blocks:
        runner.run(block)
    assert (tmp_path / "greet.py").read_text() == 'print("hello from a file")\n'
    assert (tmp_path / ".venv").resolve() == __import__("pathlib").Path(sys.prefix).resolve()
    assert runner.namespace["total"] == 40


def test_a_failing_command_names_its_line(tmp_path):
    block = parse("\n<!-- test: run -->\n```sh\necho about to fail\nfalse\necho never\n```\n")
    with pytest.raises(BlockFailed, match=r"DOC.md line 3 \(sh block\): exit code 1"):
        session(tmp_path).run(block.blocks[0])


def test_output_that_differs_fails(tmp_path):
    blocks = parse("<!-- test: run -->\n```sh\necho 41\n```\n"
                   "<!-- test: output -->\n```text\n42\n```\n").blocks
    runner = session(tmp_path)
    runner.run(blocks[0])
    with pytest.raises(BlockFailed, match="printed\n41\nnot\n42"):
        runner.run(blocks[1])


def test_a_python_traceback_points_into_the_document(tmp_path):
    block = parse("text\n\n<!-- test: run -->\n```python\nx = 1\nraise ValueError(x)\n```\n")
    with pytest.raises(ValueError) as raised:
        session(tmp_path).run(block.blocks[0])
    frame = raised.traceback[-1]
    assert (str(frame.path), frame.lineno + 1) == (str(tmp_path / "DOC.md"), 6)
