"""Per-sample measurement of ``generate`` calls, and the side-car JSONL that holds it.

Timing (:class:`GenerateTimer`): ``model.generate`` is wrapped on the model instance, and a forward
pre-hook and hook sit on the top model. Within one ``generate`` call the first forward is the prefill
(vision encoder + LLM prefill + logits of the last position); every later forward is one decode step.

- ``prefill_ms``: ``generate`` entry -> end of the first forward: time to first token.
- ``prefill_forward_ms``: the first forward alone (no input preparation by ``generate``). From
  transformers 5.24 on, ``generate`` encodes images before that forward, so it no longer holds the
  vision encoder; ``prefill_ms`` does in every release (docs/design.md §3).
- ``decode_ms``: end of the first forward -> ``generate`` returns; ``decode_steps`` forwards.
- ``total_ms`` = ``prefill_ms + decode_ms``: the whole ``generate`` call.
- ``vision_ms``: the vision encoder's forwards of the batch (inside ``prefill_ms``), from the dropper's
  encoder hooks (CUDA events on a GPU); ``vision_flops`` its FLOPs per sample (``flops.VISION_CONVENTION``).

On CUDA every time point is taken after ``torch.cuda.synchronize`` on each device the model uses
(four synchronisations per ``generate`` call, none per decode step); on CPU ``perf_counter`` alone.
Peak memory: ``torch.cuda.max_memory_allocated`` after resetting the peak at ``generate`` entry,
summed over the model's devices (``None`` on CPU). All times of a batch are the batch's times.

Side-car (:class:`SampleLog`): one JSON line per generated sample, rewritten atomically (write to a
temporary file in the same folder, then ``os.replace``), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from v2drop_eval import flops
from v2drop_eval.atomic import write_text_atomic

__all__ = ["GenerateCall", "GenerateTimer", "SampleLog", "versions", "summarize", "write_jsonl_atomic",
           "find_lmms_eval_run", "sidecar_path", "prepare_sidecar", "SIDECAR_SUFFIX", "doc_complexity"]

SIDECAR_SUFFIX = "_v2drop_samples.jsonl"


def versions() -> dict[str, str | None]:
    """Versions of the packages that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"v2drop_eval": pkg("v2drop-eval"), "torch": torch.__version__,
            "transformers": transformers.__version__, "lmms_eval": pkg("lmms_eval")}


@dataclass
class GenerateCall:
    """What one ``generate`` call measured. Times in ms; per-row lists follow the batch rows."""

    batch_size: int
    prefill_ms: float | None = None
    prefill_forward_ms: float | None = None
    decode_ms: float | None = None
    total_ms: float | None = None
    forwards: int = 0
    generated_tokens: list[int] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    stats: list[dict[str, Any]] = field(default_factory=list)  # the engine's last_stats, one per row

    @property
    def decode_steps(self) -> int:
        return max(self.forwards - 1, 0)


class _Active:
    def __init__(self) -> None:
        self.forwards = 0
        self.t_first_start = 0.0
        self.t_first_end = 0.0


class GenerateTimer:
    """Times every ``generate`` call of ``model`` while enabled, and keeps the engine's row stats.

    ``stats_source``: returns the dropper's ``last_stats`` (read after each ``generate``).
    """

    def __init__(self, model: nn.Module, stats_source: Callable[[], list[dict[str, Any]]]):
        self.model = model
        self.stats_source = stats_source
        self.enabled = True
        self.calls: list[GenerateCall] = []
        self._active: _Active | None = None
        self._devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
        self._orig_generate = model.generate
        # Prepended, so that the prefill time includes the dropper's own pre-hook.
        self._hooks = [
            model.register_forward_pre_hook(self._pre, prepend=True),
            model.register_forward_hook(self._post, always_call=True),
        ]
        model.generate = self._generate  # instance attribute: the lmms-eval classes call model.generate

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self.model.__dict__.get("generate") == self._generate:  # bound methods: equal, not identical
            del self.model.generate

    # -- timing --------------------------------------------------------------------------------
    def _sync(self) -> None:
        for device in self._devices:
            torch.cuda.synchronize(device)

    def _now(self) -> float:
        self._sync()
        return time.perf_counter()

    def _pre(self, module: nn.Module, args: tuple) -> None:
        active = self._active
        if active is not None and active.forwards == 0:
            active.t_first_start = self._now()

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        active = self._active
        if active is None:
            return
        active.forwards += 1
        if active.forwards == 1:
            active.t_first_end = self._now()

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or self._active is not None:
            return self._orig_generate(*args, **kwargs)
        active = _Active()
        for device in self._devices:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = self._now()
        self._active = active
        try:
            out = self._orig_generate(*args, **kwargs)
        finally:
            self._active = None
        t2 = self._now()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        sequences = getattr(out, "sequences", out)
        batch = int(input_ids.shape[0]) if isinstance(input_ids, torch.Tensor) else int(sequences.shape[0])
        call = GenerateCall(batch_size=batch, forwards=active.forwards, total_ms=(t2 - t0) * 1e3)
        if active.forwards:
            call.prefill_ms = (active.t_first_end - t0) * 1e3
            call.prefill_forward_ms = (active.t_first_end - active.t_first_start) * 1e3
            call.decode_ms = (t2 - active.t_first_end) * 1e3
        if isinstance(input_ids, torch.Tensor) and isinstance(sequences, torch.Tensor):
            eos = kwargs.get("eos_token_id", getattr(self.model.generation_config, "eos_token_id", None))
            call.generated_tokens = _generated_tokens(sequences[:, input_ids.shape[1]:], eos)
        if self._devices:
            call.peak_memory_bytes = int(sum(torch.cuda.max_memory_allocated(d) for d in self._devices))
        call.stats = _rows(list(self.stats_source() or []), len(call.generated_tokens) or batch)
        self.calls.append(call)
        return out

    @contextmanager
    def paused(self):
        """Nothing recorded inside (warm-up)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def take(self) -> list[GenerateCall]:
        """The calls recorded since the last ``take``."""
        calls, self.calls = self.calls, []
        return calls


def _generated_tokens(new: torch.Tensor, eos: int | Sequence[int] | None) -> list[int]:
    """New tokens per row up to and including the first EOS (later ones are padding)."""
    if eos is None:
        return [int(new.shape[1])] * int(new.shape[0])
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=new.device)
    hit = torch.isin(new, eos_ids)
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], new.shape[1], dtype=torch.long))
    return [int(x) for x in first.tolist()]


def _rows(stats: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """The engine's stats per batch row; beam search expands each row k times (identical copies)."""
    if len(stats) == batch or not stats:
        return stats
    if batch and len(stats) % batch == 0:
        k = len(stats) // batch
        return stats[::k]
    return []


# -- per-sample records -------------------------------------------------------------------------------
def doc_complexity(doc: Any) -> dict[str, Any]:
    """How busy a sample's image is, for plots of kept tokens against content (adaptive budgets).

    ``n_objects``: the document's own object count where the task has one (the demo benchmark);
    ``image_edge_density``: share of pixels of the first image whose grey-level gradient exceeds 0.1
    (images scaled to at most 256 pixels a side first, so the figure does not depend on resolution).
    """
    out: dict[str, Any] = {"n_objects": None, "image_edge_density": None}
    if not hasattr(doc, "get"):
        return out
    n = doc.get("n_objects")
    if n is not None and not isinstance(n, bool):
        try:
            out["n_objects"] = int(n)
        except (TypeError, ValueError):
            pass
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
        rec: dict[str, Any] = {"task": task, "doc_id": doc_id, **meta, **(docs[b] if docs else {})}
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
    if isinstance(obj, torch.Tensor):
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
