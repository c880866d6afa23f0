"""Bytecode for the package under test, as an installed wheel has it.

pip compiles a wheel's modules when it installs them; an editable install leaves that to the first
import, which writes nothing where ``PYTHONDONTWRITEBYTECODE`` is set. Every Ray worker would then compile
`resilient` from source (about 0.08 s of each actor start on a 2-core machine): a cost a user's
installation does not have, which would count against start-up and failover figures.
"""

from __future__ import annotations

import compileall
import os


def compile_resilient() -> None:
    """Write up-to-date ``.pyc`` files for every module of the installed `resilient` package."""
    import resilient

    compileall.compile_dir(os.path.dirname(resilient.__file__), quiet=1)
