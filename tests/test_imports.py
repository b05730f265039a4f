"""The embedded defaults load no client of an optional backend: botocore and asyncpg cost
about 10 MiB of every process's memory, and only S3 or PostgreSQL needs them."""

from __future__ import annotations

import subprocess
import sys

OPTIONAL = ("botocore", "aiobotocore", "asyncpg")


def test_serving_on_the_defaults_imports_no_optional_backend() -> None:
    code = (
        "import sys\n"
        "import regproxy.cli, regproxy.server, regproxy.app\n"
        "from regproxy.app import create_app\n"
        "from regproxy.config import load_config\n"
        "create_app(load_config(None, env={}))\n"
        f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
