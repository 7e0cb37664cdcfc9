"""How well does a run's implicit PRM rank fresh samples, and does it pick better than chance?

    python benchmarks/prm_probe.py --workdir=runs/tiny                 # latest checkpoint, held-out set
    python benchmarks/prm_probe.py --workdir=runs/tiny --n=8 --limit=100 --temperature=0.7

From the run's checkpoint (policy, PRM; its frozen reference in WORKDIR/reference) it samples n
responses per held-out problem from the policy (the config's data.eval; default temperature: the
run's rollout temperature), grades them, and scores every response with three signals:

* ``prm``: the trained PRM's summed implicit reward Σ_t (log π_φ − log π_ref) (what PRIME feeds
  the policy; raw logits, as in training; π_ref is the run's PRM reference: the SFT model, or the
  checkpoint's policy when the run had ``algo.prm_ref = "policy"``);
* ``policy_log_ratio``: the policy's own Σ_t (log π_θ − log π_ref) (the implicit reward the RL'd
  policy defines);
* ``ref_logprob``: Σ_t log π_ref alone (the SFT model's confidence: the baseline any PRM must beat);
* ``prm_per_token``: the PRM's Σq divided by the response length (a diagnostic: summed scores favour
  short responses in a top-1 pick);
* ``prm_min``: the PRM's lowest q over the response's tokens (its worst step: how PRMs are usually
  aggregated for best-of-n; PRIME's returns use sums).

For each signal it reports the ranking accuracy on groups with both correct and wrong samples
(``algo.dpo_accuracy``: the fraction of correct/wrong pairs ordered correctly; chance 0.5) and the
best-of-n accuracy when picking the top-scored sample, beside majority vote (maj@n), a vote weighted
by the PRM's P(correct) = sigmoid(β Σq) (what its ce loss fits; reward-weighted voting, which the
implicit-PRM paper's evaluation code also reports), a random pick (avg@n, its expectation) and
pass@n; and how often the top pick is a response sampled only once in its group (a random pick
favours the responses sampled often, as a nearly deterministic policy's are, so a signal that
favours rare responses can pick below random while it ranks above 0.5). None of these problems was
trained on (the synthetic held-out set is excluded from training and SFT). On the synthetic tasks
(one fixed answer form) it also reports where the credit sits around a response's first slipped step,
and the right answers reached through a wrong step: their share, how well each signal ranks the right
answers with right steps above them (``steps_ranking``; outcome labels call both right) and the
PRM's q at their slip. Writes WORKDIR/prm_probe.json (or --out) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prime_jax.data.synthetic_tasks import first_deviation, token_at_char  # noqa: E402  (after the path)


def load_run_config(config_path: str, workdir: Path):
    """The config file's get_config(), overridden by the run's own WORKDIR/config.json values."""
    spec = importlib.util.spec_from_file_location("probe_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    run = json.loads((workdir / "config.json").read_text()) if (workdir / "config.json").exists() else {}

    def overlay(cfg, values):
        for key, value in values.items():
            if key not in cfg:
                continue
            if isinstance(value, dict):
                overlay(cfg[key], value)
            else:
                cfg[key] = type(cfg[key])(value) if cfg[key] is not None and value is not None else value

    overlay(config, run)
    return config


def signal_metrics(scores: np.ndarray, signal: np.ndarray, n: int, copies: np.ndarray | None = None) -> dict:
    """scores, signal: `[P, n]`. Ranking accuracy on mixed groups and top-pick accuracy.

    copies: `[P, n]`, how many of its group's samples share each sample's text (a nearly
    deterministic policy samples the same answer many times). With it, also the share of mixed
    groups whose top pick is a text sampled once, and how often that pick is right: a random pick
    is weighted by how often each answer is sampled, a top pick is not."""
    from prime_jax import algo

    mixed = (scores.max(1) > scores.min(1))
    ranking = (float(algo.dpo_accuracy(signal[mixed].reshape(-1, 1), np.ones((int(mixed.sum()) * n, 1)),
                                       scores[mixed].reshape(-1), n)) if mixed.any() else float("nan"))
    top = np.argmax(signal, axis=1)
    picked = scores[np.arange(len(scores)), top]
    out = {"ranking_accuracy": ranking, f"best_of_{n}": float(picked.mean())}
    if copies is not None and mixed.any():
        once = (copies[np.arange(len(scores)), top] == 1) & mixed
        out["top_pick_sampled_once"] = float(once.sum() / mixed.sum())
        out["top_pick_sampled_once_accuracy"] = float(picked[once].mean()) if once.any() else None
    return out


def text_copies(texts: list[str], n: int) -> np.ndarray:
    """`[P, n]`: for each of the P*n texts (grouped by problem, n contiguous), how many texts of its
    group are equal to it (itself included)."""
    groups = [texts[i:i + n] for i in range(0, len(texts), n)]
    return np.asarray([[group.count(t) for t in group] for group in groups], np.int64)


def pair_ranking(signal: np.ndarray, better: np.ndarray, worse: np.ndarray) -> tuple[float | None, int]:
    """Within each group, the fraction of (better, worse) pairs that `signal` orders right (ties count
    half), and the number of pairs. signal, better, worse: `[P, n]` (better/worse: bool masks)."""
    hits, pairs = 0.0, 0
    for s, b, w in zip(signal, better, worse):
        diff = s[b][:, None] - s[w][None, :]
        hits += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        pairs += diff.size
    return (hits / pairs if pairs else None), pairs


def credit(q_rows, ref_rows, slips, correct, want_correct: bool = False) -> dict:
    """Where a signal puts its (dis)credit on wrong responses with a known first slip (or, with
    want_correct, on right answers reached through a slipped step): per-token means of q (PRM) and
    log π_ref before the slipped token, at it and after it; beside correct rows' mean.

    q_rows, ref_rows: per response `[len]` arrays; slips: per response the token index of the first
    slip or None; correct: per response bool."""
    parts = {"before": [], "at": [], "after": []}
    ref_parts = {"before": [], "at": [], "after": []}
    rows = 0
    for q, ref, slip, ok in zip(q_rows, ref_rows, slips, correct):
        if ok != want_correct or slip is None:
            continue
        rows += 1
        for name, sl in (("before", slice(0, slip)), ("at", slice(slip, slip + 1)), ("after", slice(slip + 1, None))):
            parts[name] += list(q[sl])
            ref_parts[name] += list(ref[sl])
    right_q = [x for q, ok in zip(q_rows, correct) if ok for x in q]
    mean = lambda xs: float(np.mean(xs)) if xs else None
    return {"wrong_rows_with_slip": rows,
            "q_per_token": {**{k: mean(v) for k, v in parts.items()}, "correct_rows": mean(right_q)},
            "ref_logprob_per_token": {k: mean(v) for k, v in ref_parts.items()}}


def probe(workdir: Path, config_path: str, *, n: int, limit: int, temperature: float | None, seed: int) -> dict:
    import jax

    from prime_jax.eval import lib as eval_lib
    from prime_jax.eval import results as eval_results
    from prime_jax.data import load_eval_sets, render_prompts
    from prime_jax.data.synthetic_tasks import task_demonstration
    from prime_jax.eval.checkpoints import load_model, resolve_checkpoint, resolve_tokenizer_path, run_reference
    from prime_jax.eval.prm_scorer import PRMScorer
    from prime_jax.models.tokenizer import eos_token_ids, load_tokenizer
    from prime_jax.parallel import mesh_from_config
    from prime_jax.rewards import CORRECT_THRESHOLD, RewardPool
    from prime_jax.rewards.math import extract_answer
    from prime_jax.sampling import Sampler
    from prime_jax.train.builder import MIN_PROMPT_BUCKET

    t0 = time.perf_counter()
    config = load_run_config(config_path, workdir)
    spec = resolve_checkpoint(str(workdir))
    if spec.kind != "run":
        raise SystemExit(f"{workdir}: no training checkpoint (checkpoints/<step>/) to probe")
    mesh = mesh_from_config(config)
    tokenizer = load_tokenizer(resolve_tokenizer_path(config, spec, workdir))
    vocab = len(tokenizer)
    policy = load_model(spec, config, mesh, vocab_size=vocab, which="policy")
    prm = load_model(spec, config, mesh, vocab_size=vocab, which="prm")
    ref = run_reference(workdir, config, mesh, vocab)  # the SFT model
    prm_ref = policy if config.algo.prm_ref == "policy" else ref  # what the run trained its PRM against
    settings = eval_results.settings_from_config(
        config, n=n, temperature=config.rollout.temperature if temperature is None else temperature, seed=seed)
    sets, _ = load_eval_sets(config, limit=limit)
    scorers = {"prm": PRMScorer(prm, prm_ref, mesh=mesh),
               "policy_log_ratio": PRMScorer(policy, ref, mesh=mesh),
               "ref_logprob": PRMScorer(ref, None, mesh=mesh)}
    out = {"workdir": str(workdir), "checkpoint_step": spec.step, "n": n, "temperature": settings.temperature,
           "seed": settings.seed, "benchmarks": {}}
    with RewardPool(config.reward.workers, math_timeout=config.reward.timeout_s,
                    code_timeout=config.reward.timeout_s) as pool:
        for name, problems in sets.items():
            ids, kept, _ = render_prompts(problems, tokenizer, settings.max_prompt_tokens)
            sampler = Sampler(mesh, min_prompt_bucket=MIN_PROMPT_BUCKET)
            gen = eval_lib.generate_responses(sampler, policy, tokenizer, ids, settings,
                                              stop_token_ids=eos_token_ids(tokenizer),
                                              key=eval_lib.benchmark_key(jax.random.PRNGKey(settings.seed), name))
            graded = pool.grade([(gen.texts[r], kept[r // n].ground_truth, kept[r // n].ability)
                                 for r in range(len(gen.texts))])
            scores = np.asarray(graded.scores, np.float64).reshape(len(kept), n)
            prompts = [ids[r // n] for r in range(len(gen.texts))]
            prm_q = scorers["prm"].token_rewards(prompts, gen.response_ids)  # per token: sums, minima, credit
            signals = {k: np.asarray(s(prompts, gen.response_ids), np.float64).reshape(len(kept), n)
                       for k, s in scorers.items() if k != "prm"}
            signals["prm"] = np.asarray([q.sum(dtype=np.float64) for q in prm_q]).reshape(len(kept), n)
            lengths = np.asarray([max(len(r), 1) for r in gen.response_ids], np.float64).reshape(len(kept), n)
            signals["prm_per_token"] = signals["prm"] / lengths  # a length-free variant (not PRIME's)
            # the worst step decides (the usual PRM aggregation for best-of-n; PRIME's returns use sums)
            worst = [q.min() if len(q) else 0.0 for q in prm_q]
            signals["prm_min"] = np.asarray(worst, np.float64).reshape(len(kept), n)
            # the PRM's P(correct) of each sample, sigmoid(beta * sum q) (what its ce loss fits), summed per answer
            prm_p_correct = np.vectorize(lambda q: eval_results.prm_p_correct(q, config.algo.beta))(signals["prm"])
            majority, weighted = [], []
            for i in range(len(kept)):
                keys = [eval_results.answer_key(extract_answer(gen.texts[i * n + s])) for s in range(n)]
                m = eval_results.majority_index(keys)
                majority.append(scores[i, m] if m is not None else 0.0)
                w = eval_results.weighted_vote_index(keys, prm_p_correct[i])
                weighted.append(scores[i, w] if w is not None else 0.0)
            mixed = scores.max(1) > scores.min(1)
            copies = text_copies(gen.texts, n)
            result = {"problems": len(kept), "mixed_groups": int(mixed.sum()),
                      "distinct_responses_per_mixed_group":
                          float((1.0 / copies[mixed]).sum(1).mean()) if mixed.any() else None,
                      "mean_length_correct": float(lengths[scores >= 0.5].mean()) if (scores >= 0.5).any() else None,
                      "mean_length_wrong": float(lengths[scores < 0.5].mean()) if (scores < 0.5).any() else None,
                      "shorter_ranking": signal_metrics(scores, -lengths, n)["ranking_accuracy"],
                      "signals": {k: signal_metrics(scores, v, n, copies) for k, v in signals.items()},
                      f"maj@{n}": float(np.mean(majority)), f"prm_weighted_vote@{n}": float(np.mean(weighted)),
                      f"random_pick (avg@{n})": float(scores.mean()),
                      f"pass@{n}": float((scores.max(1) >= CORRECT_THRESHOLD).mean()),
                      "mean_sum_correct": {k: float(v[scores >= 0.5].mean()) if (scores >= 0.5).any() else None
                                           for k, v in signals.items()},
                      "mean_sum_wrong": {k: float(v[scores < 0.5].mean()) if (scores < 0.5).any() else None
                                         for k, v in signals.items()}}
            if all(p.source.startswith("synthetic") for p in kept):  # a fixed answer form: where is the slip?
                correct = [graded.scores[r] >= 0.5 for r in range(len(gen.texts))]
                slips = [first_deviation(task_demonstration(kept[r // n]), gen.texts[r]) for r in range(len(correct))]
                slips = [None if c is None else token_at_char(tokenizer, gen.response_ids[r], c)
                         for r, c in enumerate(slips)]
                ref_q = scorers["ref_logprob"].token_rewards(prompts, gen.response_ids)
                result["credit"] = credit(prm_q, ref_q, slips, correct)
                # right answers through a wrong step: does a signal rank them below right answers with
                # right steps (what a step-level reward adds over the outcome; outcome labels call both right)?
                right = scores >= 0.5
                clean = right & np.asarray([s is None for s in slips]).reshape(len(kept), n)
                slipped = right & ~clean
                result["right_answer_wrong_steps"] = float(slipped.sum() / max(right.sum(), 1))
                result["credit_right_answers"] = credit(prm_q, ref_q, slips, correct, want_correct=True)
                result["steps_ranking"] = {k: pair_ranking(v, clean, slipped)[0] for k, v in signals.items()}
                result["steps_ranking_pairs"] = pair_ranking(signals["prm"], clean, slipped)[1]
            out["benchmarks"][name] = result
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def markdown(out: dict) -> str:
    n = out["n"]
    lines = []
    for name, r in out["benchmarks"].items():
        distinct = r.get("distinct_responses_per_mixed_group")
        distinct = "-" if distinct is None else f"{distinct:.1f}"
        lines += [f"{name}: {r['problems']} problems x {n} samples (T={out['temperature']}), {r['mixed_groups']} "
                  f"groups with both correct and wrong samples ({distinct} distinct responses each); checkpoint step "
                  f"{out['checkpoint_step']}; mean length correct {r['mean_length_correct']} / wrong "
                  f"{r['mean_length_wrong']} tokens (ranking by shortness: {r['shorter_ranking']:.3f})", "",
                  "| signal | ranking accuracy (mixed groups; chance 0.5) | "
                  f"best-of-{n} accuracy | mean sum, correct | "
                  "mean sum, wrong | top pick sampled once (mixed groups; right) |", "|---|---|---|---|---|---|"]
        for k, m in r["signals"].items():
            right, wrong = r["mean_sum_correct"][k], r["mean_sum_wrong"][k]
            fmt = lambda x: "-" if x is None else f"{x:.3f}"
            once, once_right = m.get("top_pick_sampled_once"), m.get("top_pick_sampled_once_accuracy")
            rare = "-" if once is None else (f"{100 * once:.0f}%; "
                                              + ("-" if once_right is None else f"{100 * once_right:.0f}%"))
            lines.append(f"| {k} | {m['ranking_accuracy']:.3f} | {100 * m[f'best_of_{n}']:.1f}% | {fmt(right)} | "
                         f"{fmt(wrong)} | {rare} |")
        lines += [f"| majority vote (maj@{n}) | - | {100 * r[f'maj@{n}']:.1f}% | | | |",
                  f"| PRM-weighted vote (sum of sigmoid(beta sum q) per answer) | - | "
                  f"{100 * r[f'prm_weighted_vote@{n}']:.1f}% | | | |",
                  f"| random pick (avg@{n}) | - | {100 * r[f'random_pick (avg@{n})']:.1f}% | | | |",
                  f"| pass@{n} (an oracle pick) | - | {100 * r[f'pass@{n}']:.1f}% | | | |", ""]
        if "credit" in r:
            c, fmt = r["credit"], (lambda x: "-" if x is None else f"{x:+.3f}")
            lines += [f"Credit on {c['wrong_rows_with_slip']} wrong responses, per token, around their first slip "
                      "(first departure from the step-by-step solution):", "",
                      "| signal | before the slip | the slipped token | after it | correct responses |",
                      "|---|---|---|---|---|",
                      "| PRM q | "
                      + " | ".join(fmt(c["q_per_token"][k]) for k in ("before", "at", "after", "correct_rows"))
                      + " |",
                      "| log π_ref | "
                      + " | ".join(fmt(c["ref_logprob_per_token"][k]) for k in ("before", "at", "after"))
                      + " | |", ""]
        if "steps_ranking" in r:
            c, fmt = r["credit_right_answers"], (lambda x: "-" if x is None else f"{x:+.3f}")
            lines += [f"Right answers through a wrong step: {100 * r['right_answer_wrong_steps']:.1f}% of right answers "
                      f"({c['wrong_rows_with_slip']} responses). Ranking of right answers with right steps above "
                      f"them, {r['steps_ranking_pairs']} pairs in the same group (chance 0.5): "
                      + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in r["steps_ranking"].items())
                      + ". PRM q per token around their first slip: before "
                      + " / at ".join(fmt(c["q_per_token"][k]) for k in ("before", "at"))
                      + f" / after {fmt(c['q_per_token']['after'])}.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training run's workdir (with checkpoints/)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.py"),
                        help="the config file the run started from (the run's config.json overrides it)")
    parser.add_argument("--n", type=int, default=8, help="samples per problem")
    parser.add_argument("--limit", type=int, default=0, help="first k held-out problems (0: all)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the run's rollout temperature")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed")
    parser.add_argument("--out", default="",
                        help="write the JSON here instead of WORKDIR/prm_probe.json (which ablation.py reads)")
    args = parser.parse_args(argv)
    if args.n < 2:
        raise SystemExit("--n must be >= 2 (ranking needs several samples per problem)")
    workdir = Path(args.workdir)
    out = probe(workdir, args.config, n=args.n, limit=args.limit, temperature=args.temperature, seed=args.seed)
    path = Path(args.out) if args.out else workdir / "prm_probe.json"
    path.write_text(json.dumps(out, indent=2))
    print(markdown(out))
    print(f"wrote {path} ({out['wall_s']} s)")


if __name__ == "__main__":
    main()
