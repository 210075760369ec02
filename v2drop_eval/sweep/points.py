"""The points of a sweep: one model under one method and budget or schedule, over the config's tasks (the
config's grid expands into them: :func:`v2drop_eval.sweep.config.expand`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from v2drop_eval.methods.presets import DropSchedule

__all__ = ["ModelSpec", "Point", "schedule_slug"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    pretrained: str
    model: str
    num_layers: int | None = None
    model_args: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Point:
    """One evaluation: a model under one method and budget or schedule, over all the config's tasks."""

    id: str
    model: ModelSpec
    method: str
    budget: int | str | None = None
    schedule: str | None = None
    metric: str | None = None
    seed: int | None = None
    encoder_schedule: str | None = None
    options: str | None = None  # the method's named options, "a+b" (None: its authors' rule)
    positions: str | None = None  # keep | renumber (None: the method's authors' rule)

    @property
    def label(self) -> str:
        """``b128``, ``s3-0.5_17-0.3_22-0`` or ``full`` (the budget/schedule part of the id)."""
        if self.budget is not None:
            return f"b{self.budget}"
        if self.schedule is not None:
            return schedule_slug(self.schedule)
        return "full"

    def model_args(self) -> str:
        args: dict[str, Any] = {"pretrained": self.model.pretrained, "method": self.method}
        if self.budget is not None:
            args["budget"] = self.budget
        if self.schedule is not None:
            args["schedule"] = self.schedule
        if self.metric is not None:
            args["metric"] = self.metric
        if self.seed is not None:
            args["seed"] = self.seed
        if self.encoder_schedule is not None:
            args["encoder_schedule"] = self.encoder_schedule
        if self.options:
            args["options"] = self.options
        if self.positions:
            args["positions"] = self.positions
        args.update(dict(self.model.model_args))
        return ",".join(f"{k}={v}" for k, v in args.items())

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model_name": self.model.name,
            "family": self.model.family,
            "pretrained": self.model.pretrained,
            "lmms_model": self.model.model,
            "method": self.method,
            "budget": self.budget,
            "schedule": self.schedule,
            "metric": self.metric,
            "seed": self.seed,
            "encoder_schedule": self.encoder_schedule,
            "options": self.options,
            "positions": self.positions,
            "model_args": self.model_args(),
        }


def schedule_slug(schedule: str) -> str:
    """``3:0.5/17:0.3/22:0`` -> ``s3-0.5_17-0.3_22-0`` (readable, filesystem-safe, stable)."""
    return "s" + DropSchedule.parse(schedule).slug()
