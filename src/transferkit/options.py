"""Command-line options generated from the dataclasses that hold them: a flag's name, type, choices, default and
help are written once, on the field, and the CLI, the library and the README cannot drift apart.

    @dataclass
    class ExportOptions:
        int8_budget_s: float = field(default=240.0, metadata=cli(metavar="SECONDS"))  # INT8: seconds ...

A field becomes an option when its metadata says so (`cli(...)`). Its help is the field's trailing comment
(with the comment lines right above it, for long ones), its default the dataclass default, shown once as
"(default: X)" (or `default_text`, for defaults that are worked out at run time). `add_options` adds them to an
argparse parser; `given` reads them back as keyword arguments for the dataclass; `flags` maps fields to flags
(what `transferkit serve` passes on to its child); `markdown_rows` is the same list as a README table.
Torch-free: the CLI builds every parser at start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from typing import Any

CLI = "transferkit.cli"
_FIELD = re.compile(r"^\s+(\w+): [^#\n]*?(?:\s#\s?(?P<comment>.*))?$")
_COMMENT = re.compile(r"^\s+#\s?(.*)$")


def cli(
    flag: str | None = None,
    *,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    type: Any = None,
    default_text: str | None = None,
) -> dict[str, Any]:
    """Field metadata that makes the field a command-line option; `flag` defaults to --field-name."""
    spec = {"flag": flag, "metavar": metavar, "choices": choices, "type": type, "default_text": default_text}
    return {CLI: {k: v for k, v in spec.items() if v is not None}}


def field_comments(cls: type, above_too: bool = True) -> dict[str, str]:
    """field name -> its comment: the lines of comment right above the field (unless `above_too` is False:
    TrainConfig keeps its design notes there), then its trailing comment."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        comment = _COMMENT.match(line)
        if comment:
            if above_too:
                above.append(comment.group(1).strip())
            continue
        found = _FIELD.match(line)
        if found and not line.strip().startswith(("def ", "return", "@")):
            trailing = (found.group("comment") or "").strip()
            out[found.group(1)] = " ".join([*above, trailing]).strip()
        above = []
    return out


def _options(cls: type) -> list[tuple[dataclasses.Field, dict[str, Any]]]:
    return [(f, f.metadata[CLI]) for f in dataclasses.fields(cls) if CLI in f.metadata]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def flags(cls: type, prefix: str = "") -> dict[str, str]:
    """field name -> its command-line flag, for every option field of `cls`."""
    return {f.name: spec.get("flag") or f"--{prefix}{f.name.replace('_', '-')}" for f, spec in _options(cls)}


def _dest(prefix: str, name: str) -> str:
    return prefix.replace("-", "_") + name


class DefaultsShown(argparse.RawDescriptionHelpFormatter):
    """Help that ends with "(default: X)", X read from the option itself, so no help string types a default:
    an option's `shown_default` (set by `show_default`: a dataclass field's default, or words for one worked out
    at run time), else its argparse default when that is a value (not None, not a switch's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = getattr(action, "shown_default", None)
        if shown is None and action.default not in (None, False, argparse.SUPPRESS):
            shown = action.default
        if shown is None or (isinstance(shown, bool) and not isinstance(action, argparse.BooleanOptionalAction)):
            return text
        return f"{text} (default: {str(shown).replace('%', '%%')})".strip()


def show_default(action: argparse.Action, value: Any) -> argparse.Action:
    """What --help says an option's default is, for one whose argparse default cannot say it (SUPPRESS or None,
    so that a config file or the environment can fill it)."""
    action.shown_default = value  # type: ignore[attr-defined]
    return action


def add_options(parser: argparse.ArgumentParser, cls: type, prefix: str = "", unset_is_none: bool = False) -> None:
    """One option per option field of `cls`, named `--{prefix}{field}` unless the field names its flag.
    `unset_is_none`: a flag not given parses as None (the caller falls back to the environment, say), else it
    parses as the field's default."""
    helps = field_comments(cls)
    names = flags(cls, prefix)
    for f, spec in _options(cls):
        default = _default(f)
        shown = spec.get("default_text", default)
        text = helps.get(f.name, "").replace("%", "%%").strip()
        kwargs: dict[str, Any] = {"dest": _dest(prefix, f.name), "help": text}
        kwargs["default"] = None if unset_is_none else default
        if isinstance(default, bool):
            show_default(parser.add_argument(names[f.name], action=argparse.BooleanOptionalAction, **kwargs), shown)
            continue
        kwargs["type"] = spec.get("type") or (type(default) if default is not None else str)
        if "choices" in spec:
            kwargs["choices"] = spec["choices"]
        kwargs["metavar"] = spec.get("metavar") or (None if "choices" in spec else f.name.upper())
        show_default(parser.add_argument(names[f.name], **kwargs), shown)


def given(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The option fields of `cls` found in `args`, as keyword arguments; None (not given) left out."""
    values = {f.name: getattr(args, _dest(prefix, f.name), None) for f, _ in _options(cls)}
    return {k: v for k, v in values.items() if v is not None}


def markdown_rows(cls: type, prefix: str = "") -> list[str]:
    """`| flag | default | what it does |` rows for a README table, from the same fields."""
    helps, names = field_comments(cls), flags(cls, prefix)
    return [
        f"| `{names[f.name]}` | {spec.get('default_text', _default(f))} | {helps.get(f.name, '')} |"
        for f, spec in _options(cls)
    ]
