"""Lazy attributes of a package: names that import their module on first use (PEP 562), so that
`import titans` and `titans --help` do not import torch."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: str, lazy: dict[str, str], namespace: dict[str, Any]
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`: name -> the attribute of the submodule lazy[name]."""
    def __getattr__(name: str) -> Any:
        if name in lazy:
            return getattr(importlib.import_module(f".{lazy[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*namespace, *lazy])

    return __getattr__, __dir__
