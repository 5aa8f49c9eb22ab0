"""labctl image build | import | list."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from orchestrator import output
from orchestrator.images import catalog, recipes


def register(commands, add_output) -> None:
    image = commands.add_parser("image", help="build, import and list golden images")
    sub = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    build = sub.add_parser("build", help="build an image from Debian packages (cached by recipe)")
    build.add_argument("name", choices=sorted(recipes.RECIPES), help="recipe name")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    add_output(build)
    build.set_defaults(handler=build_image)
    imported = sub.add_parser("import", help="register your own qcow2 or raw image")
    imported.add_argument("path", type=Path, help="image file (format detected by qemu-img)")
    imported.add_argument("--name", required=True, help="catalog name for the image")
    add_output(imported)
    imported.set_defaults(handler=import_image)
    listing = sub.add_parser("list", help="list the image versions in the catalog")
    add_output(listing)
    listing.set_defaults(handler=list_images)


def _describe(image: catalog.ImageVersion) -> dict:
    return {
        "name": image.name,
        "version": image.version,
        "ref": image.ref,
        "path": image.disk,
        "format": image.format,
        "virtual_size": image.virtual_size,
        "actual_size": image.actual_size,
        "sha256": image.sha256,
        "boot": "direct kernel" if image.boot else "firmware",
        "identity": image.identity,
        "source": image.source,
        "created": image.created,
    }


def _print_image(image: catalog.ImageVersion, args: argparse.Namespace, seconds: float) -> None:
    if args.output == "json":
        output.print_json({**_describe(image), "seconds": round(seconds, 1)})
        return
    print(f"image     {image.ref}")
    print(f"path      {image.disk}")
    print(f"format    {image.format}")
    print(f"virtual   {output.human_bytes(image.virtual_size)}")
    print(f"actual    {output.human_bytes(image.actual_size)}")
    print(f"sha256    {image.sha256}")
    print(f"took      {seconds:.1f} s")


def build_image(args: argparse.Namespace) -> int:
    started = time.monotonic()
    err = output.console(stderr=True)
    with err.status(f"building {args.name}") as status:
        def progress(message: str) -> None:
            status.update(f"building {args.name}: {message}")
            err.print(f"[{time.monotonic() - started:6.1f}s] {message}")

        image = recipes.build(args.name, force=args.force, progress=progress)
    _print_image(image, args, time.monotonic() - started)
    return 0


def import_image(args: argparse.Namespace) -> int:
    started = time.monotonic()
    image = catalog.register(args.name, args.path.resolve(), source=f"import:{args.path}")
    _print_image(image, args, time.monotonic() - started)
    return 0


def list_images(args: argparse.Namespace) -> int:
    images = catalog.list_images()
    if args.output == "json":
        output.print_json([_describe(image) for image in images])
        return 0
    rows = [
        (image.ref, image.format, output.human_bytes(image.virtual_size),
         output.human_bytes(image.actual_size), "kernel" if image.boot else "firmware",
         image.source, image.created)
        for image in images
    ]
    output.print_table(None, ("image", "format", "virtual", "actual", "boot", "source",
                              "created"), rows)
    return 0
