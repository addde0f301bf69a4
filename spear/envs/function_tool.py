"""Tools from plain Python functions.

:func:`function_tool` (also usable as a decorator) turns a function with type hints and a
Google-style docstring into a :class:`~spear.envs.base.Tool`: the OpenAI-style schema comes from
``transformers.utils.get_json_schema`` (the same one chat templates render), e.g.

.. code-block:: python

    def lookup_price(item: str) -> int:
        \"\"\"The unit price of an item, in cents.

        Args:
            item: The item's name, e.g. "pen".
        \"\"\"
        return PRICES[item]

    tool = function_tool(lookup_price, timeout_s=2.0)

In a :class:`~spear.envs.tool_env.ToolEnv` the arguments are checked against that schema before
the call (:func:`schema_problem`; a wrong type is an observation for the model, the function is
not called), the call runs under a timeout (the tool's own ``timeout_s``, else the env's), and an
exception, a hang or a huge output becomes an observation too. ``async def`` functions work: each
call runs the coroutine to completion in its own event loop (cancelled at ``timeout_s``).

Return values become text: strings as they are, bytes decoded, ``None`` as ``"null"`` and
anything else as JSON when it serialises (``12`` -> ``"12"``, ``{"a": 1}`` -> ``'{"a": 1}'``),
else ``repr``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

from spear.envs.base import Tool

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


class ToolDefinitionError(ValueError):
    """A function cannot be a tool (no docstring, an undocumented argument, an untyped one)."""


def _type_ok(value: Any, want: str) -> bool:
    types = _JSON_TYPES.get(want)
    if types is None:  # a type this checker does not know: accept
        return True
    if isinstance(value, bool) and want in ("integer", "number"):
        return False
    return isinstance(value, types)


def schema_problem(schema: dict[str, Any], value: Any, where: str) -> str | None:
    """Why ``value`` does not fit the JSON ``schema`` (the subset tool schemas use: ``type``,
    a list of types, ``nullable``, ``enum``, ``items``, ``prefixItems``, ``properties`` /
    ``required`` / ``additionalProperties``), or None. ``where`` names the value in the text."""
    if value is None and schema.get("nullable"):
        return None
    want = schema.get("type")
    wants = [want] if isinstance(want, str) else list(want) if isinstance(want, list) else []
    if wants and not any(_type_ok(value, w) for w in wants):
        return f"{where} must be of type {' or '.join(wants)}, got {type(value).__name__}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {', '.join(map(repr, schema['enum']))}, got {value!r}"
    if isinstance(value, list):
        return _array_problem(schema, value, where)
    if isinstance(value, dict):
        return _object_problem(schema, value, where)
    return None


def _array_problem(schema: dict[str, Any], value: list[Any], where: str) -> str | None:
    prefix = schema.get("prefixItems")
    if isinstance(prefix, list):
        if len(value) != len(prefix):
            return f"{where} must have {len(prefix)} items, got {len(value)}"
        for i, (sub, item) in enumerate(zip(prefix, value)):
            if (p := schema_problem(sub, item, f"{where}[{i}]")) is not None:
                return p
    items = schema.get("items")
    if isinstance(items, dict):
        for i, item in enumerate(value):
            if (p := schema_problem(items, item, f"{where}[{i}]")) is not None:
                return p
    return None


def _object_problem(schema: dict[str, Any], value: dict[str, Any], where: str) -> str | None:
    props: dict[str, Any] = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in value]
    if missing:
        return f"{where} is missing {', '.join(map(repr, missing))}"
    extra_schema = schema.get("additionalProperties")
    for key, item in value.items():
        sub = props.get(key, extra_schema if isinstance(extra_schema, dict) else None)
        if sub is None:
            if props and extra_schema is not True:
                return f"{where} has no key {key!r}; it takes {', '.join(props)}"
            continue
        if (p := schema_problem(sub, item, f"{where}[{key!r}]")) is not None:
            return p
    return None


def tool_output_text(value: Any) -> str:
    """A function's return value as the observation text (module docstring)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


class FunctionTool:
    """A :class:`~spear.envs.base.Tool` calling a Python function (see :func:`function_tool`)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        from transformers.utils import get_json_schema

        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        label = getattr(fn, "__name__", repr(fn))
        try:
            schema = get_json_schema(fn)["function"]
        except Exception as e:  # DocstringParsingException, TypeHintParsingException
            raise ToolDefinitionError(f"function {label} cannot be a tool: {e}") from None
        self.fn = fn
        self.name: str = name or schema["name"]
        self.description: str = description or schema.get("description", "")
        self.parameters: dict[str, Any] = schema.get(
            "parameters", {"type": "object", "properties": {}}
        )
        self.timeout_s = timeout_s
        self.is_async = inspect.iscoroutinefunction(fn)

    def __call__(self, **arguments: Any) -> str:
        if self.is_async:
            coro = self.fn(**arguments)
            if self.timeout_s is not None:
                coro = asyncio.wait_for(coro, self.timeout_s)
            value = asyncio.run(coro)
        else:
            value = self.fn(**arguments)
        return tool_output_text(value)

    def __repr__(self) -> str:
        return f"FunctionTool({self.name!r})"


def function_tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
) -> Any:
    """``fn`` as a :class:`FunctionTool`; without ``fn``, a decorator doing the same.

    ``name`` / ``description`` override the function's name and docstring summary;
    ``timeout_s`` bounds every call of this tool (default: the env's ``tool_timeout_s``).
    """
    if fn is None:
        return lambda f: FunctionTool(f, name=name, description=description, timeout_s=timeout_s)
    return FunctionTool(fn, name=name, description=description, timeout_s=timeout_s)


def as_tools(tools: Sequence[Tool | Callable[..., Any]]) -> list[Tool]:
    """Tools as given, with plain functions turned into :class:`FunctionTool` s; duplicate
    names are an error."""
    out: list[Tool] = [t if isinstance(t, Tool) else FunctionTool(t) for t in tools]
    names = [t.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ToolDefinitionError(f"two tools are named {', '.join(map(repr, dupes))}")
    return out
