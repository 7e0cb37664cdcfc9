"""Benchmark evaluation: `python -m prime_jax.evaluate`'s body and the trainer's held-out evaluator.

Its rooms, in the order an evaluation uses them:

* ``checkpoints``: what to evaluate (``--checkpoint`` / ``--prm`` / ``--reference`` resolved to a
  ``CheckpointSpec``), loading it through the run builder's functions, and its tokenizer;
* ``results``: the settings (``EvalSettings``), a generation and a benchmark's result, and the
  metrics (pass@k, avg@n, maj@k, best@n, prm_vote@n) - host-side, no jax;
* ``lib``: one benchmark evaluated (render → generate → grade → metrics), resumable by chunks;
* ``prm_scorer``: the implicit PRM's q of finished responses (best-of-n, the token-reward pages);
* ``progress``: each graded chunk on disk as soon as it is graded (resume after an interruption);
* ``report``: the output files (``scores.md`` beside the published results, ``scores.json``,
  ``<benchmark>.jsonl``, the workdir's index) and the console's tables;
* ``run``: one whole evaluation (``evaluate``), which the command line calls.
"""
