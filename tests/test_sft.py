"""The SFT warm start: data layout and that it learns (small, fast)."""

import numpy as np
import jax
from flax import nnx

from prime_jax.data import build_tiny_tokenizer, demonstration, make_problems
from prime_jax.models import Qwen2Config, Qwen2ForCausalLM, response_logprobs
from prime_jax.parallel import make_mesh
from prime_jax.train.sft import encode_examples, pad_examples, run_sft


def test_encode_and_pad_layout(tmp_path):
    tok = build_tiny_tokenizer(tmp_path / "tok")
    problems = make_problems(3, seed=0)
    examples, dropped = encode_examples(tok, [(p.messages, demonstration(p)) for p in problems])
    assert dropped == 0 and len(examples) == 3
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for (prompt, reply), p in zip(examples, problems):
        assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
        assert reply[-1] == eos
        assert tok.decode(reply[:-1]) == demonstration(p)
    batch = pad_examples(examples)
    P, R = batch["prompt_ids"].shape[1], batch["response_ids"].shape[1]
    for i, (prompt, reply) in enumerate(examples):
        assert batch["prompt_mask"][i].sum() == len(prompt) and batch["prompt_mask"][i, -1] == 1  # left-padded
        assert batch["response_mask"][i].sum() == len(reply) and batch["response_mask"][i, 0] == 1  # right-padded
        assert list(batch["prompt_ids"][i, P - len(prompt):]) == prompt
    too_long, dropped = encode_examples(tok, [(p.messages, demonstration(p)) for p in problems], max_response_tokens=3)
    assert too_long == [] and dropped == 3


def _tiny_sft_setup(folder, num_problems: int, seed: int):
    """(encoded demonstrations, a 1-layer model config, a mesh) for SFT tests."""
    tok = build_tiny_tokenizer(folder / "tok")
    problems = make_problems(num_problems, seed=seed)
    examples, _ = encode_examples(tok, [(p.messages, demonstration(p)) for p in problems])
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         max_position_embeddings=128)
    return examples, config, make_mesh(-1, 1, 1)


def test_sft_learns_the_demonstrations(tmp_path):
    examples, config, mesh = _tiny_sft_setup(tmp_path, 8, seed=1)
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    batch = {k: jax.numpy.asarray(v) for k, v in pad_examples(examples).items()}

    def loss(m):
        lp = response_logprobs(m, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                               batch["response_mask"])
        return float(-(lp * batch["response_mask"]).sum() / batch["response_mask"].sum())

    before = loss(model)
    logged = []
    trained = run_sft(model, examples, steps=60, lr=1e-2, batch_size=8, mesh=mesh, seed=0, warmup_steps=5,
                      log_fn=lambda step, row: logged.append((step, row)), log_every=30)
    after = loss(trained)
    assert [s for s, _ in logged] == [30, 60]
    assert np.isfinite(after) and after < 0.6 * before, (before, after)
    # deterministic: same seed, same result
    again = run_sft(Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)), examples, steps=60, lr=1e-2, batch_size=8,
                    mesh=mesh, seed=0, warmup_steps=5)
    assert loss(again) == after


def test_sft_stopped_and_resumed_ends_where_an_uninterrupted_run_ends(tmp_path):
    """should_stop after step 3 saves the state and raises SFTPreempted; resuming from that state
    trains the remaining steps on the batches an uninterrupted run draws (same weights at the end)."""
    import pytest

    from prime_jax.train.sft import SFTPreempted

    examples, config, mesh = _tiny_sft_setup(tmp_path, 12, seed=2)
    settings = dict(steps=7, lr=1e-2, batch_size=8, mesh=mesh, seed=0, warmup_steps=2)
    whole = run_sft(Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)), examples, **settings)
    saved, asked = [], []

    def should_stop():  # asked once after every step but the last: true after step 3 (SIGTERM then)
        asked.append(1)
        return len(asked) == 3

    with pytest.raises(SFTPreempted) as stopped:
        run_sft(Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)), examples, **settings,
                save_fn=lambda step, state: saved.append((step, jax.device_get(state))), should_stop=should_stop)
    assert stopped.value.step == 3 and [s for s, _ in saved] == [3]
    step, state = saved[0]
    resumed = run_sft(Qwen2ForCausalLM(config, rngs=nnx.Rngs(1)), examples, **settings,
                      resume=(step, jax.device_put(state)))
    same = jax.tree.map(lambda a, b: np.allclose(a, b, rtol=1e-6, atol=1e-7), nnx.state(whole, nnx.Param),
                        nnx.state(resumed, nnx.Param))
    assert all(jax.tree.leaves(same))

