"""Provisioning desktops: full and linked clones as sequences of undoable steps."""
