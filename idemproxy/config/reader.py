"""Step 1 of loading: YAML -> plain values, the line of every field path, ``${VAR}`` expanded."""

from __future__ import annotations

import re
import typing

import yaml

from idemproxy.errors import ConfigProblem

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")

# Values a document may expand to, an alias counted at every use (a policy has a few hundred;
# 10,000 routes are about 120,000): nine nested anchors of nine aliases each ("billion
# laughs") are a few lines that expand to 9**10 values, which the reader would walk for hours.
# The document is sized before it is walked, so a larger one is refused at once.
MAX_VALUES = 1_000_000
# The tags a mapping or a list may carry: none but the default. PyYAML's safe constructors
# refuse other tags on scalars; on collections the reader walks the nodes itself, and read
# `!!python/object/apply:os.system [x]` as a plain list.
_COLLECTION_TAGS: dict[type[yaml.Node], str] = {
    yaml.MappingNode: "tag:yaml.org,2002:map",
    yaml.SequenceNode: "tag:yaml.org,2002:seq",
}


class YamlReader:
    def __init__(self, text: str, environ: typing.Mapping[str, str]) -> None:
        self.text = text
        self.environ = environ
        self.lines: dict[str, int] = {}
        # The text of each unquoted scalar that held a ${VAR}: YAML types it after expansion
        # (so it can fill a number), but a string field takes the text as expanded.
        self.expanded: dict[str, str] = {}
        self.problems: list[ConfigProblem] = []

    def read(self) -> object:
        try:
            self.loader = yaml.SafeLoader(self.text)
        except yaml.YAMLError as exc:  # e.g. a NUL or another character YAML does not allow
            self.problems.append(ConfigProblem("", f"not valid YAML: {exc}"))
            return None
        try:
            node = self.loader.get_single_node()
        except RecursionError:
            self.problems.append(ConfigProblem("", "not valid YAML: nested too deeply"))
            return None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            problem = getattr(exc, "problem", None) or str(exc)
            self.problems.append(ConfigProblem("", f"not valid YAML: {problem}", line))
            return None
        finally:
            self.loader.dispose()
        if node is None:
            return {}
        if not self._within_budget(node):
            return None
        value = self._value(node, "")
        return {} if value is None else value  # a document of just "---" or "~" is empty

    def _within_budget(self, root: yaml.Node) -> bool:
        """Whether ``root`` expands to at most ``MAX_VALUES`` values; else a problem names the
        top-level field that expands most (merge keys and aliases counted at every use)."""
        sizes: dict[int, int] = {}
        try:
            total = _expanded_size(root, sizes)
        except RecursionError:  # reading it would stop there, then walk on to any sibling
            self.problems.append(ConfigProblem("", "not valid YAML: nested too deeply"))
            return False
        if total <= MAX_VALUES:
            return True
        path, line = "", root.start_mark.line + 1
        if isinstance(root, yaml.MappingNode) and root.value:
            key_node, _ = max(root.value, key=lambda pair: sizes.get(id(pair[1]), 0))
            path, line = str(getattr(key_node, "value", "")), key_node.start_mark.line + 1
        message = f"has more than {MAX_VALUES:,} values, each alias (*name) counted at every use"
        self.problems.append(ConfigProblem(path, message, line))
        return False

    def _value(self, node: yaml.Node, path: str) -> object:
        self.lines.setdefault(path, node.start_mark.line + 1)
        try:
            return self._construct(node, path)
        except RecursionError:
            message = "nested too deeply (or an alias refers to itself)"
            self.problems.append(ConfigProblem(path, message, node.start_mark.line + 1))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or node.start_mark
            problem = getattr(exc, "problem", None) or str(exc)
            self.problems.append(ConfigProblem(path, f"not valid here: {problem}", mark.line + 1))
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            # PyYAML's constructors raise these for e.g. `!!int abc` or a 5000-digit number.
            message = f"cannot read this value ({type(exc).__name__})"
            self.problems.append(ConfigProblem(path, message, node.start_mark.line + 1))
        return None

    def _construct(self, node: yaml.Node, path: str) -> object:
        default_tag = _COLLECTION_TAGS.get(type(node))
        if default_tag is not None and node.tag != default_tag:
            raise yaml.constructor.ConstructorError(
                None, None, f"the tag {node.tag!r} is not allowed", node.start_mark
            )
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
            result: dict[str, object] = {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node)
                if not isinstance(key, str):
                    key = str(key)
                child = f"{path}.{key}" if path else key
                self.lines[child] = key_node.start_mark.line + 1
                if key in result:
                    self._problem(child, "duplicate field")
                    continue
                result[key] = self._value(value_node, child)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self._value(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        value = self.loader.construct_object(node)
        if isinstance(value, str) and "${" in value:
            return self._expand(node, value, path)
        return value

    def _expand(self, node: yaml.Node, text: str, path: str) -> object:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.environ and (default is None or self.environ[name] != ""):
                return self.environ[name]
            if default is not None:
                return default
            self._problem(path, f"environment variable {name} is not set (write ${{{name}:-}})")
            return ""

        if "${" in ENV_REF.sub("", text):
            # ${VAR-x}, ${ VAR }, ${VAR:=x} ...: kept as text, `token: ${TOKEN-}` would be a
            # token anyone reading the file knows. The value is not echoed (it may be a secret).
            self._problem(path, "a ${ that starts no reference: write ${NAME} or ${NAME:-default}")
        expanded = ENV_REF.sub(substitute, text)
        if getattr(node, "style", None) is None:  # a plain scalar: let YAML type the result
            self.expanded[path] = expanded
            tag = self.loader.resolve(yaml.ScalarNode, expanded, (True, False))  # type: ignore[no-untyped-call]
            return self.loader.construct_object(yaml.ScalarNode(tag, expanded))
        return expanded

    def _problem(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(path, message, self.lines.get(path)))


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values ``node`` expands to; an alias is the same node object, so each node is
    sized once (``sizes``) and its size counted at every use. A node that contains itself
    counts once there: reading it reports the loop."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = 1
    size = 1
    if isinstance(node, yaml.MappingNode):
        merged: dict[int, yaml.Node] = {}  # merge keys take each mapping's members once
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":
                items = value.value if isinstance(value, yaml.SequenceNode) else [value]
                merged.update((id(item), item) for item in items)
            else:
                size += _expanded_size(key, sizes) + _expanded_size(value, sizes)
        size += sum(_expanded_size(item, sizes) for item in merged.values())
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes) for item in node.value)
    sizes[id(node)] = size
    return size
