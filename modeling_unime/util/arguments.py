"""Recipe arguments: dataclasses parsed from a YAML ``--config`` file and the command line, as TRL's scripts do
(``TrlParser``: ``--config file.yaml`` plus any field as a flag, ``--help`` listing every field with its help).

Two things TRL's parser does not do, which the recipes need:

- **Sections.** The YAML configs group keys (``training:``, ``data:``, ``mining:``...). A section maps to fields by a
  prefix: with ``sections={"data": "data_", "training": ""}``, ``data: {train: x}`` sets the field ``data_train`` and
  ``training: {learning_rate: 1e-4}`` sets ``learning_rate``. On the command line every field is a flag by its field
  name (``--data_train x``, ``--learning_rate 1e-4``).
- **Strict keys.** A key of the YAML file that names no field is an error naming the file, the key and the closest
  field names: a misspelt key never falls back to a default silently.

Precedence: a command-line flag over the YAML file over the dataclass default.

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class ScriptArguments:
    ...     model: str = field(default="tiny:qwen2_vl", metadata={"help": "folder, repo id or tiny:<family>"})
    ...     data_train: str = field(default="synthetic:8", metadata={"help": "training data"})
    >>> import tempfile, os
    >>> config = os.path.join(tempfile.mkdtemp(), "recipe.yaml")
    >>> _ = open(config, "w").write("model: my-model\\ndata:\\n  train: pairs.json\\n")
    >>> (args,) = parse_recipe_arguments([ScriptArguments], ["--config", config, "--model", "other"],
    ...                                  sections={"data": "data_"})
    >>> args.model, args.data_train
    ('other', 'pairs.json')
    >>> _ = open(config, "w").write("modle: my-model\\n")
    >>> parse_recipe_arguments([ScriptArguments], ["--config", config])
    Traceback (most recent call last):
    ...
    ValueError: ...recipe.yaml: unknown key 'modle' (did you mean 'model'?). Every key must name a recipe field; \
see --help.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["flatten_config", "load_recipe_yaml", "parse_recipe_arguments", "recipe_parser"]


def recipe_parser(dataclass_types: Sequence[type], description: str | None = None):
    """An ``HfArgumentParser`` over ``dataclass_types`` with a ``--config`` option (YAML file)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file of field values (sections as in recipes/configs/); flags override it")
    return parser


def flatten_config(config: Mapping[str, Any], sections: Mapping[str, str], where: str = "config") -> dict[str, Any]:
    """The YAML mapping as ``{field name: value}``: a section's keys get its prefix, other keys stay as they are.

    Example:
        >>> flatten_config({"model": "m", "data": {"train": "t"}, "training": {"seed": 1}},
        ...                {"data": "data_", "training": ""})
        {'model': 'm', 'data_train': 't', 'seed': 1}
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}: section {key!r} must be a mapping of keys, got {type(value).__name__}.")
            items = [(sections[key] + str(inner), inner_value) for inner, inner_value in value.items()]
        else:
            items = [(str(key), value)]
        for name, item_value in items:
            if name in flat:
                raise ValueError(f"{where}: the key {name!r} is given twice (at the top level and in a section).")
            flat[name] = item_value
    return flat


def _unknown_key_error(where: str, key: str, fields: Sequence[str], sections: Mapping[str, str],
                       value: Any = None) -> ValueError:
    # Report the key as written in the file (a section key without its prefix) and suggest what was meant.
    close_sections = difflib.get_close_matches(key, list(sections), n=2, cutoff=0.6)
    if isinstance(value, Mapping) and close_sections:  # a mapping under a near-section name: a misspelt section
        return ValueError(f"{where}: unknown section {key!r} (did you mean the section "
                          f"{', '.join(repr(name) for name in close_sections)}?). The sections are {sorted(sections)}; "
                          "other keys name recipe fields (see --help).")
    section = next((name for name, prefix in sections.items() if prefix and key.startswith(prefix)), None)
    written = f"{section}.{key[len(sections[section]):]}" if section else key
    close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(name) for name in close)}?)" if close else ""
    return ValueError(f"{where}: unknown key {written!r}{hint}. Every key must name a recipe field; see --help.")


def load_recipe_yaml(path: str | os.PathLike) -> Any:
    """The content of a recipe's YAML file (an empty file is ``{}``); malformed YAML raises ValueError naming the file,
    the line and the column rather than a bare ``yaml`` traceback."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{os.fspath(path)}: not valid YAML{place}: {problem}. Check the indentation and the "
                         "quoting there.") from None


def parse_recipe_arguments(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    sections: Mapping[str, str] | None = None,
    description: str | None = None,
) -> tuple[Any, ...]:
    """One instance of each dataclass, from the ``--config`` YAML file (if any) and the flags in ``argv``.

    Args:
        dataclass_types: the recipe's argument dataclasses (field names must be unique across them).
        argv: the command line (default ``sys.argv[1:]``).
        sections: YAML section name -> field-name prefix (see the module docstring).
        description: the ``--help`` text.
    """
    sections = dict(sections or {})
    parser = recipe_parser(dataclass_types, description)
    # The file first, on its own: required fields may be in it.
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config", default=None)
    known, _ = config_only.parse_known_args(argv)
    fields = [field.name for kind in dataclass_types for field in dataclasses.fields(kind) if field.init]
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {os.fspath(path)!r}: no such file.")
        config = load_recipe_yaml(path)
        if not isinstance(config, Mapping):
            raise ValueError(f"{path}: a recipe config is a mapping of keys, got {type(config).__name__}.")
        flat = flatten_config(config, sections, where=str(path))
        for key, value in flat.items():
            if key not in fields:
                raise _unknown_key_error(str(path), key, fields, sections, value)
        parser.set_defaults(**flat)
        for action in parser._actions:  # a value from the file satisfies a required field
            if action.dest in flat:
                action.required = False
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:  # argparse's own way: usage and the message on stderr, exit status 2, no traceback
        flags = [option for action in parser._actions for option in action.option_strings]
        unknown = [value for value in remaining if value.startswith("-")] or remaining
        close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        parser.error(f"unrecognized arguments: {' '.join(remaining)}{hint}; --help lists every flag")
    return tuple(parsed[: len(dataclass_types)])
