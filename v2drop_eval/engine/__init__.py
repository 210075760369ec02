"""The engine, the bottom layer: forward pre-hooks on a stock transformers VLM that drop vision tokens
inside its decoder (``hooks``) and what they rest on: the method contract (``method``), the signals methods
score with (``signals``), gathering inputs and masks (``gather``), accounting and FLOPs (``accounting``,
``flops``), the dropper's clock (``clock``), the transformers internals it reads (``contract``) and refuses
(``refusals``), the model families and their adapters (``families``, ``adapters``, ``deepstack``), the
schedule type (``schedule``) and atomic writes (``atomic``). It knows no method by name and imports nothing
else of the package."""
