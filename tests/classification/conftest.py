# SPDX-License-Identifier: Apache-2.0
"""Makes this folder's helper module (``classification_testlib``) importable, also in the processes
that the data-parallel test spawns (spawn passes ``sys.path`` on); tests run with
``--import-mode=importlib``, which puts nothing on ``sys.path``."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
