"""Disks: qemu-img, replicas, overlays, full copies and identity seeds."""
