"""labctl: pools of lab desktops cloned from golden images on libvirt/QEMU hosts."""

__version__ = "0.1.0"
