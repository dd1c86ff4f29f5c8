"""lmms-eval 0.7.3 with filelock 4.

``lmms_eval.evaluator._enable_reentrant_filelocks`` (run by every ``simple_evaluate``) imports
``filelock._api`` to patch ``FileLockMeta.__call__``; filelock 4 moved that metaclass to
``filelock._core._singleton`` and removed ``_api``, so every evaluation fails with ModuleNotFoundError.
Pinning filelock<4 would downgrade a package torch, datasets and huggingface_hub share; instead, when
``_api`` is missing, the module that now holds ``FileLockMeta`` is registered under the old name (the patch
reads only ``FileLockMeta`` and, with a default, ``_UNSET_FILE_MODE``). Nothing changes under filelock 3.
"""
from __future__ import annotations

import importlib
import sys


def alias_filelock_api() -> None:
    """Make ``import filelock._api`` find ``FileLockMeta`` (idempotent; a no-op where ``_api`` exists)."""
    try:
        importlib.import_module("filelock._api")
        return
    except ImportError:
        pass
    singleton = importlib.import_module("filelock._core._singleton")
    if not hasattr(singleton, "FileLockMeta"):
        raise ImportError("filelock has neither filelock._api nor filelock._core._singleton.FileLockMeta; "
                          "lmms-eval 0.7.3 cannot run with this filelock version")
    sys.modules["filelock._api"] = singleton
