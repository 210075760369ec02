"""``v2drop-eval bench``: prefill / decode speed against the FLOPs limit and the dropper's own cost on
random-weight models of real shapes (``shapes``, ``run``), summarised with paired intervals and verdicts
(``report``); the GPU suite (``gpu``: torch, transformers and this source only). Imports the methods and the
report layer's statistics; nothing above it."""
