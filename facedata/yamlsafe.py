"""YAML from files we do not write ourselves (``--model-set`` files, configs from a bucket), read with a bounded cost.

``yaml.safe_load`` builds no arbitrary objects, but it expands aliases: a 401-byte file of nested anchors
(the "billion laughs") took 6.4 s and 0.9 GB to load (issue #22). :func:`load_yaml` first walks the
parser's events, which costs time and memory in proportion to the text, and refuses, before anything is
built:

- anchors (``&name``) and aliases (``*name``, and so ``<<`` merges): a configuration file does not need them;
- more than ``max_nodes`` nodes (scalars, sequences, mappings) or nesting deeper than ``max_depth``;
- more than one document.

Only then is the text loaded with the safe loader. Every refusal is a :class:`YamlError` (a ``ValueError``)
that names the line and never quotes more than a short piece of the text, including a value the safe
constructors cannot build (``version: 2001-13-45`` is a date with month 13; a 5,000-digit integer is over
Python's limit on digits), whose ``ValueError`` or ``OverflowError`` would otherwise escape; the caller adds
the file's name (core/modelset.py).
"""

from __future__ import annotations

DEFAULT_MAX_NODES = 10_000  # a model set of 100 members is about 300 nodes
DEFAULT_MAX_DEPTH = 32
_QUOTE_CHARS = 60  # at most this much of a value is quoted in an error
_MESSAGE_CHARS = 300
_MAX_INT_DIGITS = 4300  # Python's default limit on an int's decimal digits (sys.get_int_max_str_digits)
_MAX_INT = 10 ** _MAX_INT_DIGITS  # the smallest integer of more digits


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
        doc = yaml.load(text, Loader=_loader())  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)
        if _holds_huge_int(doc):
            raise ValueError(f"an integer of more than {_MAX_INT_DIGITS} digits")
        return doc
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
    except (ValueError, OverflowError) as e:  # a safe constructor's refusal of one value, not a YAML error
        line = _unbuildable_line(text)
        where = f"line {line}: " if line else ""
        raise YamlError(_short(f"{where}a value that cannot be read: {_short(e)}", _MESSAGE_CHARS)) from None


def _huge(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) >= _MAX_INT


def _holds_huge_int(doc) -> bool:
    """Whether ``doc`` holds an integer over Python's limit on digits: ``1:1:...:1`` (base 60) is built
    without that limit, and the ``str()`` of it a caller makes would be the ValueError this module keeps in."""
    stack = [doc]
    while stack:  # a tree (no aliases) of at most max_nodes nodes
        v = stack.pop()
        if _huge(v):
            return True
        if isinstance(v, dict):
            stack.extend(x for kv in v.items() for x in kv)
        elif isinstance(v, (list, set)):
            stack.extend(v)
    return False


def _unbuildable_line(text: str) -> int:
    """The line of the first scalar the safe constructor refuses (0 if none is found alone): looked for only
    once loading has failed, over a document already checked to hold at most ``max_nodes`` nodes."""
    import yaml

    loader = _loader()(text)
    try:
        stack = [loader.get_single_node()]
        while stack:
            node = stack.pop(0)
            if isinstance(node, yaml.ScalarNode):
                try:
                    if _huge(loader.construct_object(node)):
                        return node.start_mark.line + 1
                except (ValueError, OverflowError, yaml.YAMLError):
                    return node.start_mark.line + 1
            elif isinstance(node, yaml.SequenceNode):
                stack.extend(node.value)
            elif isinstance(node, yaml.MappingNode):
                stack.extend(x for kv in node.value for x in kv)
        return 0
    finally:
        loader.dispose()


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
