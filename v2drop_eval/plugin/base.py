"""What every V2Drop lmms-eval class shares: argument handling, the dropper, batching, measurement.

A plugin class is ``class X(V2DropMixin, <lmms-eval parent>)``. Its ``__init__`` calls
:meth:`V2DropMixin._v2drop_pop_args` before the parent's ``__init__`` (which loads the weights), and
:meth:`V2DropMixin._v2drop_attach` after it. ``generate_until`` here splits the requests into batches
and hands each batch to the family's ``_v2drop_generate_batch``, inside the measurement.

Warm-up: the first batch is first run ``warmup`` times (model argument, default 1) untimed, and its
answers thrown away (requests are copied, since the parents mutate their generation kwargs); then it
runs again, timed, like every other batch. So no recorded sample carries one-off costs (CUDA context,
kernel selection, allocator growth, lazy imports). ``warmup=0`` turns this off.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

from lmms_eval.api.instance import GenerationResult, TokenCounts
from loguru import logger as eval_logger
from tqdm import tqdm

from v2drop_eval.engine.method import KEEP, RENUMBER
from v2drop_eval.methods import get_method
from v2drop_eval.plugin.args import (
    FAMILIES,
    DropArgs,
    check_batch_size,
    check_checkpoint,
    pop_drop_args,
    user_errors,
)

__all__ = ["V2DropMixin"]

# Positions in a request's ``args``: simple (ctx, gen_kwargs, doc_to_visual, doc_id, task, split);
# chat (ctx, doc_to_messages, gen_kwargs, doc_id, task, split).
DOC_ID, TASK, SPLIT = 3, 4, 5


class V2DropMixin:
    """Mixed in front of an lmms-eval model class; see the module docstring."""

    _v2drop_family: str = ""
    _v2drop_gen_kwargs_index: int = 1  # 1 for simple classes, 2 for chat classes

    # -- construction -------------------------------------------------------------------------
    def _v2drop_pop_args(self, kwargs: dict[str, Any], pretrained: str, parent: type,
                         extra: Sequence[str] = (), **config_kwargs: Any) -> DropArgs:
        """Pop and check our model arguments, and the checkpoint's config, before any weights load; a bad
        one ends the process with status 2 and its one-line message (:class:`~v2drop_eval.plugin.args.
        ModelArgsError`: lmms-eval would catch a ValueError and exit 0)."""
        with user_errors():
            return self._v2drop_check_args(kwargs, pretrained, parent, extra, **config_kwargs)

    def _v2drop_check_args(self, kwargs: dict[str, Any], pretrained: str, parent: type,
                           extra: Sequence[str] = (), **config_kwargs: Any) -> DropArgs:
        from v2drop_eval.plugin.sidecar import prepare_sidecar

        if "batch_size" in kwargs:
            kwargs["batch_size"] = check_batch_size(FAMILIES[self._v2drop_family].lmms_model, kwargs["batch_size"])
        args = pop_drop_args(kwargs, self._v2drop_family, parent, extra)
        args = check_checkpoint(args, pretrained, **config_kwargs)
        if args.preset_scaled:
            eval_logger.info(f"V2Drop: budget={args.budget} names layers of a deeper model; scaled to this "
                             f"model's {args.num_layers} layers: {args.method} schedule {args.schedule}")
        if args.sidecar:  # now, not after the last item: a path it cannot write would lose the run's records
            try:
                note = prepare_sidecar(args.sidecar)
            except ValueError as exc:
                raise ValueError(f"{FAMILIES[self._v2drop_family].lmms_model}: {exc}") from None
            if note:
                eval_logger.info(f"V2Drop: {note}")
        _cpu_defaults(kwargs)
        return args

    def _v2drop_attach(self, args: DropArgs, pretrained: str) -> None:
        """Attach the dropper and the timer to the loaded model."""
        from v2drop_eval import attach
        from v2drop_eval.plugin.sidecar import SampleLog, sidecar_path
        from v2drop_eval.plugin.timer import GenerateTimer, versions

        model = self.model
        self._v2drop_args = args
        self._v2drop_handle = attach(model, args.schedule, method=args.method, metric=args.metric,
                                     seed=args.seed, options=args.options, encoder_schedule=args.encoder_schedule,
                                     positions=args.positions)
        handle = self._v2drop_handle
        self._v2drop_timer = GenerateTimer(model, lambda: handle.last_stats)
        self._v2drop_warmup_left = args.warmup
        device = next(model.parameters()).device
        self._v2drop_meta = {
            "model": pretrained,
            **args.describe(),
            "attn_implementation": str(getattr(handle.text_config, "_attn_implementation", None) or "eager"),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": str(device),
            "device_name": _device_name(device),
            "num_layers": args.num_layers,
            "positions": _positions_in_force(handle, args),
            "versions": versions(),
        }
        self._v2drop_log = SampleLog(lambda: sidecar_path(args.sidecar, pretrained, rank=self.rank,
                                                          world_size=self.world_size))
        eval_logger.info(f"V2Drop: {handle!r} on {type(model).__name__} ({args.num_layers} layers), "
                         f"budget={args.budget}")

    # -- batching -------------------------------------------------------------------------------
    def _v2drop_sort_key(self, args: tuple) -> Any:
        """Order of requests inside a batch; classes that delegate to the parent use the parent's."""
        ctx = args[0]
        return (-len(self.tokenizer.encode(ctx)), ctx) if isinstance(ctx, str) else (0, "")

    def _v2drop_batches(self, requests: Sequence[Any]) -> Any:
        """lmms-eval's own ``Collator``, as the parents batch: grouped by generation kwargs (first
        appearance first), each group sorted by ``_v2drop_sort_key`` (stable), cut into ``batch_size``
        pieces. ``get_original`` puts the answers back in request order."""
        from lmms_eval.utils import Collator

        return Collator(list(requests), lambda req: self._v2drop_sort_key(req.args),
                        group_fn=lambda req: req.args[self._v2drop_gen_kwargs_index], grouping=True)

    def _v2drop_generate_batch(self, requests: list[Any]) -> list[Any]:
        """Answers for one batch, in the order given (one ``model.generate`` call)."""
        raise NotImplementedError

    # -- the lmms-eval entry point ------------------------------------------------------------
    def _v2drop_generate(self, inputs: Any, requests: list[Any], pad_token_id: int) -> Any:
        """One ``generate`` over a built batch, with the parents' defaults for the batch's generation
        kwargs (they never truncate at ``until``); returns the new token ids per row."""
        gen_kwargs = dict(requests[0].args[self._v2drop_gen_kwargs_index])
        gen_kwargs.setdefault("max_new_tokens", 1024)
        gen_kwargs.setdefault("temperature", 0)
        gen_kwargs.setdefault("top_p", None)
        gen_kwargs.setdefault("num_beams", 1)
        do_sample = gen_kwargs["temperature"] > 0
        cont = self.model.generate(
            **inputs,
            do_sample=do_sample,
            temperature=gen_kwargs["temperature"] if do_sample else None,
            top_p=gen_kwargs["top_p"],
            num_beams=gen_kwargs["num_beams"],
            max_new_tokens=gen_kwargs["max_new_tokens"],
            use_cache=self.use_cache,
            pad_token_id=pad_token_id,
            eos_token_id=self.eot_token_id,
        )
        return cont[:, inputs["input_ids"].shape[-1]:]

    def _v2drop_results(self, requests: list[Any], texts: list[str], new: Any, answers: list[str]) -> list[Any]:
        """``GenerationResult`` per row (output tokens counted up to the first EOS: a finished row is
        padded after it), each answer also handed to lmms-eval's cache hook."""
        out = []
        for req, text, ids, answer in zip(requests, texts, new, answers, strict=True):
            hits = (ids == self.eot_token_id).nonzero()
            n_tokens = int(hits[0, 0]) + 1 if len(hits) else int(ids.shape[0])
            out.append(GenerationResult(text=answer, token_counts=TokenCounts(output_tokens=n_tokens)))
            self.cache_hook.add_partial("generate_until", (text, req.args[self._v2drop_gen_kwargs_index]), answer)
        return out

    def generate_until(self, requests: list[Any]) -> list[Any]:
        from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history

        from v2drop_eval.plugin.sidecar import doc_complexity, sample_records

        logged_before = len(get_logged_metrics_history())
        answers: list[Any] = []
        batches = self._v2drop_batches(requests)
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="V2Drop responding")
        start = len(self._v2drop_log.records)
        for batch in batches.get_batched(n=max(int(self.batch_size), 1)):
            while self._v2drop_warmup_left > 0:
                with self._v2drop_timer.paused():
                    self._v2drop_generate_batch([_fresh(r, self._v2drop_gen_kwargs_index) for r in batch])
                self._v2drop_warmup_left -= 1
            self._v2drop_timer.take()
            out = self._v2drop_generate_batch(batch)
            calls = self._v2drop_timer.take()
            rows = [(r.args[TASK], r.args[DOC_ID]) for r in batch]
            if len(calls) == 1 and calls[0].batch_size == len(batch):
                docs = [doc_complexity(self._v2drop_doc(r)) for r in batch]
                self._v2drop_log.extend(sample_records(calls[0], rows, self._v2drop_meta,
                                                       self._v2drop_handle.text_config, docs))
            else:
                # Each batch must be exactly one generate call of that many rows; anything else
                # (e.g. the parent swallowed an error) is not attributable to samples: say so.
                eval_logger.warning(f"V2Drop: batch of {len(batch)} made {len(calls)} generate call(s) "
                                    f"({[c.batch_size for c in calls]} rows); its samples are not measured")
            if len(out) != len(batch):
                raise RuntimeError(f"V2Drop: a batch of {len(batch)} requests got {len(out)} answers")
            answers += out
            pbar.update(len(batch))
        pbar.close()
        self._v2drop_report(self._v2drop_log.records[start:],
                            parent_logs=len(get_logged_metrics_history()) > logged_before)
        return batches.get_original(answers)

    def _v2drop_report(self, records: list[dict[str, Any]], parent_logs: bool) -> None:
        """Means into lmms-eval's throughput summary; every record into the side-car."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        from v2drop_eval.plugin.sidecar import summarize

        try:
            path = self._v2drop_log.flush()
        except OSError as exc:  # lmms-eval still writes the scores; the sweep sees the side-car missing
            eval_logger.error(f"V2Drop: could not write the side-car {self._v2drop_log.path} "
                              f"({self._v2drop_log.how}): {exc}")
            path = None
        if path is not None:
            eval_logger.info(f"V2Drop: {len(self._v2drop_log.records)} sample records in {path} "
                             f"({self._v2drop_log.how})")
        else:
            eval_logger.warning(f"V2Drop: per-sample measurements not written: {self._v2drop_log.how}")
        if not records:
            return
        # A batch's k records share its time: k shares of total_ms / k add up to it once.
        total_s = sum(r["total_ms"] / r["batch_size"] for r in records if r.get("total_ms") is not None) / 1e3
        tokens = sum(r["generated_tokens"] or 0 for r in records)
        # A parent that logs its own totals (the qwen2_5_vl chat class does, per batch) would have
        # lmms-eval's total_gen_tokens counted twice: then only our means go in.
        log_metrics(total_elapsed_time=0.0 if parent_logs else total_s,
                    total_gen_tokens=0 if parent_logs else tokens,
                    avg_speed=0.0 if parent_logs or total_s <= 0 else tokens / total_s,
                    additional_metrics=summarize(records))



    def _v2drop_doc(self, request: Any) -> Any:
        """The task document behind a request (for its image statistics), or None."""
        try:
            return self.task_dict[request.args[TASK]][request.args[SPLIT]][request.args[DOC_ID]]
        except (AttributeError, KeyError, IndexError, TypeError):
            return None


def _cpu_defaults(kwargs: dict[str, Any]) -> None:
    """No CUDA: run on the CPU unless told otherwise (the parents default to ``device=cuda``)."""
    import torch

    if torch.cuda.is_available() or "device" in kwargs:
        return
    kwargs["device"] = "cpu"
    kwargs.setdefault("device_map", "cpu")
    eval_logger.info("V2Drop: no CUDA device found; running on the CPU (device=cpu, device_map=cpu)")


def _fresh(request: Any, gen_index: int) -> Any:
    """A copy of ``request`` whose generation kwargs the parent may mutate freely."""
    args = list(request.args)
    args[gen_index] = copy.deepcopy(args[gen_index])
    return dataclasses.replace(request, arguments=tuple(args))


def _device_name(device: Any) -> str:
    """The accelerator's name (e.g. 'NVIDIA H100 80GB HBM3'), or the CPU's architecture."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _positions_in_force(handle: Any, args: DropArgs) -> str | None:
    """The position rule the run's removals follow (before the LLM, else in the decoder); None: nothing removed."""
    if args.encoder_schedule is not None or args.schedule.pre_llm is not None:
        return handle.pre_llm_positions
    if get_method(args.method).drops and not args.schedule.is_empty:
        return RENUMBER if handle.renumbers else KEEP
    return None
