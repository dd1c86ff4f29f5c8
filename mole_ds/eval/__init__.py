"""Evaluation of an exported MoLE model with lmms-eval (the optional ``eval`` extra).

* ``mole_llava`` (:mod:`mole_ds.eval.mole_llava`): an lmms-eval model, registered through the Python
  entry-point group ``lmms_eval.models`` (:mod:`mole_ds.eval.plugin`), so that
  ``lmms-eval --model mole_llava --model_args pretrained=<base>,mole=<export> --tasks <task>`` runs it. It
  loads and prompts through :mod:`mole_ds.inference`, the library behind ``tools/generate.py``.
* ``tasks/``: lmms-eval task definitions whose data are local files (the template for a user's own data);
  give the folder to lmms-eval with ``--include_path $(python -m mole_ds.eval tasks-dir)``.
* :mod:`mole_ds.eval.routing`: per-domain routing statistics of the evaluated samples.

Importing this package needs neither lmms-eval nor torch.
"""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""The folder of the bundled local tasks (``--include_path`` for lmms-eval)."""
MODEL_NAME = "mole_llava"
