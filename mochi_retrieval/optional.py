"""Optional dependencies, imported where they are used, with an error that says what to install.

Example::

    faiss = import_faiss()                       # ImportError naming faiss-cpu / faiss-gpu-cu12
    coco = optional_import("pycocotools.coco", "pip install 'mochi-retrieval[detection]'")
"""
from __future__ import annotations

import importlib
from types import ModuleType

FAISS_INSTALL = "pip install faiss-cpu (or faiss-gpu-cu12 for GPU search)"


def optional_import(module: str, install: str, purpose: str | None = None) -> ModuleType:
    """Import ``module``, or raise ImportError naming ``install`` (the command that provides it)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = f"{purpose} needs" if purpose else "needs"
        raise ImportError(f"{what} the {module} module: {install}") from e


def import_faiss() -> ModuleType:
    """The faiss module (faiss-cpu is a core dependency, but may have been swapped out)."""
    return optional_import("faiss", FAISS_INSTALL, "backend='faiss'")


def faiss_available() -> bool:
    """Whether ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
