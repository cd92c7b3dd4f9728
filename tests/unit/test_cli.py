"""A new user's first commands: they work, or stop at once with one message naming the flag or file at fault."""
import pytest

import pagedllm
from pagedllm.cli import main


def test_version_prints_the_package_version(capsys):
    """`pagedllm --version` (vLLM's `vllm --version`) was 'the following arguments are required: command'."""
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"pagedllm {pagedllm.__version__}"
