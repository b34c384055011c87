"""Named registries: the package's extension points.

Four things can be added without touching the code that uses them, each through its own :class:`Registry`:

* model families (:data:`diffusers_mixdq.families.FAMILIES`): which layers of a denoiser class read the text
  embeddings, belong to the content group, are its first/last layers or its time embedding;
* activation schemes (``diffusers_mixdq.apply.activations.ACTIVATION_SCHEMES``): how a layer's input is quantized;
* weight backends (:data:`WEIGHT_BACKENDS` below, filled from ``diffusers_mixdq.apply.backends``): how quantized
  weights are stored and run;
* allocators (``diffusers_mixdq.builder.allocate.ALLOCATORS``): how bit widths are chosen from sensitivities.

``docs/architecture.md`` shows how to add one of each. This module imports nothing of the package but its errors,
so any layer may use it.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import MixDQError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name (case-sensitive), optionally with aliases; lookups of unknown names raise one clear error."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, entry: T | None = None, *, aliases: tuple[str, ...] = (), replace: bool = False):
        """Register ``entry`` under ``name``; without ``entry``, a decorator that registers what it decorates.

        Registering a name twice raises unless ``replace=True`` (or it is the very same entry: re-imports are fine).
        """

        def add(value: T) -> T:
            for key in (name, *aliases):
                current = self._entries.get(key) if key == name else self._entries.get(self._aliases.get(key, ""))
                if current is not None and current is not value and not replace:
                    raise MixDQError(f"A {self.kind} named '{key}' is registered already; pass replace=True.")
            self._entries[name] = value
            for alias in aliases:
                self._aliases[alias] = name
            return value

        if entry is not None:
            return add(entry)
        return add

    def get(self, name: str) -> T:
        key = self._aliases.get(name, name)
        if key not in self._entries:
            raise MixDQError(
                f"Unknown {self.kind} '{name}'; known: {', '.join(sorted(self._entries)) or 'none'} "
                f"(add one with the {self.kind} registry's register(name, ...), see docs/architecture.md)."
            )
        return self._entries[key]

    def find(self, predicate: Callable[[T], bool]) -> T | None:
        """The first entry (in registration order) for which ``predicate`` is true."""
        return next((e for e in self._entries.values() if predicate(e)), None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self):
        return self._entries.items()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


#: weight backends by name: how quantized weights are stored and run (filled by ``diffusers_mixdq.apply.backends``;
#: plan summaries ask the default one for storage sizes, so the layout rules live in the backend alone)
WEIGHT_BACKENDS: Registry = Registry("weight backend")
DEFAULT_WEIGHT_BACKEND = "quanto"
