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


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option's text with its default (``segfactory bench ...``), unless the default is
    None/False (the text says what happens then) or the text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
                and not isinstance(action.default, bool)):
            text += " (default: %(default)s)"
        return text


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
