"""libvirt hosts: connections, accelerator probing and host facts."""
