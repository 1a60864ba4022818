"""CPU harness for the Metal kernel sources (see harness.py and docs/kernels.md)."""
