"""The job modules `insect_exp.train`, `.sweep`, `.predict` and `.evaluate`, callable as the Python
API's functions of the same names (insect_exp/api.py).

A package attribute that names a submodule becomes that module as soon as anything imports it
(the command line, a sweep's job): a function of the same name in the package would be replaced
by it, and `from insect_exp import train` would find a function where it wants the module. So the
module itself is callable. Standard library only.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from typing import Any


class CallableModule(types.ModuleType):
    """A job module whose call is insect_exp.api's function of the module's name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        """The API function's (what help() and a notebook's `?` show)."""
        return inspect.signature(self._function())

    def _function(self) -> Any:
        api = importlib.import_module("insect_exp.api")
        return getattr(api, self.__name__.rsplit(".", 1)[-1])


def make_callable(module_name: str) -> None:
    """Make the (imported) module `module_name` callable as its API function."""
    if module_name == "__main__":  # run as `python -m insect_exp.predict`: nothing calls it
        return
    sys.modules[module_name].__class__ = CallableModule
