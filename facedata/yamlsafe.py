"""YAML from files we do not write ourselves (``--model-set`` files, configs from a bucket), read with a bounded cost.

``yaml.safe_load`` builds no arbitrary objects, but it expands aliases: a 401-byte file of nested anchors
(the "billion laughs") took 6.4 s and 0.9 GB to load (issue #22). :func:`load_yaml` first walks the
parser's events, which costs time and memory in proportion to the text, and refuses, before anything is
built:

- anchors (``&name``) and aliases (``*name``, and so ``<<`` merges): a configuration file does not need them;
- more than ``max_nodes`` nodes (scalars, sequences, mappings) or nesting deeper than ``max_depth``;
- more than one document.

Only then is the text loaded with the safe loader, which also refuses a mapping that holds one key twice
(``agr: a.pt`` then ``agr: c.pt``; JSON's ``{"a": 1, "a": 2}`` too): PyYAML and ``json`` keep the last one
silently, and a model set would lose a model without a word. Every refusal is a :class:`YamlError` (a ``ValueError``)
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


class DuplicateKey(YamlError):
    """A mapping that holds one key twice: valid YAML (and JSON) whose readers keep the last value silently."""


def _short(text: str, n: int = _QUOTE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


def _line(event) -> int:
    mark = getattr(event, "start_mark", None)
    return (mark.line + 1) if mark is not None else 0


def _loader():
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_UNIQUE: dict = {}


def _unique_loader():
    """The safe loader (:func:`_loader`) refusing a mapping that holds one key twice (:func:`_check_unique`)."""
    base = _loader()
    if base not in _UNIQUE:
        class UniqueKeySafeLoader(base):
            def construct_mapping(self, node, deep=False):
                _check_unique(self, node)
                return super().construct_mapping(node, deep=deep)

        _UNIQUE[base] = UniqueKeySafeLoader
    return _UNIQUE[base]


def _check_unique(loader, node) -> None:
    """A :class:`YamlError` naming the key and both its lines when the mapping ``node`` holds a key twice
    (a merge key ``<<`` is left to the loader; an unhashable key too: the loader refuses it)."""
    seen: dict = {}
    for key_node, _ in getattr(node, "value", ()):
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)  # kept by the loader: built once
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
            if first is not None:
                raise DuplicateKey(f"line {line}: the key {_short(key, 40)!r} appears twice in one mapping (first on "
                                f"line {first}): YAML and JSON readers keep only the last; remove or rename one")
            seen[key] = line
        except TypeError:  # unhashable: the loader's own error says so
            continue


def load_yaml(text: str, max_nodes: int = DEFAULT_MAX_NODES, max_depth: int = DEFAULT_MAX_DEPTH):
    """``text`` -> the value ``yaml.safe_load`` gives, or :class:`YamlError` for a document with anchors or
    aliases, over ``max_nodes`` nodes, nested deeper than ``max_depth``, holding more than one document,
    a mapping with a key twice, or not YAML. JSON is YAML: a JSON file loads the same way."""
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
        doc = yaml.load(text, Loader=_unique_loader())  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)
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


def plain_scalar_text(text: str, key: str) -> str | None:
    """The value of the top-level mapping's ``key`` as ``text`` writes it, when it is a plain (unquoted) scalar:
    ``version: 1.10`` -> ``"1.10"`` (the loaded value is the float 1.1); None for a quoted, missing or
    non-scalar value. For a text :func:`load_yaml` has accepted (its size and nodes already checked)."""
    import yaml

    loader = _loader()(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError:
        return None
    finally:
        loader.dispose()
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key and isinstance(v, yaml.ScalarNode):
            return v.value if not v.style else None  # plain: None (SafeLoader) or "" (CSafeLoader)
    return None


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
