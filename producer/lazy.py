"""Modules loaded on first use instead of when imported, for the command line's start-up.

redis-py imports PyJWT for an Entra ID token class agentq never uses, and PyJWT imports
cryptography, ssl and http: about a fifth of what a reading command costs to start. The
standard library's LazyLoader cannot help: on Python 3.11 the import statement itself reads the
module's __spec__, which makes LazyLoader load it at once. A placeholder module that has a
__spec__ of its own and loads the real module when any other attribute is read does what
LazyLoader means to do."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


class _Deferred(types.ModuleType):
    """Stands in sys.modules for a module not loaded yet; the first attribute read that the
    placeholder lacks loads the real module and puts it in its place."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def defer(name: str) -> None:
    """Make `import name` free until the module is used. A module already loaded, or not
    installed, is left as it is."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    placeholder = _Deferred(name)
    placeholder.__spec__ = spec
    sys.modules[name] = placeholder
