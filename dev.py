#!/usr/bin/env python3
"""Set up a development environment and run the example or the tests.

Usage::

    python3 dev.py example            # run examples/score_pipeline.py
    python3 dev.py test [pytest args]  # run the test suite, e.g. `python3 dev.py test -q -k s3`

Both create or reuse ``.venv`` next to this file, install the tested torch on its own first (a pip
call that resolves torch together with other requirements may pick a multi-GB CUDA build), then
``pip install -e '.[dev]'``. The installs are skipped while ``.venv`` holds a stamp matching the
current pyproject.toml and dev.py. The package's bytecode is then brought up to date (``compileall``). pip itself is never upgraded. Needs only Python 3.10+ and its
standard library; reads no input, so it runs unattended (CI).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".resilient-dev-stamp"
TORCH = "torch==2.13.0"  # the tested version
EXAMPLE = ROOT / "examples" / "score_pipeline.py"
USAGE = "usage: python3 dev.py {example|test} [pytest args...]"


def say(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def venv_python() -> Path:
    if os.name == "nt":
        return VENV / "Scripts" / "python.exe"
    return VENV / "bin" / "python"


def requirements_hash() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "dev.py"):
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    return digest.hexdigest()


def run(args: list[str], **kwargs: object) -> int:
    return subprocess.call(args, cwd=ROOT, **kwargs)  # type: ignore[arg-type]


def pip_install(*requirements: str) -> None:
    args = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    rc = run([*args, *requirements], stdin=subprocess.DEVNULL)
    if rc != 0:
        say(f"pip install {' '.join(requirements)} failed (exit {rc})")
        sys.exit(rc)


def ensure_environment() -> Path:
    python = venv_python()
    if not python.exists():
        say(f"creating virtual environment {VENV}")
        rc = run([sys.executable, "-m", "venv", str(VENV)], stdin=subprocess.DEVNULL)
        if rc != 0:
            say(f"python -m venv failed (exit {rc})")
            sys.exit(rc)
    else:
        say(f"using virtual environment {VENV}")
    wanted = requirements_hash()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        say("dependencies up to date (stamp matches), skipping installs")
        return python
    say(f"installing {TORCH} (on its own, so pip picks the plain wheel)")
    pip_install(TORCH)
    say("installing resilient in editable mode with the dev extra")
    pip_install("-e", ".[dev]")
    STAMP.write_text(wanted + "\n")
    say(f"wrote stamp {STAMP.relative_to(ROOT)}")
    return python


def compile_package(python: Path) -> None:
    """Write resilient's bytecode, as installing a wheel does. An editable install leaves it to the first
    import, which writes nothing where PYTHONDONTWRITEBYTECODE is set: every Ray worker would then compile
    the package from source when it starts. Quick when nothing changed."""
    run([str(python), "-m", "compileall", "-q", "resilient"], stdin=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip() if argv else USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in ("example", "test"):
        print(f"dev.py: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    if command == "example" and rest:
        print(f"dev.py: `example` takes no arguments\n{USAGE}", file=sys.stderr)
        return 2
    python = ensure_environment()
    compile_package(python)
    if command == "example":
        args = [str(python), str(EXAMPLE)]
    else:
        args = [str(python), "-m", "pytest", *rest]
    say("running " + " ".join(args[1:]))
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
