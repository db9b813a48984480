"""vnicd: a per-host agent that rewires the virtual NICs of running VMs."""

__version__ = "0.1.0"
