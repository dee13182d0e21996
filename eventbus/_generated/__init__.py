"""Code generated from protos/ by scripts/generate_protos.py; never edit by hand."""
