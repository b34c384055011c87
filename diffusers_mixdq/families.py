"""Model families: what the package knows about each kind of denoiser, in one registry.

A :class:`ModelFamily` names, by layer-name glob patterns (``re:`` regexes work too):

* ``text_kv``: Linear layers that read the text encoder's hidden states (cross-attention K/V); they become
  BOS-aware when a plan carries a causal encoder's BOS state;
* ``content``: MixDQ's content / text-alignment group (scored by image similarity; the rest by output SQNR);
* ``first_last``: the layers that take the latent in and give the prediction out (kept in 16 bit by default);
* ``time_embedding``: timestep / conditioning embedding layers.

A denoiser class not listed falls back to :data:`GENERIC`, whose patterns fit diffusers' UNets and DiTs that use
``attn2`` for cross-attention. Add a family with ``FAMILIES.register("name", ModelFamily(...))``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from .errors import PlanFormatError
from .registry import Registry

#: longest layer-name pattern accepted (a layer name is rarely over 100 characters)
MAX_PATTERN_LENGTH = 1000

#: pipeline components that hold the denoiser, in the order they are looked for
DENOISER_COMPONENTS = ("unet", "transformer")


@dataclass(frozen=True)
class ModelFamily:
    """Layer roles of one family of denoisers (see the module docstring)."""

    name: str
    classes: tuple[str, ...] = ()
    text_kv: tuple[str, ...] = ("*attn2.to_k", "*attn2.to_v", "*.add_k_proj", "*.add_v_proj")
    content: tuple[str, ...] = ("*attn2.*", "*.ff.*")
    first_last: tuple[str, ...] = ()
    time_embedding: tuple[str, ...] = ()

    def role(self, layer: str, role: str) -> bool:
        """Whether ``layer`` matches any pattern of ``role`` (``"text_kv"``, ``"content"``, ...)."""
        return any(matches(p, layer) for p in getattr(self, role))


def matches(pattern: str, name: str) -> bool:
    """Whether the layer name ``name`` matches ``pattern`` in full: ``re:<regex>`` is a regular expression, run by
    RE2 (linear time, so no pattern can hang), anything else a glob (:func:`fnmatch.fnmatchcase` semantics: ``*``,
    ``?``, ``[seq]``, ``[!seq]``). Raises :class:`~diffusers_mixdq.errors.PlanFormatError` for a bad pattern."""
    return compile_pattern(pattern).fullmatch(name) is not None


def match_all(patterns: Iterable[str], names: Iterable[str]) -> dict[str, set[str]]:
    """``{pattern: names it matches}`` for every pattern, each checked first (errors name the pattern).

    RE2 sets match many patterns against a name in one pass, so the cost does not grow as patterns x names. A set
    whose DFA runs out of memory reports no match at all; each set therefore holds a catch-all sentinel, and a
    name the sentinel misses is matched pattern by pattern (RE2 then falls back to its NFA)."""
    patterns = list(dict.fromkeys(patterns))
    compiled = [compile_pattern(p) for p in patterns]
    out: dict[str, set[str]] = {p: set() for p in patterns}
    names = list(names)
    for start in range(0, len(patterns), _SET_SIZE):
        chunk = list(zip(patterns[start:start + _SET_SIZE], compiled[start:start + _SET_SIZE]))
        pattern_set = _pattern_set([c.pattern for _, c in chunk])
        for name in names:
            hits = pattern_set.Match(name) or ()
            if 0 not in hits:  # the sentinel always matches: the set gave up on this name
                hits = [i + 1 for i, (_, c) in enumerate(chunk) if c.fullmatch(name) is not None] + [0]
            for i in hits:
                if i:
                    out[chunk[i - 1][0]].add(name)
    return out


#: patterns per RE2 set (bounds each set's memory)
_SET_SIZE = 1000


def _pattern_set(regexes: list[str]):
    import re2

    pattern_set = re2.Set.FullMatchSet(_options())
    pattern_set.Add("(?s:.*)")
    for regex in regexes:
        pattern_set.Add(regex)
    try:
        pattern_set.Compile()
    except re2.error:
        raise PlanFormatError(f"The plan's layer-name patterns are too complex to match together ({len(regexes)} "
                              "in one group); use fewer or simpler patterns.") from None
    return pattern_set


def check_pattern(pattern) -> None:
    """Raise :class:`~diffusers_mixdq.errors.PlanFormatError` unless ``pattern`` is a usable layer-name pattern."""
    compile_pattern(pattern)


@lru_cache(maxsize=8192)
def compile_pattern(pattern: str):
    """The compiled RE2 regex of a layer-name pattern (see :func:`matches`), checked: the one place patterns are
    compiled. Raises :class:`~diffusers_mixdq.errors.PlanFormatError` naming the pattern."""
    import re2

    if not isinstance(pattern, str) or not pattern:
        raise PlanFormatError(f"A layer-name pattern must be a non-empty string, got {pattern!r}.")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PlanFormatError(
            f"The layer-name pattern {pattern[:40]!r}... is {len(pattern)} characters long; patterns are limited "
            f"to {MAX_PATTERN_LENGTH}. Use a shorter glob or regex."
        )
    if pattern.startswith("re:"):
        _check_python_syntax(pattern)
    try:
        return re2.compile(pattern[3:] if pattern.startswith("re:") else glob_to_regex(pattern), _options())
    except re2.error as e:
        raise PlanFormatError(
            f"Invalid layer-name pattern {pattern!r}: {_text(e)}. 're:' patterns use the RE2 subset of Python's "
            "regex syntax (no backreferences or lookaround); fix the pattern, or drop 're:' to use a glob."
        ) from None


def _check_python_syntax(pattern: str) -> None:
    """A ``re:`` pattern must also be valid Python regex syntax (the documented one; RE2 accepts a few things
    Python refuses, e.g. a group name used twice). Compiling never runs the pattern, so it cannot hang."""
    try:
        re.compile(pattern[3:])
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        raise PlanFormatError(
            f"Invalid regular expression in layer-name pattern {pattern!r}: {e}. Fix the regex after 're:', or drop "
            "the prefix to use a glob."
        ) from None


def _text(e: Exception) -> str:
    arg = e.args[0] if e.args else e
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def glob_to_regex(glob: str) -> str:
    """A glob as an RE2 regex with :func:`fnmatch.fnmatchcase` semantics (``*`` and ``?`` cross dots too)."""
    out, i, n = [], 0, len(glob)
    while i < n:
        c = glob[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            end, cls = _glob_class(glob, i)
            out.append(cls)
            i = end
        else:
            out.append(re.escape(c))
    return "(?s:" + "".join(out) + ")"


def _glob_class(glob: str, i: int) -> tuple[int, str]:
    """``(index after it, regex)`` of the ``[...]`` class starting at ``glob[i]`` (after '['); an unclosed '['
    is a literal, as in fnmatch."""
    j = i
    if j < len(glob) and glob[j] == "!":
        j += 1
    if j < len(glob) and glob[j] == "]":
        j += 1
    j = glob.find("]", j)
    if j < 0:
        return i, r"\["
    body = glob[i:j]
    negate = body.startswith("!")
    body = body[1:] if negate else body
    chars = "".join("\\" + ch if ch in "\\^[]" else ch for ch in body)
    if not chars:
        return j + 1, ("." if negate else "[^\\s\\S]")
    return j + 1, "[" + ("^" if negate else "") + chars + "]"


@lru_cache(maxsize=1)
def _options():
    import re2

    options = re2.Options()
    options.log_errors = False
    return options


FAMILIES: Registry[ModelFamily] = Registry("model family")

GENERIC = FAMILIES.register("generic", ModelFamily("generic"))
_JOINT_CONTENT = ("*.attn.add_*", "*.ff_context.*", "*.ff.*")  # MMDiTs: the text stream's attention and MLP
#: the built-in families: name -> (classes, first/last layers, time-embedding layers, content group or None: generic)
_BUILT_IN = {
    "unet": (("UNet2DConditionModel",), ("conv_in", "conv_out"), ("time_embedding.*", "add_embedding.*"), None),
    "pixart": (("PixArtTransformer2DModel",), ("pos_embed.proj", "proj_out"),
               ("adaln_single.*", "caption_projection.*"), None),
    "sd3": (("SD3Transformer2DModel",), ("pos_embed.proj", "proj_out"), ("time_text_embed.*", "context_embedder"),
            _JOINT_CONTENT),
    "flux": (("FluxTransformer2DModel",), ("x_embedder", "proj_out"), ("time_text_embed.*", "context_embedder"),
             _JOINT_CONTENT),
    "wan": (("WanTransformer3DModel",), ("proj_out",), ("condition_embedder.*",), None),
}
for _name, (_classes, _first_last, _time, _content) in _BUILT_IN.items():
    FAMILIES.register(_name, ModelFamily(_name, classes=_classes, first_last=_first_last, time_embedding=_time,
                                         **({"content": _content} if _content else {})))

def family_of(model_or_class_name) -> ModelFamily:
    """The family of a denoiser (instance, class or class name); :data:`GENERIC` when none is registered."""
    name = model_or_class_name if isinstance(model_or_class_name, str) else _class_name(model_or_class_name)
    return FAMILIES.find(lambda f: name in f.classes) or GENERIC


def _class_name(obj) -> str:
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__


def denoiser_of(pipe, component: str | None = None):
    """``(component name, module)`` of a pipeline's denoiser (``component`` picks one explicitly)."""
    from .errors import MixDQError

    names = (component,) if component else DENOISER_COMPONENTS
    for name in names:
        module = getattr(pipe, name, None)
        if module is not None:
            return name, module
    raise MixDQError(
        f"{type(pipe).__name__} has no {' or '.join(repr(n) for n in names)} component to quantize; pass the name "
        "of its denoiser component."
    )
