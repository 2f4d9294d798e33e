"""One-line messages for invalid configuration files, shared by ``prf train``, ``prf kcf`` and
``prf generate`` (the thresholds file has its own, prf.thresholds, which also hints at null), and for
Trainer settings only Lightning can judge."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError


def validation_message(err: ValidationError, what: str, most: int = 5) -> str:
    """``invalid <what>: unknown key 'a.b'; 'c.d': <pydantic's message>; <a whole-config check>``: the first
    ``most`` problems, each named by its dotted key."""
    problems = []
    for item in err.errors()[:most]:
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        elif not key:  # a check of the whole config (a model validator)
            problems.append(str(item["msg"]).removeprefix("Value error, "))
        else:
            problems.append(f"'{key}': {item['msg']}")
    return f"invalid {what}: " + "; ".join(problems)


@contextlib.contextmanager
def refused_trainer_settings(what: str, settings: dict[str, Any]) -> Iterator[None]:
    """Around building a Lightning Trainer: its refusal of ``settings`` (an accelerator this machine lacks,
    ``devices: foo``, an unknown precision) becomes one ValueError naming them as ``trainer.<key>``."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except (MisconfigurationException, TypeError, ValueError) as err:
        named = ", ".join(f"trainer.{key}={value!r}" for key, value in settings.items())
        raise ValueError(f"the {what} settings ({named}) do not run here: {err}") from None
