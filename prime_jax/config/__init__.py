"""The configuration schema of a PRIME run (`schema.py`), and its validation (`checks.py`).

Every config file (``configs/*.py``) starts from :func:`base_config` and changes fields; it must
not add new ones (a typo would otherwise be silently ignored). :func:`validate` checks every
field before anything heavy starts and raises :class:`ConfigError` whose message names the field,
e.g. ``batch.mini_batch: 6 is not divisible by rollout.n (4)``; ``prime_jax.main`` prints it as
one line and exits with status 2.

Sizes are counted in *responses* (rows) unless the name says prompts; a prompt's ``n`` responses
are never split across mini- or micro-batches, so every response count must be a multiple of
``rollout.n``.
"""

from prime_jax.config.checks import check_all, validate
from prime_jax.config.schema import (AGGREGATIONS, DTYPES, MODEL_TYPES, ORACLE_SOURCES, PRM_TRAINING_SOURCES,
                                     PRM_UPDATE_MODES, PROCESS_SOURCES, RANDOM_MODEL, REMAT_POLICIES,
                                     SFT_LOGPROB_SOURCES, TINY_TOKENIZER, ConfigError, base_config, field_names,
                                     flatten)

__all__ = ["AGGREGATIONS", "DTYPES", "MODEL_TYPES", "ORACLE_SOURCES", "PRM_TRAINING_SOURCES", "PRM_UPDATE_MODES",
           "PROCESS_SOURCES", "RANDOM_MODEL", "REMAT_POLICIES", "SFT_LOGPROB_SOURCES", "TINY_TOKENIZER", "ConfigError",
           "base_config", "check_all", "field_names", "flatten", "validate"]
