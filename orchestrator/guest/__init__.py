"""Talking to guests: the QEMU guest agent and SSH."""
