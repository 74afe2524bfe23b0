from pathlib import Path

# The pre-measurement assumed router priors (small 0.45 / 0.8 with examples, large 0.8), pinned for
# tests whose routing expectations were written against them; the shipped agents/policy/priors.json
# holds the measured Qwen-pair cells and moves with every quality run.
ASSUMED_PRIORS = Path(__file__).resolve().parent / "priors_assumed.json"
