"""The images labctl can build itself, by name."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from orchestrator.errors import ImageError
from orchestrator.images import catalog
from orchestrator.images.catalog import ImageVersion

Progress = Callable[[str], None]

# name -> (module, function, one-line description)
RECIPES: dict[str, tuple[str, str, str]] = {
    "debian12": ("orchestrator.images.debian", "build_debian12",
                 "Debian 12 with cloud-init, qemu-guest-agent and OpenSSH, generalized"),
    "tiny": ("orchestrator.images.tiny", "build_tiny",
             "busybox guest with qemu-ga and dropbear; boots in seconds, for tests"),
}


def build(name: str, *, force: bool = False, progress: Progress | None = None) -> ImageVersion:
    """Build (or reuse the cached build of) the recipe ``name``."""
    if name not in RECIPES:
        raise ImageError(
            f"no recipe named {name!r} (known: {', '.join(sorted(RECIPES))})",
            fix="use 'labctl image import PATH --name NAME' for an image of your own",
        )
    module_name, function_name, _ = RECIPES[name]
    builder = getattr(importlib.import_module(module_name), function_name)
    return builder(force=force, progress=progress)


def ensure(name: str, version: str | None = None, *,
           progress: Progress | None = None) -> ImageVersion:
    """Return the catalog's image ``name``, building it first if it is a recipe and missing."""
    try:
        return catalog.resolve(name, version)
    except ImageError:
        if name not in RECIPES or version:
            raise
    return build(name, progress=progress)
