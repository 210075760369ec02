"""Sweeps over the plugin: a YAML config expanded into points (``config``, ``fields``, ``points``), each point
one lmms-eval run (``point``) in a resumable sweep folder (``layout``, ``pointcheck``), run inline
(``runner``) or as submitit jobs on this machine or SLURM (``jobs``, ``dispatch``), and followed with
``status``. Imports the engine, the methods and the plugin's side-car; nothing above it."""
