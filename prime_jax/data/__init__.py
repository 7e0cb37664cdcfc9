"""Data: problems and their readers, packaged benchmarks, prompt rendering, the resumable
iterator, the synthetic demo tasks (arithmetic, chains) and their tiny tokenizer. No model code (no jax) here."""
from .iterator import ShuffledIterator, epoch_permutation
from .formats import FORMAT_FIELDS, FORMATS, detect_format, gsm8k_answer
from .problems import (
    CODE_TASK_SUFFIX,
    EURUS2_SYSTEM_PROMPT,
    INSTRUCTIONS,
    MATH_TASK_SUFFIX,
    STEP_BY_STEP_SUFFIX,
    DataError,
    DataUnavailableError,
    Problem,
    SkipStats,
    apply_system_prompt,
    instruction_error,
    instruction_suffix,
    last_boxed,
)
from .readers import (
    BENCHMARKS,
    MATH_EVAL_BENCHMARKS,
    benchmark_path,
    benchmarks_dir,
    check_source_name,
    load_benchmark,
    read_problems,
    write_verl_parquet,
)
from .render import render_prompt_texts, render_prompts
from .sets import held_out, load_eval_sets, load_train_problems, sft_pairs, system_prompt, task_suffix
from .sources import eval_source_names, read_sft_pairs, source_format
from .synthetic import demonstration, make_problems, sft_messages
from .synthetic_tasks import SYNTHETIC_TASKS, make_task_problems, task_demonstration
from .tiny_tokenizer import CHATML_TEMPLATE, build_tiny_tokenizer

__all__ = [
    "BENCHMARKS",
    "CHATML_TEMPLATE",
    "CODE_TASK_SUFFIX",
    "DataError",
    "DataUnavailableError",
    "EURUS2_SYSTEM_PROMPT",
    "FORMAT_FIELDS",
    "FORMATS",
    "INSTRUCTIONS",
    "SYNTHETIC_TASKS",
    "MATH_EVAL_BENCHMARKS",
    "MATH_TASK_SUFFIX",
    "Problem",
    "ShuffledIterator",
    "SkipStats",
    "apply_system_prompt",
    "benchmark_path",
    "benchmarks_dir",
    "build_tiny_tokenizer",
    "check_source_name",
    "demonstration",
    "detect_format",
    "epoch_permutation",
    "eval_source_names",
    "gsm8k_answer",
    "held_out",
    "instruction_error",
    "instruction_suffix",
    "last_boxed",
    "load_benchmark",
    "load_eval_sets",
    "load_train_problems",
    "make_problems",
    "make_task_problems",
    "read_problems",
    "read_sft_pairs",
    "render_prompt_texts",
    "render_prompts",
    "sft_messages",
    "sft_pairs",
    "source_format",
    "STEP_BY_STEP_SUFFIX",
    "system_prompt",
    "task_demonstration",
    "task_suffix",
    "write_verl_parquet",
]
