"""The embedded demo: a synthetic VQA benchmark and tiny trained LLaVA / Qwen2-VL models.

Everything ships inside the package, so a CPU with no model hub can run the whole project:
``python -m v2drop_eval.demo paths`` prints the model folders, the lmms-eval ``--include_path`` and the
task names as JSON. The models were trained by ``python -m v2drop_eval.demo.train`` (``make train-demo``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_DIR", "MODELS_DIR", "TASKS_DIR", "TASKS", "model_path", "paths"]

DEMO_DIR = Path(__file__).resolve().parent
MODELS_DIR = DEMO_DIR / "models"
TASKS_DIR = DEMO_DIR / "tasks"
TASKS = ["v2drop_demo_vqa"]
FAMILIES = ("llava", "qwen2_vl")


def model_path(family: str) -> Path:
    """Folder of the shipped demo model of ``family`` (``llava`` or ``qwen2_vl``)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return MODELS_DIR / family


def paths() -> dict[str, object]:
    """Model folders, the lmms-eval include path and task names, as absolute strings."""
    return {
        "llava": str(model_path("llava")),
        "qwen2_vl": str(model_path("qwen2_vl")),
        "include_path": str(TASKS_DIR),
        "tasks": list(TASKS),
    }
