"""The benchmark layer: `speccompile bench` (run.py: timing; prompts.py, methods.py, peers.py: what is timed;
stats.py: the figures; report.py: the JSON document and table; plot.py) and `speccompile gate` (gate.py)."""
