"""The Solver's stateful parts, registered once: checkpoint.th is derived from this list.

Each part is registered with its key, how to read it (``save``), how to put it back
(``load``) and what a saved value must look like (``check``, called with the value and the
whole loaded dict, for checks that span keys). From that one list come the dict that is
saved, the key set a resume expects, the validator that refuses a foreign or malformed
file before any of it is used, and the restore, in registration order. audiocraft's
``StandardSolver.register_stateful`` is the model; here a part is not only an attribute
with ``state_dict``, since RNG, history and the base record are plain values.
"""
from __future__ import annotations

import dataclasses
import typing as tp

Check = tp.Callable[[tp.Any, tp.Mapping[str, tp.Any]], bool]


class HasState(tp.Protocol):
    def state_dict(self) -> tp.Any: ...

    def load_state_dict(self, state: tp.Any) -> tp.Any: ...


@dataclasses.dataclass(frozen=True)
class StatePart:
    key: str
    save: tp.Callable[[], tp.Any]
    load: tp.Optional[tp.Callable[[tp.Any], None]]  # None: derived from other parts
    check: Check


class StateRegistry:
    """Ordered stateful parts plus a ``format`` tag; `save` / `problem` / `restore`."""

    def __init__(self, format_tag: str):
        self.format_tag = format_tag
        self.parts: tp.Dict[str, StatePart] = {}

    def register(self, key: str, save: tp.Callable[[], tp.Any],
                 load: tp.Optional[tp.Callable[[tp.Any], None]], check: Check) -> None:
        """One stateful part; restored in the order registered (register first what
        later parts depend on)."""
        if key in self.parts or key == "format":
            raise ValueError(f"stateful part {key!r} is registered twice")
        self.parts[key] = StatePart(key, save, load, check)

    def register_stateful(self, key: str, obj: tp.Optional[HasState], check: Check) -> None:
        """An object with ``state_dict`` / ``load_state_dict`` (optimizer, scheduler, EMA):
        saved as None when the run has none; an empty or None value is not loaded (a
        disabled GradScaler saves ``{}`` and refuses to load it)."""
        def load(value: tp.Any) -> None:
            if obj is not None and value:
                obj.load_state_dict(value)
        self.register(key, lambda: None if obj is None else obj.state_dict(), load, check)

    def register_attribute(self, owner: object, name: str, check: Check,
                           convert: tp.Callable[[tp.Any], tp.Any] = lambda v: v) -> None:
        """A plain value kept in ``owner.name`` (history, best score), saved under `name`."""
        self.register(name, lambda: getattr(owner, name),
                      lambda value: setattr(owner, name, convert(value)), check)

    @property
    def keys(self) -> tp.Tuple[str, ...]:
        return ("format", *self.parts)

    def save(self) -> dict:
        """What checkpoint.th holds: the format tag and every part's current value."""
        return {"format": self.format_tag, **{k: p.save() for k, p in self.parts.items()}}

    def problem(self, state: tp.Any) -> tp.Optional[str]:
        """What is wrong with a loaded checkpoint dict, or None when it has the right shape."""
        if not isinstance(state, dict):
            return f"a {type(state).__name__}, not a checkpoint dict"
        if state.get("format") != self.format_tag:
            return (f"format {state.get('format')!r}, expected {self.format_tag!r}: another "
                    "program or demucs-lora version wrote it")
        unknown = sorted(map(str, set(state) - set(self.keys)))
        missing = sorted(set(self.keys) - set(state))
        if unknown or missing:
            return f"unexpected keys {unknown[:5]}, missing keys {missing[:5]}"
        bad = [k for k, part in self.parts.items() if not part.check(state[k], state)]
        return f"malformed entries {bad}" if bad else None

    def restore(self, state: tp.Mapping[str, tp.Any]) -> None:
        """Load every part from a dict `problem` accepted, in registration order."""
        for key, part in self.parts.items():
            if part.load is not None:
                part.load(state[key])
