"""Reproducing the paper: the manifest (validation and run plans), the runner (provenance, training
subprocesses, skip/resume), results from run artifacts, and the figures, tables and number macros."""
