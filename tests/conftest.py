"""Shared test set-up: offline hub, the tiny lmms-eval assets built once (cached by content hash), and
the tier's wall time at the end of a run."""

from __future__ import annotations

import hashlib
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest

# Never reach the hub: every model, tokenizer and data set in the tests is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# What the assets are a function of: their builder and the libraries that write them.
ASSET_INPUTS = (REPO / "tools" / "smoke_assets.py",)
ASSET_LIBRARIES = ("torch", "transformers", "tokenizers", "datasets", "av")


def assets_key() -> str:
    """Content hash of the tiny assets' inputs: the builder's source and the writing libraries' versions."""
    h = hashlib.sha256()
    for path in ASSET_INPUTS:
        h.update(path.read_bytes())
    for lib in ASSET_LIBRARIES:
        try:
            h.update(f"{lib}=={version(lib)};".encode())
        except PackageNotFoundError:
            h.update(f"{lib} absent;".encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_assets() -> dict[str, Any]:
    """Tiny saved LLaVA / Qwen2-VL / Qwen2.5-VL / Qwen3-VL / InternVL / OneVision checkpoints and the
    ``tiny_textvqa`` / ``tiny_mme`` / ``tiny_video`` tasks (see ``tools/smoke_assets.py``), built once under
    ``build/test-assets/<content hash>`` (``V2DROP_TEST_CACHE`` moves it) and reused by later sessions,
    the smoke sweep and the lmms-eval runs. Read-only for tests."""
    from filelock import FileLock

    from tools.smoke_assets import build_tiny_assets

    root = Path(os.environ.get("V2DROP_TEST_CACHE", REPO / "build" / "test-assets")) / assets_key()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):  # two sessions at once: one builds, the other waits and reuses
        return build_tiny_assets(root)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_START] = time.monotonic()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line naming the tier that ran (from -m) and its wall time, for `make test` / `make test-all`."""
    start = config.stash.get(_START, None)
    if start is None:
        return
    tier = os.environ.get("V2DROP_TEST_TIER") or (f"-m {config.option.markexpr!r}" if config.option.markexpr else "this run")
    terminalreporter.write_line(f"{tier}: {time.monotonic() - start:.0f} s wall")


_START = pytest.StashKey[float]()
