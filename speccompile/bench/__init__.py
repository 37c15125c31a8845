"""The benchmark layer: `speccompile bench` (run.py: timing; settings.py, prompts.py, methods.py, peers.py: what is
timed; concurrency.py, multi_turn.py: its --streams and --multi-turn modes; machine.py: where it ran; stats.py: the
figures; report.py: the JSON document and table; outputs.py, plot.py), `speccompile gate` (gate.py), and a draft
head's teacher-forced agreement with the target (head_agreement.py, tools/head_agreement.py)."""
