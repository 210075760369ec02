"""The lmms-eval plugin: ``v2drop_llava``, ``v2drop_qwen2_vl``, ``v2drop_qwen2_5_vl``, ``v2drop_qwen3_vl`` and
``v2drop_internvl``.

Registered through the ``lmms_eval.models`` entry-point group (``manifest.manifests``). This package
file stays empty of imports: lmms-eval imports the manifest on every ``import lmms_eval.models``.
"""
