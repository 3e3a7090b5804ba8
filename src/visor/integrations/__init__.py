"""Bridges from other tools to VISOR checkpoints.

- `runner`: a saved checkpoint answering batches of (image, question) requests, greedy answers and answer
  log-likelihoods with the configuration and FLOPs of each; what any evaluation harness needs.
- `lmms_eval`: the lmms-eval model plugin (`--model visor`) over the runner. It imports lmms-eval, so nothing
  else imports it: lmms-eval loads it through the `lmms_eval.models` entry point.
- `lmms_tasks`: the synthetic suite written out as local lmms-eval tasks (no download).
"""
