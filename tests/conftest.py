"""Shared test set-up: offline hub, and the tiny lmms-eval assets built once per session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# Never reach the hub: every model, tokenizer and data set in the tests is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny saved LLaVA / Qwen2-VL / Qwen2.5-VL checkpoints and the ``tiny_textvqa`` / ``tiny_mme``
    tasks (see ``tools/smoke_assets.py``)."""
    from tools.smoke_assets import build_tiny_assets

    return build_tiny_assets(Path(tmp_path_factory.mktemp("tiny_assets")))
