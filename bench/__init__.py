"""vnicd's benchmark: vnicd against raw libvirt-python and virsh, on the same VMs in one run."""
