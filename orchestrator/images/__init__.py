"""Golden images: building them from Debian packages, importing users' images, the catalog."""
