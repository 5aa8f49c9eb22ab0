"""State: desktop facts in libvirt domain metadata, plus a local journal of operations."""
