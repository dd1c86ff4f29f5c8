"""The lmms-eval entry point: ``[lmms_eval.models] mole_llava = mole_ds.eval.plugin:MANIFEST``.

lmms-eval (0.7.x) builds its model registry at import and then loads every entry point of the group
``lmms_eval.models``; the payload is a ``ModelManifest`` naming the class by import path, so the model (and
torch) is imported only when ``--model mole_llava`` is asked for.
"""
from lmms_eval.models.registry_v2 import ModelManifest

from . import MODEL_NAME

MANIFEST = ModelManifest(model_id=MODEL_NAME, simple_class_path="mole_ds.eval.mole_llava.MoLELlava")
