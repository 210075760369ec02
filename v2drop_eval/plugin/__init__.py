"""The lmms-eval plugin, above the methods: the model classes (``v2drop_llava``, ``v2drop_qwen2_vl``,
``v2drop_qwen2_5_vl``, ``v2drop_qwen3_vl``, ``v2drop_internvl``; ``base``, one file per parent), their model
arguments (``args``), the entry-point manifest (``manifest``), the per-call timer (``timer``) and the side-car
schema (``sidecar``). Imports the engine and the methods; nothing above it.

Registered through the ``lmms_eval.models`` entry-point group (``manifest.manifests``). This package
file stays empty of imports: lmms-eval imports the manifest on every ``import lmms_eval.models``.
"""
