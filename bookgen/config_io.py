"""Read experiment YAML files into :class:`ExperimentConfig`, apply ``--set`` overrides, write it back."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from bookgen.config import (
    PATH,
    PATH_OR_ID,
    PATH_UNLESS,
    RENAMED,
    REPLACED,
    ExperimentConfig,
    FieldError,
    GenerateConfig,
    ModelConfig,
    TokenizerConfig,
)
from bookgen.errors import ConfigError
from bookgen.fileio import write_text_atomic


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load ``path``, apply ``key.sub=value`` overrides, validate, and resolve relative paths."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the experiment file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): save the experiment file as UTF-8") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raise ConfigError(f"{path}: the experiment file is empty; it needs at least run.output_dir and data.source "
                          "(see experiments/tiny_cpu.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    given = {_apply_override(raw, item, path): item for item in overrides or []}
    return _build(ExperimentConfig, raw, prefix="", source=str(path), base_dir=path.resolve().parent,
                  overrides=given)


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently:
    an experiment that sets train.learning_rate twice trains with whichever comes later)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"line {line}: {key!r} is set twice in one section (first on line {seen[key]}); "
                                    "remove one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_generate_overrides(overrides: list[str]) -> GenerateConfig:
    """`bookgen generate --model DIR` without an experiment: only ``generate.*`` keys mean something."""
    raw: dict[str, Any] = {}
    given = {}
    for item in overrides:
        key = item.partition("=")[0]
        if not key.startswith("generate.") or key.count(".") != 1:
            raise ConfigError(f"--set {item}: without --cfg only generate.<key> settings apply "
                              "(see `bookgen config-help`)")
        given[_apply_override(raw, item, Path("--set"))] = item
    return _build(GenerateConfig, raw.get("generate", {}), prefix="generate.", source="--set", base_dir=Path("."),
                  overrides=given)


def _apply_override(raw: dict[str, Any], item: str, path: Path) -> str:
    """Set ``key=value`` in the raw YAML tree; returns the dotted key."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item}: the value is not valid YAML: {exc}") from exc
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part} is not a section in {path}")
        node = child
    node[parts[-1]] = value
    return key


def _build(cls: type, raw: Any, *, prefix: str, source: str, base_dir: Path,
           overrides: dict[str, str] | None = None) -> Any:
    """``overrides``: dotted key -> the ``--set`` item that gave it, so its errors name --set, not the file."""
    overrides = overrides or {}
    section = prefix.rstrip(".") or "top level"
    source = _where(section, overrides, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {section}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{_where_given(prefix + str(key), overrides, source)}: {prefix}{key}: unknown key{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if name not in raw:
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if no_default and dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, prefix=f"{dotted}.", source=source, base_dir=base_dir)
            elif no_default:
                raise ConfigError(f"{source}: {dotted}: required key is missing")
            continue
        tp = hints[name]
        section_tp = _section_type(tp)
        if section_tp is not None:  # a section; an optional one (model.lora) is off when null
            optional = section_tp is not tp
            kwargs[name] = None if optional and raw[name] is None else _build(
                section_tp, raw[name], prefix=f"{dotted}.", source=source, base_dir=base_dir, overrides=overrides)
            continue
        where = _where(dotted, overrides, source)
        replaced = f.metadata.get(REPLACED, {})
        if replaced and isinstance(raw[name], type(next(iter(replaced)))) and raw[name] in replaced:
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: {dotted}: {raw[name]!r} is no longer a value; use one of {choices} "
                              f"({raw[name]!r} meant {replaced[raw[name]]!r})")
        given, renamed = raw[name], f.metadata.get(RENAMED, {})
        if isinstance(given, str) and given in renamed:
            _notice(f"{where}: {dotted}: {given!r} is now spelled {renamed[given]!r} (the same setting); the old "
                    "spelling still works")
            given = renamed[given]
        value = _coerce(given, tp, dotted, where)
        keywords = f.metadata.get(PATH_UNLESS)
        if value is not None and f.metadata.get(PATH):
            value = Path(value) if Path(value).is_absolute() else (base_dir / value).resolve()
        elif value is not None and f.metadata.get(PATH_OR_ID):
            local = base_dir / value
            value = str(local.resolve()) if local.exists() else value
        elif isinstance(value, str) and keywords and value not in keywords:
            value = str(Path(value) if Path(value).is_absolute() else (base_dir / value).resolve())
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except FieldError as exc:
        dotted = f"{prefix}{exc.key}"
        raise ConfigError(f"{_where(dotted, overrides, source)}: {dotted}: {exc}") from exc


def _notice(message: str) -> None:
    """One line on stderr, from the first rank only (every rank loads the experiment)."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"notice: {message}", file=sys.stderr, flush=True)


def _section_type(tp: Any) -> type | None:
    """The dataclass of a section field (``X``) or of an optional section (``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (typing.Union, types.UnionType):
        inner = [o for o in get_args(tp) if o is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _where_given(dotted: str, overrides: dict[str, str], source: str) -> str:
    """Where an unknown key came from: a ``--set`` of it or of a key under it (``--set trian.lr=1``)."""
    item = next((item for key, item in overrides.items() if key == dotted or key.startswith(dotted + ".")), None)
    return f"--set {item}" if item is not None else source


def _where(dotted: str, overrides: dict[str, str], source: str) -> str:
    """Where a key's value came from, for its error: the ``--set`` item that gave it, else the file."""
    return f"--set {overrides[dotted]}" if dotted in overrides else source


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return ", ".join(repr(a) for a in get_args(tp))
    return "true or false" if tp is bool else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key}: expected {expected}, got {value!r}")

    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        for option in inner[:-1]:  # the first type the value fits (true/false before "auto")
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        try:
            return _coerce(value, inner[-1], key, source)
        except ConfigError:
            if len(inner) == 1:
                raise
            fail(" or ".join(_describe(o) for o in inner))
    if origin is Literal:
        if value not in get_args(tp):
            fail("one of " + ", ".join(repr(a) for a in get_args(tp)))
        return value
    if origin is dict:  # a free mapping (model.config): string keys, any YAML values
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            fail("a mapping with string keys")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            fail("a list")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `5e-5` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        if not math.isfinite(value):  # YAML reads .inf and .nan as floats; no setting means them
            fail("a finite number")
        return float(value)
    if tp is str or tp is Path:
        if not isinstance(value, str) or not value:
            fail("a non-empty string")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-able dict of a config tree (paths as strings)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def config_from_dict(data: dict[str, Any], source: str) -> ExperimentConfig:
    """Rebuild a config written by :func:`write_resolved` (paths are already absolute)."""
    return _build(ExperimentConfig, data, prefix="", source=source, base_dir=Path("/"))


def write_resolved(cfg: ExperimentConfig, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# model settings that leave the weights as they are: a checkpoint resumes across a change of these
RUNTIME_MODEL_KEYS = ("dropout", "attention", "activation_checkpointing")


def model_fingerprint(model: ModelConfig, tokenizer: TokenizerConfig) -> str:
    """Hash of what decides the shape of the weights: a checkpoint from another one cannot be loaded."""
    payload = {"model": config_to_dict(model), "tokenizer": config_to_dict(tokenizer)}
    for key in RUNTIME_MODEL_KEYS:
        payload["model"].pop(key, None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def describe_fields(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field: the source of `bookgen config-help` and the README table."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section_tp = _section_type(hints[f.name])
        if section_tp is not None:
            if section_tp is not hints[f.name]:  # optional: its own row says what unset means
                rows.append((f"{prefix}{f.name}", "None", str(f.metadata.get("help", ""))))
            rows.extend(describe_fields(section_tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        rows.append((f"{prefix}{f.name}", default, str(f.metadata.get("help", ""))))
    return rows
