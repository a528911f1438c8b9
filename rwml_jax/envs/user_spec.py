"""User-simulator specs as a config names them (no τ² import: validation and plans read them too).

``litellm:<model>`` (τ²'s own simulator through litellm), ``local:<hf folder or preset>`` (a model served by
this project's sampler), ``scripted:<file>`` (JSON turns) or ``scripted`` (the task's gold user turns).
"""

from __future__ import annotations

USER_KINDS = ("litellm", "local", "scripted")
USER_SPECS = ("litellm:<model>", "local:<hf folder or preset>", "scripted:<file>", "scripted")


def parse_user_spec(spec: str) -> tuple[str, str]:
    """(kind, argument) of a user-simulator spec; ValueError when malformed."""
    if spec == "scripted":
        return "scripted", ""
    kind, _, arg = str(spec).partition(":")
    if kind not in USER_KINDS or not arg.strip():
        raise ValueError(f"user simulator {spec!r}: expected one of {', '.join(USER_SPECS)}")
    return kind, arg.strip()
