"""PRIME on the credit-assignment demo task: long chains of one-digit steps (prime_jax/data/chains.py).

    python -m prime_jax.main --config=configs/tiny_chains.py

configs/tiny.py's model, rollout and PRM settings on a different task: `Chain 7-5+4-3+2+1` answered in
five `a<op>x=r` lines and a \\boxed{}. Every step is easy, but one slipped step makes the final answer
wrong, so an outcome reward says only that a response failed, while a token-level reward can point at
the wrong result digit. The SFT demonstrations slip systematically (sft.flawed_steps): a clean SFT of
this task is either ~100% right or on a cliff, while RL is for a model with errors it repeats.
benchmarks/README.md ("Chains from an SFT with systematic slips") has what it measured: over 6 seeds both
PRIME and outcome-only RLOO gain ~19 points held-out in 150 steps, PRIME -0.5 +- 1.3 points against it;
with a perfect step-level reward in the PRM's place (--config.algo.process_source=oracle) +7.9 +- 6.3, from
penalising right answers reached through wrong steps, which outcome labels call right. The frozen SFT
model's log-prob as the process reward (--config.algo.process_source=ref_logprob --config.algo.prm_ref=freeze,
a diagnostic) gets most of that: +6.9 +- 4.4; the implicit reward subtracts it.
With slips that cannot cancel (--config.sft.flaw_direction=up) outcome-only RLOO fixes five-step chains by
itself, and ten-step chains bring the cancelling back through the model's own errors (benchmarks/README.md,
"Where an outcome label already says where").
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
    c.data.synthetic.min_steps = 5  # chain length (steps); about 34 response tokens
    c.data.synthetic.max_steps = 5
    c.data.max_prompt_tokens = 48
    c.rollout.max_new_tokens = 44
    c.total_steps = 150
    c.checkpoint_every = 50
    # 27 of the 90 step types (a, op, x) are demonstrated with a result one off 60% of the time: the SFT model
    # slips there when sampling and, where it learned the slip as the likelier token, greedily too (46% held-out
    # greedy on seed 0; 48% of the demonstrations end on a wrong answer). A chain passes 1.3 such steps on average
    # (38% of chains two or more), any of which can make the response wrong: credit that an outcome reward spreads
    # over the whole response.
    c.sft.flawed_steps = 0.3
    c.sft.flaw_prob = 0.6
    c.sft.num_examples = 2000  # the flawed demonstrations' rates need many of them (tiny.py's arithmetic SFT uses 200)
    # The spec's temperature: at tiny.py's 0.7 the SFT model answered most chains the same way in all 4 samples,
    # the accuracy filter kept 5-15% of the groups and 60-80% of the steps had no update at all (clean SFT).
    c.rollout.temperature = 1.0
    return c
