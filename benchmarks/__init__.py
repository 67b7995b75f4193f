"""sn_ext benchmarks (not part of the library: sn_ext never imports this package)."""
