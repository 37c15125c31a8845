"""The benchmark layer: `speccompile bench` (run.py: timing; prompts.py, methods.py, peers.py: what is timed;
stats.py: the figures; report.py: the JSON document and table; plot.py), `speccompile gate` (gate.py), and a
draft head's teacher-forced agreement with the target (head_agreement.py, tools/head_agreement.py)."""
