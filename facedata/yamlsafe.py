"""YAML from files we do not write ourselves (``--model-set`` files, configs from a bucket), read with a bounded cost.

``yaml.safe_load`` builds no arbitrary objects, but it expands aliases: a 401-byte file of nested anchors
(the "billion laughs") took 6.4 s and 0.9 GB to load (issue #22). :func:`load_yaml` first walks the
parser's events, which costs time and memory in proportion to the text, and refuses, before anything is
built:

- anchors (``&name``) and aliases (``*name``, and so ``<<`` merges): a configuration file does not need them;
- more than ``max_nodes`` nodes (scalars, sequences, mappings) or nesting deeper than ``max_depth``;
- more than one document.

Only then is the text loaded with the safe loader. Every refusal is a :class:`YamlError` (a ``ValueError``)
that names the line and never quotes more than a short piece of the text.
"""

from __future__ import annotations

DEFAULT_MAX_NODES = 10_000  # a model set of 100 members is about 300 nodes
DEFAULT_MAX_DEPTH = 32
_QUOTE_CHARS = 60  # at most this much of a value is quoted in an error
_MESSAGE_CHARS = 300


class YamlError(ValueError):
    """YAML that is refused or cannot be parsed; the message names the line and quotes at most a short piece."""


def _short(text: str, n: int = _QUOTE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


def _line(event) -> int:
    mark = getattr(event, "start_mark", None)
    return (mark.line + 1) if mark is not None else 0


def _loader():
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str, max_nodes: int = DEFAULT_MAX_NODES, max_depth: int = DEFAULT_MAX_DEPTH):
    """``text`` -> the value ``yaml.safe_load`` gives, or :class:`YamlError` for a document with anchors or
    aliases, over ``max_nodes`` nodes, nested deeper than ``max_depth``, holding more than one document,
    or not YAML. JSON is YAML: a JSON file loads the same way."""
    import yaml

    if not isinstance(text, str):
        raise YamlError(f"YAML text must be a str, got {type(text).__name__}")
    nodes = depth = documents = 0
    try:
        for event in yaml.parse(text, Loader=_loader()):
            if isinstance(event, yaml.AliasEvent):
                raise YamlError(f"line {_line(event)}: an alias (*{_short(event.anchor, 40)}) is not accepted here: "
                                "write the value out")
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise YamlError(f"line {_line(event)}: more than one YAML document")
            if isinstance(event, (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                if event.anchor is not None:
                    raise YamlError(f"line {_line(event)}: an anchor (&{_short(event.anchor, 40)}) is not accepted "
                                    "here: write the value out")
                nodes += 1
                if nodes > max_nodes:
                    raise YamlError(f"line {_line(event)}: more than {max_nodes} YAML nodes")
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > max_depth:
                    raise YamlError(f"line {_line(event)}: nested deeper than {max_depth} levels")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)
    except YamlError:
        raise
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        context = getattr(e, "context", None)
        msg = f"{where}not valid YAML: {problem}" + (f" ({context})" if context else "")
        raise YamlError(_short(msg, _MESSAGE_CHARS)) from None
    except RecursionError:
        raise YamlError(f"nested deeper than {max_depth} levels") from None


def settings_from_dict(cls, d):
    """A frozen settings dataclass (``cls``) from a mapping read from YAML or JSON, refusing what it does not
    know: a value that is not a mapping, or a key that is not one of ``cls``'s fields, is a ``ValueError``
    that names the known ones. The values themselves are checked by ``cls``."""
    from dataclasses import fields

    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return cls(**d)
