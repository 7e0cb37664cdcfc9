"""The held-out evaluation during training: the evaluator of `python -m prime_jax.evaluate`
(`eval.lib.evaluate_benchmark`) on every data.eval set with the current policy, and the page of
held-out responses coloured by the PRM's token rewards (WORKDIR/rollouts/step_N.html).

accuracy is the mean score of a set's problems (avg@1: greedy pass@1 on math; a prompt longer
than data.max_prompt_tokens counts as wrong, as in the CLI); a set whose every prompt is too long
has no accuracy (warned), rather than a 0.0. On the synthetic tasks `eval/<set>/steps_right` is
the share of responses that write every step of the demonstration: a policy can learn right
answers through wrong steps, which the accuracy (and an outcome reward) does not see.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np

from prime_jax.data.synthetic_tasks import is_task_problem, steps_right
from prime_jax.eval import lib as eval_lib
from prime_jax.eval.prm_scorer import PRMScorer
from prime_jax.eval.report import all_dropped
from prime_jax.eval.results import settings_from_config
from prime_jax.train.builder import RunLayout
from prime_jax.train.report import mix_outcomes, write_rollouts_html

logger = logging.getLogger(__name__)


class TrainingEvaluator:
    """Evaluates a policy on the run's eval sets; `__call__` returns the eval row of metrics.jsonl."""

    def __init__(self, config, eval_sets: dict, *, tokenizer, sampler, graphdef, mesh, stop_ids, layout: RunLayout,
                 is_main: bool):
        self.config = config
        self.eval_sets = eval_sets
        self.tokenizer, self.sampler, self.graphdef, self.mesh = tokenizer, sampler, graphdef, mesh
        self.stop_ids, self.layout, self.is_main = list(stop_ids), layout, is_main
        self.settings = settings_from_config(config)  # n = 1, rollout.eval_temperature (greedy)

    def __call__(self, step: int, policy_params, prm_params, ref_params, pool, ranking: float | None = None,
                 ranking_note: str = "") -> dict:
        """`ranking`: the step's prm/dpo_accuracy, shown on the HTML page (None: `ranking_note` says why)."""
        c = self.config
        t0 = time.perf_counter()
        row: dict[str, Any] = {"step": step}
        key = jax.random.fold_in(jax.random.PRNGKey(c.data.synthetic.eval_seed), step)
        grader = eval_lib.ProcessShareGrader(pool)
        candidates: list[tuple] = []  # (prompt ids, response ids, record) for the HTML page
        accuracies, sampled = [], []
        for name, problems in self.eval_sets.items():
            generate = eval_lib.sampler_generate_fn(self.sampler, (self.graphdef, policy_params), self.tokenizer,
                                                    self.settings, stop_token_ids=self.stop_ids,
                                                    key=eval_lib.benchmark_key(key, name))
            observe = lambda _, ids, gen, records: candidates.extend(
                (ids[i], gen.response_ids[i], recs[0]) for i, recs in enumerate(records))
            result = eval_lib.evaluate_benchmark(name, problems, tokenizer=self.tokenizer, pool=grader,
                                                 settings=self.settings, generate=generate, observe=observe)
            if all_dropped(result.metrics):
                logger.warning("eval set %s: all %d problems dropped (prompts longer than data.max_prompt_tokens=%d); "
                               "it is not evaluated", name, len(problems), c.data.max_prompt_tokens)
                continue
            row[f"eval/{name}/accuracy"] = result.metrics["avg@1"]
            done = [r for r in result.records if r["sample"] is not None]
            if all(is_task_problem(p) for p in problems):  # known demonstrations: are the steps right too?
                row[f"eval/{name}/steps_right"] = float(np.mean(
                    [steps_right(problems[r["problem_index"]], r["response"]) for r in done])) if done else 0.0
            accuracies.append(result.metrics["avg@1"])
            sampled += done
        row["eval/accuracy"] = float(np.mean(accuracies)) if accuracies else 0.0
        row["eval/response_length"] = float(np.mean([r["num_tokens"] for r in sampled])) if sampled else 0.0
        row["eval/truncated_frac"] = float(np.mean([not r["finished"] for r in sampled])) if sampled else 0.0
        if candidates:  # q is computed on every process; process 0 writes the page
            self._write_html(step, mix_outcomes(candidates, lambda x: x[2]["score"], c.logging.html_samples),
                             prm_params, ref_params, ranking, ranking_note)
        row["time/eval_s"] = time.perf_counter() - t0
        return row

    def _write_html(self, step: int, samples: list, prm_params, ref_params, ranking, ranking_note) -> None:
        """The token-reward pages: each response's q under the current PRM and its reference."""
        # raw logits for the PRM and its reference, as in training (PRIME_SPEC: no temperature)
        log = self.config.logging
        scorer = PRMScorer((self.graphdef, prm_params), (self.graphdef, ref_params), mesh=self.mesh,
                                    chunk_size=self.config.model.logprob_chunk,
                                    batch_size=max(1, min(log.html_samples, log.html_per_page or log.html_samples)))
        qs = scorer.token_rewards([s[0] for s in samples], [s[1] for s in samples])
        pages = [{"prompt": rec["prompt"], "tokens": [self.tokenizer.decode([t]) for t in response],
                  "q": q.tolist(), "outcome": float(rec["score"]), "ground_truth": rec["ground_truth"],
                  "source": rec["benchmark"]}
                 for (_, response, rec), q in zip(samples, qs)]
        if self.is_main:
            write_rollouts_html(self.layout.rollouts / f"step_{step}.html", pages,
                                title=f"{self.config.name}: held-out responses at step {step}",
                                per_page=log.html_per_page, ranking=ranking, ranking_note=ranking_note)
