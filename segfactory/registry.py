"""Name -> factory registries: the one list of valid names, feeding ``--help``, config validation and "did you mean".

A registry is filled by ``@registry.register("name")`` decorators where the implementation lives (timm's
``register_model``). Where those modules import torch, the registry can be given the package that holds one module
per entry (``Registry("method", package="pretrain.methods")``, as Django finds its management commands): its names
are then the package's module names, listed from the file system without importing anything, and ``get(name)``
imports the entry's module on first use. So ``--help`` and name checks stay cheap, and adding a file is all it takes
to add an entry.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from typing import Generic, TypeVar

from segfactory.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories, filled by a ``@registry.register("name")`` decorator.

    Args:
        kind: What is registered ("scene", "method", ...); used in error messages.
        package: A package holding one module per entry, named like the entry (``<package>.<name>``), which
            registers it when imported. Its modules are listed, not imported, until an entry is looked up.
        exclude: Modules of ``package`` that are not entries (besides ``_private`` ones), e.g. ``{"base"}``.
    """

    def __init__(self, kind: str, *, package: str | None = None, exclude: Iterable[str] = ()):
        self.kind = kind
        self.package = package
        self.exclude = frozenset(exclude)
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    @cached_property
    def _modules(self) -> frozenset[str]:
        """Entry names of ``package``: its module files, found without importing them."""
        if self.package is None:
            return frozenset()
        spec = importlib.util.find_spec(self.package)
        paths = list(spec.submodule_search_locations or []) if spec else []
        return frozenset(m.name for m in pkgutil.iter_modules(paths)
                         if not m.name.startswith("_") and m.name not in self.exclude)

    def get(self, name: str) -> T:
        """The entry ``name``, importing its module first if it lives in ``package``.

        Raises:
            UserError: for an unknown name, with the closest match and the valid names.
        """
        if name not in self._items and name in self._modules:
            importlib.import_module(f"{self.package}.{name}")
            if name not in self._items:
                raise RuntimeError(f"module {self.package}.{name} does not register {self.kind} '{name}'")
        try:
            return self._items[name]
        except KeyError:
            raise UserError(self.unknown_message(name), fix=self.fix()) from None

    def load_all(self) -> dict[str, T]:
        """Every entry by name (imports every module of ``package``)."""
        return {name: self.get(name) for name in self.names()}

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {self.kind} '{name}'{hint}"

    def fix(self) -> str:
        return f"use one of: {', '.join(self.names())}"

    def validate(self, name: str) -> str:
        """Pydantic validator of a name field, ``Annotated[str, AfterValidator(REGISTRY.validate)]``: the config
        error then names the field and value, the closest match, and lists the valid names as the fix."""
        if name not in self:
            from pydantic_core import PydanticCustomError

            raise PydanticCustomError("unknown_name", "{message}", {"message": self.unknown_message(name),
                                                                     "fix": self.fix()})
        return name

    def names(self) -> list[str]:
        return sorted(set(self._items) | self._modules)

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
