"""The side-car: one JSON line per generated sample (latency, tokens per layer, FLOPs, KV bytes), its
schema version, its file names, where it goes, and how it is written and read. Every module that names the
side-car imports it from here. Light (no torch): the sweep and the tables read side-cars without loading it.

Written by :class:`SampleLog`, all records so far each time, atomically (a temporary file in the same folder,
then ``os.replace``), so a reader never sees half a file.

Version 4 adds the vision encoder: ``vision_ms`` (its forwards of the batch, inside ``prefill_ms``, from the
dropper's encoder hooks, CUDA events on a GPU), ``vision_flops`` per sample (``flops.VISION_CONVENTION``),
``encoder_tokens_per_layer``, ``llm_vision_tokens`` (the vision tokens that reach the LLM, fewer than
``vision_tokens`` when tokens are removed before it) and ``positions`` (how those tokens are positioned).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from v2drop_eval.engine import flops
from v2drop_eval.engine.atomic import write_text_atomic

if TYPE_CHECKING:
    from v2drop_eval.plugin.timer import GenerateCall

__all__ = ["SIDECAR_VERSION", "SIDECAR_SUFFIX", "SIDECAR_GLOB", "SampleLog", "sample_records", "summarize",
           "write_jsonl_atomic", "read_sidecar", "is_sidecar", "find_lmms_eval_run", "sidecar_path",
           "prepare_sidecar", "doc_complexity", "DOC_FIELDS"]

# Version of the record layout (``sidecar_version`` in every record); records without it are version 1.
# 3: ``options`` (the method's named options, null: its authors' rule); records before 3 carry no ``options``
# and ran the project's earlier counts and positions (docs/methods.md, "Checked token by token against the originals").
# 4: the vision encoder's fields (see above).
# 5: the item's own description, ``DOC_FIELDS`` (null where the task's documents have none); records before 5
# carry ``n_objects`` only.
SIDECAR_VERSION = 5
SIDECAR_SUFFIX = "_v2drop_samples.jsonl"
# Every side-car of a run (ranks included); not lmms-eval's own samples_<task>.jsonl (a task may be named v2drop_*).
SIDECAR_GLOB = "*_v2drop_samples*.jsonl"
# Fields of a task's documents that describe the item, copied into its record where the document has them
# (the demo benchmarks do): what the tables break accuracy down by (v2drop_eval.report.breakdown) and what kept
# tokens are plotted against. ``n_objects`` is an integer, the others are labels.
DOC_FIELDS = ("subtask", "qtype", "n_objects", "background", "object_scale")


def is_sidecar(path: Path) -> bool:
    """Whether ``path`` is one of our side-cars (rather than an lmms-eval ``--log_samples`` file)."""
    return path.match(SIDECAR_GLOB)


# (path, mtime_ns, size) -> parsed lines: the sweep re-checks every point after each one finishes.
_CACHE: dict[tuple[str, int, int], tuple[list[dict[str, Any]], int]] = {}


def read_sidecar(path: Path) -> tuple[list[dict[str, Any]], int]:
    """``(records, corrupt line count)`` of a side-car JSONL; raises ``OSError`` if unreadable."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        rows, bad = [], 0
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
        if len(_CACHE) > 256:
            _CACHE.clear()
        _CACHE[key] = (rows, bad)
    return _CACHE[key]


def doc_complexity(doc: Any) -> dict[str, Any]:
    """What kind of item a sample is and how busy its image is, for the tables' breakdowns and plots of
    kept tokens against content (adaptive budgets).

    ``DOC_FIELDS``: the document's own values where the task has them (the demo benchmarks; None
    otherwise; a value of the wrong kind is left out); ``image_edge_density``: share of pixels of the first
    image whose grey-level gradient exceeds 0.1 (images scaled to at most 256 pixels a side first, so the
    figure does not depend on resolution).
    """
    out: dict[str, Any] = {**dict.fromkeys(DOC_FIELDS), "image_edge_density": None}
    if not hasattr(doc, "get"):
        return out
    for key in DOC_FIELDS:
        value = doc.get(key)
        if key == "n_objects":
            if value is not None and not isinstance(value, bool):
                try:
                    out[key] = int(value)
                except (TypeError, ValueError):
                    pass
        elif isinstance(value, str) and value:
            out[key] = value
    image = _first_image(doc)
    if image is not None:
        import numpy as np

        gray = image.convert("L")
        gray.thumbnail((256, 256))
        a = np.asarray(gray, dtype=np.float32) / 255.0
        if a.shape[0] > 1 and a.shape[1] > 1:
            gx, gy = np.abs(np.diff(a, axis=1))[:-1], np.abs(np.diff(a, axis=0))[:, :-1]
            out["image_edge_density"] = round(float((np.hypot(gx, gy) > 0.1).mean()), 6)
    return out


def _first_image(doc: Any) -> Any:
    from PIL import Image

    for value in doc.values() if hasattr(doc, "values") else ():
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], Image.Image):
            return value[0]
    return None


def sample_records(call: GenerateCall, rows: Sequence[tuple[str, int]], meta: dict[str, Any],
                   text_config: Any, docs: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One side-car record per row of a measured ``generate`` call.

    ``rows``: ``(task, doc_id)`` in batch order. ``meta``: the run's description (model, method, ...).
    ``docs``: per row, extra fields (e.g. :func:`doc_complexity`) merged into the record.
    """
    out = []
    for b, (task, doc_id) in enumerate(rows):
        st = call.stats[b] if b < len(call.stats) else {}
        per_layer = st.get("vision_per_layer")
        tokens = st.get("tokens_per_layer")
        rec: dict[str, Any] = {"task": task, "doc_id": doc_id, "sidecar_version": SIDECAR_VERSION, **meta,
                               **(docs[b] if docs else {})}
        rec.update({
            "batch_size": len(rows),
            "prefill_ms": call.prefill_ms,
            "prefill_forward_ms": call.prefill_forward_ms,
            "decode_ms": call.decode_ms,
            "decode_steps": call.decode_steps,
            "generated_tokens": call.generated_tokens[b] if b < len(call.generated_tokens) else None,
            "total_ms": call.total_ms,
            "vision_tokens": st.get("vision_tokens"),
            "llm_vision_tokens": st.get("llm_vision_tokens"),
            "video_tokens": st.get("video_tokens"),
            "text_tokens": st.get("text_tokens"),
            "vision_per_layer": per_layer,
            "avg_vision_tokens": sum(per_layer) / len(per_layer) if per_layer else None,
            "tokens_per_layer": tokens,
            "prefill_flops": flops.prefill_flops(text_config, tokens) if tokens else None,
            "prefill_flops_convention": flops.CONVENTION,
            "paper_macs": flops.paper_macs(text_config, per_layer) if per_layer else None,
            "paper_macs_convention": flops.PAPER_CONVENTION,
            "encoder_tokens_per_layer": st.get("encoder_tokens_per_layer"),
            "vision_flops": st.get("vision_flops"),
            "vision_flops_convention": flops.VISION_CONVENTION,
            "vision_ms": st.get("vision_ms"),
            "kv_cache_bytes": st.get("kv_cache_bytes"),
            "score_ms": st.get("score_ms"),
            "gather_ms": st.get("gather_ms"),
            "peak_memory_bytes": call.peak_memory_bytes,
        })
        out.append(rec)
    return out


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means over samples for lmms-eval's ``additional_metrics`` (shown as ``avg_<key>``).

    Batch times are shared by the batch's samples, so ``prefill_ms`` etc. are per-batch times
    averaged over samples; the ``*_per_item`` keys divide by the batch size first.
    """
    def per(key: str, scale: float = 1.0, by_batch: bool = False) -> float | None:
        return _mean(None if r.get(key) is None else r[key] * scale / (r["batch_size"] if by_batch else 1)
                     for r in records)

    out = {
        "prefill_ms": per("prefill_ms"),
        "prefill_forward_ms": per("prefill_forward_ms"),
        "decode_ms_per_token": _mean(r["decode_ms"] / r["decode_steps"] for r in records
                                     if r.get("decode_ms") is not None and r.get("decode_steps")),
        "total_ms": per("total_ms"),
        "prefill_ms_per_item": per("prefill_ms", by_batch=True),
        "total_ms_per_item": per("total_ms", by_batch=True),
        "generated_tokens": per("generated_tokens"),
        "vision_tokens_found": per("vision_tokens"),
        "llm_vision_tokens": per("llm_vision_tokens"),
        "video_tokens_found": per("video_tokens"),
        "avg_vision_tokens": per("avg_vision_tokens"),
        "prefill_tflops": per("prefill_flops", 1e-12),
        "paper_tmacs": per("paper_macs", 1e-12),
        "vision_tflops": per("vision_flops", 1e-12),
        "vision_ms": per("vision_ms"),
        "kv_cache_mb": per("kv_cache_bytes", 1 / 2**20),
        "peak_memory_mb": per("peak_memory_bytes", 1 / 2**20),
        "batch_size": per("batch_size"),
    }
    return {k: v for k, v in out.items() if v is not None}


# -- where the side-car goes --------------------------------------------------------------------------
def find_lmms_eval_run() -> tuple[str | None, str | None, str | None] | None:
    """``(output_path, model folder, datetime_str)`` of the ``lmms_eval.evaluator.simple_evaluate``
    call that is running us, read from its frame; ``None`` outside one.

    lmms-eval gives the model neither its ``--output_path`` nor the timestamp of the results file;
    ``simple_evaluate`` holds both as locals (``evaluation_tracker``, ``datetime_str``) and writes
    ``<output_path>/<model folder>/<datetime_str>_results.json`` from exactly these values.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "simple_evaluate" and frame.f_globals.get("__name__") == "lmms_eval.evaluator":
            local = frame.f_locals
            tracker = local.get("evaluation_tracker")
            stamp = local.get("datetime_str")
            out = getattr(tracker, "output_path", None) if tracker is not None else None
            general = getattr(tracker, "general_config_tracker", None)
            folder = getattr(general, "model_name_sanitized", None)
            return (str(out) if out else None, folder, str(stamp).replace(":", "-") if stamp else None)
        frame = frame.f_back
    return None


def _argv_value(flag: str, argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def sidecar_path(explicit: str | None, pretrained: str, rank: int = 0, world_size: int = 1,
                 argv: Sequence[str] | None = None) -> tuple[Path | None, str]:
    """Where this run's side-car goes, and how that was decided (for the log).

    1. ``sidecar=`` model argument: a ``.jsonl`` file, or a folder for ``<stamp>_v2drop_samples.jsonl``;
    2. the calling lmms-eval run: beside its results, ``<output_path>/<model folder>/<datetime_str>``
       ``_v2drop_samples.jsonl`` with the very timestamp of ``<datetime_str>_results.json``;
    3. ``--output_path`` on the command line (lmms-eval used another way): same folder rule, own timestamp;
    4. otherwise none: lmms-eval writes no results without ``--output_path`` either.
    With several processes each rank writes its own file, ``..._v2drop_samples_rank<k>.jsonl``.
    """
    from lmms_eval.utils import get_datetime_str, sanitize_model_name

    argv = sys.argv if argv is None else argv
    suffix = SIDECAR_SUFFIX if world_size <= 1 else SIDECAR_SUFFIX.replace(".jsonl", f"_rank{rank}.jsonl")
    run = find_lmms_eval_run()
    stamp = (run[2] if run and run[2] else None) or get_datetime_str(
        timezone=_argv_value("--timezone", argv) or "Asia/Singapore")
    if explicit:
        path = Path(explicit).expanduser()
        if path.suffix == ".jsonl":
            if world_size > 1:
                path = path.with_name(f"{path.stem}_rank{rank}.jsonl")
            return path, "sidecar= model argument"
        return path / f"{stamp}{suffix}", "sidecar= model argument (folder)"
    if run is not None and run[0]:
        folder = run[1] or sanitize_model_name(pretrained)
        return Path(run[0]) / folder / f"{stamp}{suffix}", "beside lmms-eval's results"
    out = _argv_value("--output_path", argv)
    if out:
        return Path(out) / sanitize_model_name(pretrained) / f"{stamp}{suffix}", "--output_path from the command line"
    return None, "no --output_path and no sidecar= model argument"


def prepare_sidecar(explicit: str) -> str | None:
    """Check the ``sidecar=`` model argument before any item runs: its folder must be a folder we can
    write in. A missing folder is created, one level only (under a parent that exists). Raises
    ``ValueError`` naming ``sidecar=`` and the path; returns a note when it created the folder."""
    path = Path(explicit).expanduser()
    if path.suffix == ".jsonl" and path.is_dir():
        raise ValueError(f"sidecar={explicit}: {path} is a folder; give a .jsonl file or a folder for it")
    folder = path.parent if path.suffix == ".jsonl" else path
    note = None
    if not folder.exists():
        if not folder.parent.is_dir():
            raise ValueError(f"sidecar={explicit}: cannot create the side-car folder {folder}: {folder.parent} "
                             "is not an existing folder (only the last folder of the path is created)")
        try:
            folder.mkdir()
        except OSError as exc:
            raise ValueError(f"sidecar={explicit}: cannot create the side-car folder {folder}: "
                             f"{exc.strerror or exc}") from None
        note = f"created the side-car folder {folder} (sidecar={explicit})"
    elif not folder.is_dir():
        raise ValueError(f"sidecar={explicit}: {folder} is not a folder, so the side-car cannot go in it")
    try:  # a real write: os.access says yes to root even on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".v2drop-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"sidecar={explicit}: cannot write in the side-car folder {folder}: "
                         f"{exc.strerror or exc}") from None
    return note


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON lines to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # a tensor or an array
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


class SampleLog:
    """The run's side-car records, flushed to disk atomically (all records so far, every time)."""

    def __init__(self, path_fn: Callable[[], tuple[Path | None, str]], flush_every_s: float = 60.0):
        self._path_fn = path_fn
        self._path: Path | None = None
        self._resolved = False
        self.how = ""
        self.records: list[dict[str, Any]] = []
        self.flush_every_s = flush_every_s
        self._last_flush = time.monotonic()

    @property
    def path(self) -> Path | None:
        if not self._resolved:
            self._path, self.how = self._path_fn()
            self._resolved = True
        return self._path

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        self.records.extend(records)
        if time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> Path | None:
        self._last_flush = time.monotonic()
        path = self.path
        if path is not None and self.records:
            write_jsonl_atomic(path, self.records)
        return path
