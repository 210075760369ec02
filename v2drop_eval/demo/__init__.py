"""The embedded demo: two synthetic benchmarks and tiny trained LLaVA / Qwen2-VL models for each.

Everything ships inside the package, so a CPU with no model hub can run the whole project:
``python -m v2drop_eval.demo paths`` prints the model folders, the lmms-eval ``--include_path`` and the
task names as JSON. ``vqa`` (``data.py``, task ``v2drop_demo_vqa``): 1-5 shapes on a plain background,
models trained by ``python -m v2drop_eval.demo.train`` (``make train-demo``). ``scenes`` (``scenes.py``,
task ``v2drop_demo_scenes``): five sub-tasks on scenes of 1-40 objects, models trained by
``python -m v2drop_eval.demo.train_scenes`` (``make train-demo-scenes``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_DIR", "MODELS_DIR", "TASKS_DIR", "TASKS", "BENCHMARKS", "model_path", "paths"]

DEMO_DIR = Path(__file__).resolve().parent
MODELS_DIR = DEMO_DIR / "models"
TASKS_DIR = DEMO_DIR / "tasks"
# benchmark -> its lmms-eval task; the models of benchmark B live in models/<prefix><family>.
BENCHMARKS = {"vqa": "v2drop_demo_vqa", "scenes": "v2drop_demo_scenes"}
TASKS = list(BENCHMARKS.values())
FAMILIES = ("llava", "qwen2_vl")
_PREFIX = {"vqa": "", "scenes": "scenes_"}


def model_path(family: str, benchmark: str = "vqa") -> Path:
    """Folder of the shipped demo model of ``family`` (``llava`` or ``qwen2_vl``) for ``benchmark``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {tuple(BENCHMARKS)}, got {benchmark!r}")
    return MODELS_DIR / f"{_PREFIX[benchmark]}{family}"


def paths() -> dict[str, object]:
    """Model folders (``llava``, ``qwen2_vl``: the vqa benchmark's; ``scenes_llava``, ``scenes_qwen2_vl``),
    the lmms-eval include path and task names, as absolute strings."""
    models = {f"{_PREFIX[b]}{f}": str(model_path(f, b)) for b in BENCHMARKS for f in FAMILIES}
    return {**models, "include_path": str(TASKS_DIR), "tasks": list(TASKS)}
