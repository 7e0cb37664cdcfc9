"""PRIME on the credit-assignment demo task: long chains of one-digit steps (prime_jax/data/chains.py).

    python -m prime_jax.main --config=configs/tiny_chains.py

configs/tiny.py's model, SFT, rollout and PRM settings on a different task: `Chain 7-5+4-3+2+1`
answered in five `a<op>x=r` lines and a \\boxed{}. Every step is easy, but one slipped step makes the
final answer wrong, so an outcome reward says only that a response failed, while a token-level
reward can point at the wrong result digit. See benchmarks/README.md ("A task where per-step credit
matters") for what it measured.
"""

import importlib.util
import os


def _tiny():
    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(os.path.dirname(__file__), "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _tiny()
    c.name = "tiny_chains"
    c.data.synthetic.task = "chains"
    c.data.synthetic.min_steps = 5  # chain length (steps); about 40 response tokens
    c.data.synthetic.max_steps = 5
    c.data.max_prompt_tokens = 48
    c.rollout.max_new_tokens = 44
    c.total_steps = 100
    # The spec's temperature: at tiny.py's 0.7 the SFT model answered most chains the same way in all 4
    # samples, the accuracy filter kept 5-15% of the groups and 60-80% of the steps had no update at all.
    c.rollout.temperature = 1.0
    # Process rewards at full weight (process_coef 1.0) only as the PRM earns it: weighted by how well it ranks
    # fresh samples (a moving average of prm/dpo_accuracy; 0 at chance, full from 0.65 on), and not lifted
    # above their size while the PRM is within 0.5 nats of its reference. Both are departures from the spec
    # (docs/algorithm.md); without them (the spec) PRIME fell from 64.5% to 44.5% held-out in 25 steps here.
    c.algo.process_coef = 1.0
    c.algo.process_ramp = "ranking"
    c.algo.process_norm_floor = 0.5
    # The PRM settings this task was measured with (tiny.py's until 2026-12-03): the dpo loss, the frozen SFT model
    # as the PRM's reference and one PRM update per step at 2e-5. tiny.py's newer ones (ce, the rollout policy as
    # reference, eight updates at 4e-5) were not measured on chains.
    c.algo.prm_loss = "dpo"
    c.algo.prm_ref = "freeze"
    c.prm_optim.lr = 2e-5
    c.batch.prm_mini_batch = 64
    return c
