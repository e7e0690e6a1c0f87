"""The README's Python API example runs as written (up to the parts that need local files)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    text = README.read_text()
    block = re.search(r"## Python API\s+```python\n(.*?)```", text, re.S).group(1)
    runnable = block.split("# Start from timm/DeiT weights")[0]  # the rest reads files that tests do not have
    assert "DynamicExecutor" in runnable and "policy=policy" in runnable
    namespace: dict = {}
    exec(compile(runnable, str(README), "exec"), namespace)
    executed = namespace["executed"]
    assert executed.batch_size == namespace["x"].shape[0]
    assert set(executed.keep[:, 1:].flatten().tolist()) <= {0.5, 0.9}
