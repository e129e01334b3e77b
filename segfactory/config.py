"""Typed configs: YAML file + ``key=value`` overrides -> validated pydantic model.

Every stage defines a pydantic model (``extra="forbid"`` so typos are caught) and loads it with
:func:`load_config`. Validation errors become one :class:`~segfactory.errors.UserError` line that names
the field, the bad value and the fix.

A config file may build on others: ``extends: [base.yaml, ...]`` (or one name) at the top level, or inside any
section (``pretrain: {extends: pretrain_tiny.yaml, train: {steps: 100}}``: the base file's content becomes that
section's base). Bases are found next to the file first, then in ``configs/``; they are merged deep, in order,
under the file's own keys (mappings merge key by key; lists and values replace). The resolved config, saved next
to outputs, has no ``extends`` left.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer
from pydantic_core import PydanticCustomError

from segfactory.errors import UserError
from segfactory.io import atomic_write_text, canonical_hash

M = TypeVar("M", bound=BaseModel)

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXTENDS = "extends"
SECTION_ERROR = "section_invalid"


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class UnsaidDefaults(StrictModel):
    """A config section with fields added after configs were saved: each field of ``unsaid_defaults`` stays out of
    dumps while it has that value, so the resolved configs, config hashes and `segfactory run` stage keys of
    configs that never set it stay what they were before the field existed."""

    unsaid_defaults: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _defaults_unsaid(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for name, value in self.unsaid_defaults.items():
            if name in out and _same(out[name], value):
                del out[name]
        return out


def _same(dumped: Any, default: Any) -> bool:
    """A dumped value equals its unsaid default (a tuple default dumps as a list in JSON mode)."""
    if isinstance(dumped, list | tuple) and isinstance(default, list | tuple):
        return list(dumped) == list(default)
    return bool(dumped == default)


class DistributedTrainFields(StrictModel):
    """The ``train.devices`` / ``train.backend`` / ``train.dist_timeout_s`` fields that pretraining and
    fine-tuning share (data-parallel training under torchrun, :mod:`segfactory.distributed`)."""

    devices: int = Field(1, ge=1, description="data-parallel processes on this node (one per GPU; DDP under "
                         "torchrun). batch_size stays the global batch (each rank takes batch_size / world size); "
                         "on a machine without GPUs, devices > 1 runs one process unless train.backend=gloo")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="process-group backend: auto is nccl on "
                                                     "CUDA, gloo on the CPU")
    dist_timeout_s: float = Field(600.0, gt=0, description="a collective that waits longer fails the job (a dead "
                                  "rank stops the others instead of hanging them)")


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, turning missing/unparsable files into UserErrors."""
    path = Path(path)
    if not path.exists():
        alt = REPO_CONFIGS / path.name
        hint = f" (did you mean '{alt}'?)" if alt.exists() and alt != path else ""
        raise UserError(f"config file '{path}' does not exist{hint}", fix="pass the path to a YAML config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"config file '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}",
                        fix="fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping at the top level, got {type(data).__name__}",
                        fix="write the config as `key: value` lines")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML so ``3``, ``0.5``, ``[1, 2]``, ``true`` work."""
    if "=" not in item:
        raise UserError(f"override '{item}' is not of the form key=value", fix="write e.g. render.samples=32")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{item}' has an empty key", fix="write e.g. render.samples=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set the value at a dotted key (``train.lr``), making the missing sections; a whole-number key inside a list
    is an index (``data.real.0.path``: the first entry of ``data.real``).

    Raises:
        UserError: a key inside a value, a key into a list that is not an index, or an index out of range (naming
            the list's length).
    """
    node: dict[str, Any] | list[Any] = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            j = _list_index(node, keys, i)
            if last:
                node[j] = value
                return
            if node[j] is None:
                node[j] = {}
            child = node[j]
        else:
            if last:
                node[k] = value
                return
            if node.get(k) is None:
                node[k] = {}
            child = node[k]
        if not isinstance(child, dict | list):
            full = ".".join(keys[:i + 1])  # the value's whole key, as an override spells it
            raise UserError(f"override '{'.'.join(keys)}' goes inside '{full}', which is a value, not a section",
                            fix=f"set {full} itself, e.g. {full}=...")
        node = child


def _list_index(items: list[Any], keys: list[str], i: int) -> int:
    """``keys[i]`` of an override as an index into ``items``, the list at ``keys[:i]``."""
    where, dotted, n = ".".join(keys[:i]), ".".join(keys), len(items)
    whole = f"set the whole list, e.g. {where}=[...]"
    if not keys[i].isdigit():
        example = ".".join([where, "0", *keys[i:]])
        raise UserError(f"override '{dotted}': '{where}' is a list, and '{keys[i]}' is not an index of it",
                        fix=f"address an entry by its index (0..{n - 1}), e.g. {example}=..." if n else
                        f"the list is empty: {whole}")
    index = int(keys[i])
    if index >= n:
        raise UserError(f"override '{dotted}': index {index} is out of range: '{where}' has {n} "
                        f"entr{'y' if n == 1 else 'ies'}",
                        fix=f"use an index in 0..{n - 1}, or {whole}" if n else whole)
    return index


def fill_paths(data: dict[str, Any], dotted: str, paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Give the entries of the list at ``dotted`` the ``paths`` of a repeatable flag (``--real DIR``), in order:
    path N replaces the ``path`` of entry N, or fills it when the entry has none (an entry of only a ``remap``
    waits for its folder), keeping the entry's other keys; entries beyond the paths are dropped, paths beyond the
    entries become ``{path: P}`` entries. A bare-path entry (``real: [DIR]``) is replaced.

    Returns:
        The dotted keys set (``data.real.0.path``, ...), for naming the flag in errors.
    """
    keys = dotted.split(".")
    node: Any = data
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    if node is not None and not isinstance(node, list):
        return []  # not a list (a bad override or file): validation names it, with its source
    entries = node or []
    out: list[Any] = []
    for i, p in enumerate(paths):
        entry = entries[i] if i < len(entries) else None
        out.append({**entry, "path": str(p)} if isinstance(entry, dict) else {"path": str(p)})
    set_dotted(data, keys, out)
    return [f"{dotted}.{i}.path" for i in range(len(out))]


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a config file with the files it ``extends`` merged in (bases first, in order, then the file).

    Raises:
        UserError: a missing or unparsable file or base, a bad ``extends`` value, or a cycle of bases.
    """
    return _resolve_file(Path(path), ())


def _resolve_file(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    real = path.resolve()
    if real in chain:
        loop = " -> ".join(p.name for p in (*chain[chain.index(real):], real))
        raise UserError(f"config '{chain[0]}' extends itself: {loop}",
                        fix=f"remove one of these `{EXTENDS}` entries")
    return _resolve_node(read_yaml(path), path, (*chain, real), "")


def _resolve_node(node: dict[str, Any], file: Path, chain: tuple[Path, ...], section: str) -> dict[str, Any]:
    """``node`` with its own ``extends`` (and those of the sections inside it) resolved."""
    where = f"config '{file}'" + (f", section '{section}'" if section else "")
    bases = node.get(EXTENDS) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise UserError(f"{where}: {EXTENDS}={bases!r} is not a file name or a list of them",
                        fix=f"write e.g. `{EXTENDS}: [pretrain_tiny.yaml]`")
    out: dict[str, Any] = {}
    for base in bases:
        _deep_merge(out, _resolve_file(_find_base(base, file, where), chain))
    own = {k: _resolve_node(v, file, chain, f"{section}.{k}" if section else k) if isinstance(v, dict) else v
           for k, v in node.items() if k != EXTENDS}
    return _deep_merge(out, own)


def _find_base(name: str, file: Path, where: str) -> Path:
    """A base config: absolute, else relative to the extending file's folder, else in ``configs/``."""
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [file.parent / path, REPO_CONFIGS / path]
    for c in candidates:
        if c.is_file():
            return c
    looked = " and ".join(f"'{c.parent}'" for c in candidates)
    raise UserError(f"{where}: {EXTENDS} '{name}' does not exist (looked in {looked})",
                    fix=f"give the base's path relative to '{file.parent}', or a file name in '{REPO_CONFIGS}'")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into ``base`` (in place): mappings key by key, anything else replaces."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def load_config(model: type[M], path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None,
                paths: dict[str, Sequence[str | os.PathLike[str]] | None] | None = None) -> M:
    """Load and validate a config.

    Precedence, lowest first: the model's defaults, the files ``path`` extends (in order), ``path`` itself,
    ``overrides``, ``extra``, ``paths``.

    Args:
        model: The pydantic model of the config.
        path: YAML file; ``None`` starts from the model's defaults.
        overrides: ``key=value`` strings applied in order after the file.
        extra: Already-parsed overrides (from dedicated CLI flags) as ``{"a.b": value}``; applied last.
        paths: Repeatable path flags of lists of sources, as ``{"data.real": [DIR, ...]}`` (``--real DIR``):
            they give the list's entries their paths in order (:func:`fill_paths`), before validation, so an entry
            with settings but no path (``real: [{remap: {...}}]``) takes its path from the flag. ``None`` or an
            empty list leaves the list as it is.

    Returns:
        The validated config.

    Raises:
        UserError: naming the field, the bad value and the fix.
    """
    data = read_config(path) if path is not None else {}
    path_flags = {dotted: given for dotted, given in (paths or {}).items() if given}
    for dotted, given in path_flags.items():
        # first, so that an override can address the entries the flags make (`--real DIR data.real.0.remap=...`);
        # again below, so that the flags' paths win over the overrides'
        fill_paths(data, dotted, given)
    overridden: list[str] = []
    for item in overrides or []:
        keys, value = parse_override(item)
        if keys[-1] == EXTENDS:
            raise UserError(f"override '{item}': `{EXTENDS}` is read from config files only",
                            fix=f"put `{EXTENDS}: [...]` in the YAML file, or pass the base file as the config")
        set_dotted(data, keys, value)
        overridden.append(".".join(keys))
    for dotted, value in (extra or {}).items():
        if value is not None:
            set_dotted(data, dotted.split("."), value)
            overridden.append(dotted)
    for dotted, given in path_flags.items():
        overridden += fill_paths(data, dotted, given)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error_to_user_error(e, model, source=str(path) if path else "config",
                                             overridden=overridden) from None


def validate_section(model: type[M], data: Any) -> M:
    """Validate a section whose model is known only at validation time (e.g. a registry entry's own config), from
    inside a pydantic validator of the enclosing model.

    Raises:
        PydanticCustomError: wrapping the section's errors, so :func:`validation_error_to_user_error` still names
            the field inside the section (``pretrain.method.simclr.temperature``) and its valid keys.
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise PydanticCustomError(SECTION_ERROR, "{error}", {"error": e, "model": model}) from None


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Names valid at ``loc[:-1]`` inside ``model`` (for 'did you mean')."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(p for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def validation_error_to_user_error(err: ValidationError, model: type[BaseModel], source: str,
                                   prefix: str = "", overridden: Sequence[str] = ()) -> UserError:
    """Turn the first pydantic error into a UserError naming the field (``prefix.field``), value and fix; the
    error names ``source`` (the config file), or "override" when the field (or a section above it) was set by a
    ``key=value`` override or a flag (``overridden``: their dotted keys)."""
    first = err.errors()[0]
    count = err.error_count()
    loc = _clean_loc(first["loc"])
    here: type[BaseModel] = model  # the model the innermost location is relative to (for "valid keys here")
    rel = loc
    while first["type"] == SECTION_ERROR:  # a section validated by validate_section: descend into it
        inner: ValidationError = first["ctx"]["error"]
        here = first["ctx"]["model"]
        first = inner.errors()[0]
        count += inner.error_count() - 1
        rel = _clean_loc(first["loc"])
        loc = (*loc, *rel)
    field = ".".join([prefix] * bool(prefix) + [str(p) for p in loc]) or "<top level>"
    if any(field == k or field.startswith(f"{k}.") for k in overridden) or \
            (isinstance(first.get("input"), dict) and any(k.startswith(f"{field}.") for k in overridden)):
        source = "override"  # the command line set it (or made the section it is in, a.b=... for a missing a)
    etype = first["type"]
    value = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {count - 1} more problem(s))" if count > 1 else ""
    if etype == "extra_forbidden":
        known = _known_fields(here, rel)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{field.rsplit('.', 1)[0] + '.' if '.' in field else ''}{close[0]}'? " if close else ""
        fix = f"{hint}valid keys here: {', '.join(known)}" if known else "remove it"
        return UserError(f"{source}: unknown config key '{field}'{more}", fix=fix)
    if etype == "list_type" and isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
        # `a.0.b=...` where the file sets no list `a`: the override made a section of index keys
        return UserError(f"{source}: {field} is not set, so {field}.{next(iter(value))} indexes no entry{more}",
                         fix=f"set the whole list, e.g. {field}=[...]")
    if etype == "missing":
        return UserError(f"{source}: required config key '{field}' is missing{more}", fix=f"set {field}=...")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    fix = (first.get("ctx") or {}).get("fix") or _generic_fix(field, etype, first.get("ctx") or {})
    return UserError(f"{source}: {field}={shown} is invalid: {msg}{more}", fix=fix)


_BOUNDS = {"greater_than_equal": ("ge", "{} or more"), "greater_than": ("gt", "more than {}"),
           "less_than_equal": ("le", "{} or less"), "less_than": ("lt", "less than {}")}
_KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "string": "a string",
          "list": "a list ([a, b])", "dict": "a mapping ({key: value})"}


def _generic_fix(field: str, etype: str, ctx: dict[str, Any]) -> str:
    """The fix of a validation error without its own: what to set, not the reason again (the message says it)."""
    if etype in _BOUNDS:
        key, text = _BOUNDS[etype]
        return f"set {field} to {text.format(ctx.get(key))}"
    if etype == "literal_error" and ctx.get("expected"):
        return f"set {field} to one of {ctx['expected']}"
    kind = next((v for k, v in _KINDS.items() if etype.startswith(f"{k}_")), None)
    if kind:
        return f"set {field} to {kind}"
    return f"set {field} to another value, or remove it to use the default"


def save_resolved(cfg: BaseModel, path: str | os.PathLike[str]) -> None:
    """Write the fully resolved config (defaults filled in, paths absolute: :func:`resolved_dump`) as YAML next to
    an output, so that it re-runs from any working directory."""
    atomic_write_text(path, yaml.safe_dump(resolved_dump(cfg), sort_keys=False))


def resolved_dump(cfg: BaseModel) -> dict[str, Any]:
    """``cfg.model_dump(mode="json")`` with every relative ``Path`` field (data folders, encoder and model dirs)
    made absolute against the working directory; references such as ``sample:NAME/SPLIT`` stay as they are.

    Only what is *saved* changes: hashes and stage keys (:func:`hash_config`) are of the config as given."""
    dumped: dict[str, Any] = _absolute_paths(cfg).model_dump(mode="json")
    return dumped


def absolute_path(value: str | os.PathLike[str]) -> Path:
    """A path as saved records hold it: absolute against the working directory (a re-run from anywhere finds it);
    a reference such as ``sample:NAME/SPLIT`` or ``skimage:data`` as it is."""
    p = Path(value)
    return p if p.is_absolute() or (p.parts and ":" in p.parts[0]) else p.absolute()


def _absolute_paths(value: Any) -> Any:
    if isinstance(value, Path):
        new = absolute_path(value)
        return value if new == value else new
    if isinstance(value, BaseModel):
        update = {}
        for name in type(value).model_fields:
            v = getattr(value, name)
            new = _absolute_paths(v)
            if new is not v:
                update[name] = new
        return value.model_copy(update=update) if update else value
    if isinstance(value, (list, tuple)):
        items = [_absolute_paths(v) for v in value]
        return type(value)(items) if any(a is not b for a, b in zip(items, value, strict=True)) else value
    if isinstance(value, dict):
        out = {k: _absolute_paths(v) for k, v in value.items()}
        return out if any(out[k] is not value[k] for k in value) else value
    return value


def hash_config(section: BaseModel | dict[str, Any], length: int = 16) -> str:
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    # A training config's ``tracking`` section (segfactory/tracking.py) says where runs are watched, not what they
    # produce: it is never part of a hash.
    data = {k: v for k, v in data.items() if k != "tracking"}
    return canonical_hash(data, length)
