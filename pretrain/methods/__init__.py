"""SSL methods, one module each (lightly's layout): ``pretrain/methods/<name>.py`` holds the method's config (a
pydantic model: its section ``method.<name>`` of the pretrain config) and its ``nn.Module``, registered together
with ``@register_method("<name>", <Config>)``. A new method is a new file; copy ``simclr.py``.

This package's ``__init__`` imports no torch: the method names are the module names (listed from the files,
see :class:`~segfactory.registry.Registry`), so ``segfactory pretrain --help`` and the ``method.name`` check are
cheap; a method's module (with torch and lightly) is imported when it is built or its config is validated.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import Field, create_model

from segfactory.config import StrictModel
from segfactory.registry import Registry

if TYPE_CHECKING:
    from pretrain.encoder import PooledEncoder
    from pretrain.methods.base import SSLMethod

    M = TypeVar("M", bound=type[SSLMethod[Any]])

METHODS: Registry[type[SSLMethod[Any]]] = Registry("method", package=__name__, exclude={"base"})


def register_method(name: str, config: type[StrictModel]) -> Callable[[M], M]:
    """Class decorator: register an :class:`SSLMethod` under ``name`` (its module's name) with its config class."""

    def deco(cls: M) -> M:
        cls.name = name
        cls.config_class = config
        METHODS.register(name)(cls)
        return cls

    return deco


@cache
def options_model() -> type[StrictModel]:
    """The options sections of the ``method`` config as one model: a field per registered method, typed by its
    config class (imports every method's module).

    ``name`` is listed too, so an unknown key's error lists every valid key of the section; it is validated by
    :class:`pretrain.config.MethodConfig` itself.
    """
    fields: dict[str, Any] = {"name": (str | None, None)}
    for name, cls in METHODS.load_all().items():
        fields[name] = (cls.config_class, Field(default_factory=cls.config_class))
    return create_model("MethodOptions", __base__=StrictModel, **fields)


def build_method(name: str, encoder: PooledEncoder, cfg_method: Any, total_steps: int) -> SSLMethod[Any]:
    """Instantiate a registered method with its options section ``cfg_method.<name>``.

    Raises:
        UserError: for an unknown name (listing the valid ones).
    """
    from lightly.models.modules.memory_bank import MemoryBankModule

    model = METHODS.get(name)(encoder, getattr(cfg_method, name), total_steps)
    for m in model.modules():
        # a disabled bank (size 0: SimCLR, MoCo with in-batch negatives) never reads its pointer, but lightly leaves
        # it uninitialized (torch.empty), and checkpoints keep it: zeroed, they are the same from run to run
        if isinstance(m, MemoryBankModule) and m.size[0] == 0:
            m.bank_ptr.zero_()
    return model
