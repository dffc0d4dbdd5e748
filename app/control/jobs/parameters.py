"""``TrainParams``, the body of ``POST /train``: derived from the training module's own parameters
(``training.config.TrainingConfig``), never restated. Every field is optional, and each one's name, default,
bounds and description are the training field's; the defaults of the fields a body leaves out are those of
the recipe it names (``{"recipe": "cpu"}`` gets the CPU recipe). Bounds and the rules between fields are
checked here, at the boundary, so that a bad value is a 422 naming the field rather than a job that fails a
second later.

The job API offers every field but those the service sets for its jobs (the data folder, the device), plus
``gpus``, which decides how the runner launches training (torchrun for more than one).
"""

from __future__ import annotations

import typing
from dataclasses import MISSING
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator

from training.config import (
    DEFAULTS,
    RECIPES,
    Option,
    TrainingConfig,
    options,
    problems,
    recipe_defaults,
    split_problem,
)


def _fields() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainingConfig)
    derived: dict[str, Any] = {}
    for name, default, how in options():
        if not how.job:
            continue
        assert default is not MISSING, f"{name} has no default, so a job could not leave it out"
        annotation = Literal[how.choices] if how.choices is not None else hints[name]
        derived[name] = (annotation, _field(default, how))
    return derived


def _field(default: Any, how: Option) -> Any:
    return Field(default, ge=how.minimum, gt=how.above, le=how.maximum, lt=how.below, description=how.help)


# A model made at import time, subclassed for the job API's own field and rules. Type checkers cannot see its
# fields: the TYPE_CHECKING block names the one app code reads as an attribute, the rest go through model_dump().
# Strict: a body's 0 is no boolean and "3" no number (the schema says so, and schemathesis holds us to it).
# Finite: JSON's 1e999 parses as infinity, which passes every bound ("> 0") but is stored as null and could
# never be read back (issue 22: one such POST /train took every /train route and the next start-up down).
_TrainingFields: Any = create_model("TrainingFields", __config__=ConfigDict(extra="forbid", frozen=True, strict=True,
                                                                            allow_inf_nan=False),
                                    **_fields())

# Options renamed since jobs were first stored: old name -> new name. A stored record is read through this
# (``stored_params``), so an upgrade that renames an option keeps old jobs readable; add a line per rename.
RENAMED_OPTIONS: dict[str, str] = {}


class TrainParams(_TrainingFields):
    """The body of ``POST /train``; ``{}`` (or no body) trains with the default recipe."""

    gpus: int = Field(1, ge=1, le=64, description="GPUs to train on; more than 1 launches torchrun")

    if TYPE_CHECKING:
        @property
        def epochs(self) -> int: ...

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        """Fill the fields the body leaves out with the defaults of its recipe."""
        if isinstance(data, dict):
            recipe = data.get("recipe", DEFAULTS.recipe)
            if isinstance(recipe, str) and recipe in RECIPES:  # else the recipe field's own error says why
                defaults = recipe_defaults(recipe)
                return {name: defaults[name] for name in cls.model_fields if name in defaults} | data
        return data

    @field_validator("warmup_epochs")
    @classmethod
    def _rules_between_fields(cls, value: float, info: ValidationInfo) -> float:
        """The training module's rules between fields (training.config.problems) blame warmup_epochs."""
        if problem := problems(info.data | {"warmup_epochs": value}, spell=str).get("warmup_epochs"):
            raise ValueError(problem)
        return value

    @field_validator("gpus")
    @classmethod
    def _batch_splits_over_gpus(cls, value: int, info: ValidationInfo) -> int:
        batch_size = info.data.get("batch_size")
        if batch_size is not None and (problem := split_problem(batch_size, value, spell=str)):
            raise ValueError(problem)
        return value


def stored_params(stored: dict[str, Any]) -> tuple[TrainParams, list[str]]:
    """A job's parameters as the store kept them, read by today's rules: renamed options under their new name,
    options this version no longer has left out. Returns the parameters and the options left out (for the job's
    record to mention). Raises ``ValueError`` (pydantic's ``ValidationError``) if what is left is not valid now."""
    known = TrainParams.model_fields
    current = {RENAMED_OPTIONS.get(name, name): value for name, value in stored.items()}
    dropped = sorted(name for name in current if name not in known)
    return TrainParams.model_validate({name: value for name, value in current.items() if name in known}), dropped
