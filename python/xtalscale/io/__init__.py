"""Readers and writers for real data files: DIALS .refl/.expt, MTZ, XDS."""
