"""Kernel ops. One sub-package per op: a plain torch reference beside the fast backends."""
