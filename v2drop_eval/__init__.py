"""v2drop-eval: V2Drop vision-token dropping for transformers VLMs, lmms-eval models, sweeps and tables."""

from v2drop_eval import flops
from v2drop_eval.engine import DropHandle, attach
from v2drop_eval.schedule import DropSchedule

__all__ = ["DropSchedule", "DropHandle", "attach", "flops"]
__version__ = "0.1.0"
