"""One-line messages for invalid configuration files, shared by ``prf train``, ``prf kcf`` and
``prf generate`` (the thresholds file has its own, prf.thresholds, which also hints at null)."""

from __future__ import annotations

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
