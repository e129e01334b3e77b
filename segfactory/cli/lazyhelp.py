"""Help texts that list a registry's names, filled in when the help is printed.

Every ``segfactory`` invocation builds the whole parser, so a help text must cost nothing to declare. A
:class:`Names` text holds a ``{names}`` placeholder and a function returning the names; :class:`Parser` fills it
only in ``format_help`` (``--help``). The registries themselves read names without importing torch (see
:mod:`segfactory.registry`), so printing a command's help stays fast too.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable


class Names(str):
    """A help text whose ``{names}`` is replaced by ``", ".join(names())`` when the help is printed.

    Args:
        text: The help text, with ``{names}`` where the names go.
        names: Returns the names (imports the registry; called only for ``--help``).
    """

    names: Callable[[], Iterable[str]]

    def __new__(cls, text: str, names: Callable[[], Iterable[str]]) -> Names:
        self = super().__new__(cls, text)
        self.names = names
        return self

    def render(self) -> str:
        return str(self).replace("{names}", ", ".join(self.names()))


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (and, through ``add_subparsers``, its sub-parsers) that renders :class:`Names` texts
    in its description and argument help when its help is formatted."""

    def format_help(self) -> str:
        if isinstance(self.description, Names):
            self.description = self.description.render()
        for action in self._actions:
            if isinstance(action.help, Names):
                action.help = action.help.render()
        return super().format_help()
