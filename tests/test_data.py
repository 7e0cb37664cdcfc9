"""prime_jax.data: readers, packaged benchmarks, rendering, iterator, synthetic task, tokenizer."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prime_jax.data import (
    BENCHMARKS,
    EURUS2_SYSTEM_PROMPT,
    MATH_TASK_SUFFIX,
    Problem,
    ShuffledIterator,
    benchmarks_dir,
    build_tiny_tokenizer,
    demonstration,
    detect_format,
    gsm8k_answer,
    last_boxed,
    load_benchmark,
    make_problems,
    read_problems,
    render_prompts,
    write_verl_parquet,
)
from prime_jax.data import problems as problems_mod
from prime_jax.data import synthetic

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Rows that the packaged / shared files are known to contain but that cannot be loaded.
# MATH train: two solutions end in an empty "\boxed{}" (train/number_theory/7115, 7117).
EXPECTED_SKIPS = {"math/train.jsonl": {"empty_answer": 2}}


def _sources_table(md: Path) -> dict[str, dict[str, str]]:
    """The markdown table of a SOURCES.md: local file -> {column: value}."""
    lines = [l for l in md.read_text().splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for l in lines[2:]:
        cells = [c.strip() for c in l.strip("|").split("|")]
        row = dict(zip(header, cells))
        out[row["local file"]] = row
    return out


def _nonempty_lines(p: Path) -> int:
    with open(p, "rb") as f:
        return sum(1 for line in f if line.strip())


# ------------------------------------------------------------------------------------------
# Packaged benchmarks
# ------------------------------------------------------------------------------------------


def test_every_packaged_file_loads_and_matches_sources_md():
    bdir = benchmarks_dir()
    assert bdir == Path(problems_mod.__file__).parent / "benchmarks"
    table = _sources_table(bdir / "SOURCES.md")
    files = sorted(p.relative_to(bdir).as_posix() for p in bdir.rglob("*.jsonl"))
    assert files == sorted(rel for rel, _ in BENCHMARKS.values()) == sorted(table)
    by_file = {rel: name for name, (rel, _) in BENCHMARKS.items()}
    for rel in files:
        row = table[rel]
        rows = int(row["rows"])
        path = bdir / rel
        assert _nonempty_lines(path) == rows, rel
        assert path.stat().st_size == int(row["bytes"]), rel
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"], rel
        name = by_file[rel]
        assert row["benchmark name"] == name
        probs, stats = load_benchmark(name)
        assert stats.total == rows
        assert dict(stats.skipped) == EXPECTED_SKIPS.get(rel, {}), (rel, stats.summary())
        assert len(probs) == stats.kept == rows - stats.n_skipped, rel
        assert len({p.id for p in probs}) == len(probs), f"{rel}: ids not unique"
        for p in probs:
            assert p.source == name and p.ability == "math"
            assert p.ground_truth and p.ground_truth == p.ground_truth.strip()
            assert [m["role"] for m in p.messages] == ["user"]
            assert p.messages[0]["content"].endswith(MATH_TASK_SUFFIX)
            assert len(p.messages[0]["content"]) > len(MATH_TASK_SUFFIX)
        # The same file through the generic reader (format autodetected) gives the same set.
        probs2, stats2 = read_problems(path)
        assert [(p.id, p.ground_truth) for p in probs2] == [(p.id, p.ground_truth) for p in probs]
        assert stats2.skipped == stats.skipped


def test_packaged_licences_present():
    bdir = benchmarks_dir()
    for name, (rel, _) in BENCHMARKS.items():
        lic = list((bdir / rel).parent.glob("LICENSE*"))
        assert lic, f"{name}: no licence text next to {rel}"
        for p in lic:
            assert p.read_text().startswith("MIT License"), p
    assert (bdir / "gsm8k" / "LICENSE.grade-school-math").exists()


def test_benchmark_ground_truth_conventions():
    amc, _ = load_benchmark("amc23")
    assert amc[0].ground_truth == "27" and all(not p.ground_truth.endswith(".0") for p in amc)
    minerva, _ = load_benchmark("minerva_math")
    assert minerva[0].ground_truth == "1.6" and minerva[1].ground_truth == "4.5e33"
    ob, _ = load_benchmark("olympiadbench")
    gts = {p.id: p.ground_truth for p in ob}
    assert "$" not in "".join(gts.values())
    assert "69,84" in gts.values()  # final_answer ["$69$,$84$"]
    assert "(1,8,19), (2,7,13), (4,5,7)" in gts.values()
    gsm, _ = load_benchmark("gsm8k")
    assert gsm[0].ground_truth == "18"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.ground_truth) for p in gsm)
    assert "2125" in {p.ground_truth for p in gsm}  # "#### 2,125"
    aime, _ = load_benchmark("aime24")
    assert aime[0].ground_truth == "204" and aime[0].id == "60"
    m500, _ = load_benchmark("math500")
    assert m500[0].id == "test/precalculus/807.json"
    assert m500[0].meta["level"] == 2
    # System prompt options.
    sysd, _ = load_benchmark("aime24", system_prompt=EURUS2_SYSTEM_PROMPT)
    assert sysd[0].messages[0] == {"role": "system", "content": EURUS2_SYSTEM_PROMPT}
    assert sysd[0].messages[1] == aime[0].messages[0]
    # Name lookup through read_problems too.
    again, _ = read_problems("amc23")
    assert [p.ground_truth for p in again] == [p.ground_truth for p in amc]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_every_shared_jsonl_loads_and_matches_sources_md():
    table = _sources_table(SHARED_DATA / "SOURCES.md")
    files = sorted(SHARED_DATA.rglob("*.jsonl"))
    assert files
    for path in files:
        rel = path.relative_to(SHARED_DATA).as_posix()
        probs, stats = read_problems(path)
        n = _nonempty_lines(path)
        assert stats.total == n, rel
        assert len(probs) == stats.kept == n - stats.n_skipped, rel
        assert dict(stats.skipped) == EXPECTED_SKIPS.get(rel, {}), (rel, stats.summary())
        if rel in table:
            assert int(table[rel]["rows"]) == n, rel
            assert len(probs) == int(table[rel]["rows"]) - stats.n_skipped, rel


# ------------------------------------------------------------------------------------------
# Generic readers
# ------------------------------------------------------------------------------------------


def _verl_rows():
    sysmsg = {"role": "system", "content": EURUS2_SYSTEM_PROMPT}
    return [
        {"data_source": "numina_olympiads",
         "prompt": [sysmsg, {"role": "user", "content": "What is 1+1?" + MATH_TASK_SUFFIX}],
         "ability": "math", "reward_model": {"style": "rule", "ground_truth": "2"},
         "extra_info": {"split": "dummy", "index": 0}},
        {"data_source": "taco",
         "prompt": [sysmsg, {"role": "user", "content": "Print 3."}],
         "ability": "code",
         "reward_model": {"style": "rule", "ground_truth": json.dumps({"inputs": [""], "outputs": ["3\n"]})},
         "extra_info": {"split": "dummy", "index": 1}},
        # malformed: no ground truth
        {"data_source": "numina_synthetic_math",
         "prompt": [sysmsg, {"role": "user", "content": "Broken row."}],
         "ability": "math", "reward_model": {"style": "rule", "ground_truth": None},
         "extra_info": {"split": "dummy", "index": 2}},
        # malformed: unknown ability
        {"data_source": "x",
         "prompt": [sysmsg, {"role": "user", "content": "?"}],
         "ability": "poetry", "reward_model": {"style": "rule", "ground_truth": "a"},
         "extra_info": {"split": "dummy", "index": 3}},
        # malformed: empty ground truth
        {"data_source": "x",
         "prompt": [sysmsg, {"role": "user", "content": "?"}],
         "ability": "math", "reward_model": {"style": "rule", "ground_truth": "  "},
         "extra_info": {"split": "dummy", "index": 4}},
    ]


def test_eurus_parquet_fixture(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _verl_rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    probs, stats = read_problems(tmp_path / "train.parquet")
    assert stats.total == 5 and stats.kept == 2
    assert dict(stats.skipped) == {
        "missing_field:reward_model.ground_truth": 1, "bad_ability": 1, "empty_answer": 1}
    assert stats.first_seen["missing_field:reward_model.ground_truth"] == "row 2"
    math_p, code_p = probs
    assert math_p.messages == rows[0]["prompt"]
    assert (math_p.ability, math_p.ground_truth, math_p.source) == ("math", "2", "numina_olympiads")
    assert code_p.ability == "code" and json.loads(code_p.ground_truth)["outputs"] == ["3\n"]
    assert math_p.meta["extra_info"] == {"split": "dummy", "index": 0}
    # A directory resolves to {split}.parquet; system prompt replaced / removed on request.
    probs_dir, _ = read_problems(tmp_path, split="train", system_prompt="Be brief.")
    assert probs_dir[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert len(probs_dir[0].messages) == 2
    no_sys, _ = read_problems(tmp_path / "train.parquet", system_prompt="")
    assert [m["role"] for m in no_sys[0].messages] == ["user"]
    # Round trip through the writer.
    write_verl_parquet(probs, tmp_path / "out.parquet")
    back, st = read_problems(tmp_path / "out.parquet")
    assert st.n_skipped == 0
    assert [(p.messages, p.ability, p.ground_truth, p.source) for p in back] == [
        (p.messages, p.ability, p.ground_truth, p.source) for p in probs]
    # The same rows as JSONL read the same way.
    with open(tmp_path / "rows.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    probs_j, stats_j = read_problems(tmp_path / "rows.jsonl")
    assert [p.ground_truth for p in probs_j] == ["2", code_p.ground_truth]
    assert stats_j.skipped == stats.skipped


def test_jsonl_with_broken_lines(tmp_path):
    lines = [
        json.dumps({"problem": "1+1?", "answer": "2", "unique_id": "a"}),
        '{"problem": "truncated", "answ',
        "",
        "[1, 2, 3]",
        json.dumps({"problem": "2+2?", "answer": "", "unique_id": "b"}),
        json.dumps({"problem": "3+3?", "unique_id": "c"}),
        json.dumps({"problem": "   ", "answer": "1", "unique_id": "d"}),
        json.dumps({"problem": "4+4?", "answer": "8", "unique_id": "e"}),
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(lines) + "\n")
    probs, stats = read_problems(p)
    assert [x.id for x in probs] == ["a", "e"]
    assert stats.total == 7 and stats.kept == 2
    assert dict(stats.skipped) == {"bad_json": 1, "not_an_object": 1, "empty_answer": 1,
                                   "missing_field:answer": 1, "empty_problem": 1}
    assert "bad_json=1" in stats.summary()
    # A file where nothing parses is not fatal either.
    q = tmp_path / "garbage.jsonl"
    q.write_text("not json\n{also not\n")
    probs, stats = read_problems(q)
    assert probs == [] and dict(stats.skipped) == {"bad_json": 2}


def test_eurus_raw_rows(tmp_path):
    rows = [{"source": "numina_cn_k12", "instruction": "1+1?" + MATH_TASK_SUFFIX, "task": "Math",
             "reference": "2"},
            {"source": "taco", "instruction": "Print 3.", "task": "Coding",
             "reference": json.dumps({"inputs": [""], "outputs": ["3"]})},
            {"source": "x", "instruction": "?", "task": "Poetry", "reference": "a"}]
    p = tmp_path / "raw.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    probs, stats = read_problems(p)
    assert [(x.ability, x.source) for x in probs] == [("math", "numina_cn_k12"), ("code", "taco")]
    assert probs[0].messages == [{"role": "system", "content": EURUS2_SYSTEM_PROMPT},
                                 {"role": "user", "content": rows[0]["instruction"]}]
    assert dict(stats.skipped) == {"bad_ability": 1}


def test_gsm8k_answer_parsing(tmp_path):
    assert gsm8k_answer("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_answer("...\n#### 1,234,567") == "1234567"
    assert gsm8k_answer("#### -3") == "-3"
    assert gsm8k_answer("no marker 42") is None
    rows = [{"question": "q1", "answer": "work\n#### 2,125"},
            {"question": "q2", "answer": "work but no final answer #### "},
            {"question": "q3", "answer": "work\n#### 7"}]
    p = tmp_path / "g.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    probs, stats = read_problems(p)
    assert [x.ground_truth for x in probs] == ["2125", "7"]
    assert [x.id for x in probs] == ["0", "2"]  # row numbers when there is no idx
    assert dict(stats.skipped) == {"empty_answer": 1}
    assert probs[0].messages == [{"role": "user", "content": "q1" + MATH_TASK_SUFFIX}]


def test_detect_format_and_last_boxed():
    assert detect_format({"problem": "p", "answer": "1", "unique_id": "x", "solution": "s"}) == "math"
    assert detect_format({"problem": "p", "answer": 27.0, "question": "p", "id": 0}) == "amc23"
    assert detect_format({"problem": "p", "answer": "025", "id": 1}) == "aime24"
    assert detect_format({"problem": "p", "solution": "\\boxed{1}", "idx": 0}) == "minerva"
    assert detect_format({"question": "q", "final_answer": ["1"], "id": 3}) == "olympiadbench"
    assert detect_format({"question": "q", "answer": "x\n#### 5"}) == "gsm8k"
    assert detect_format({"prompt": [], "reward_model": {}}) == "verl"
    assert detect_format({"source": "s", "instruction": "i", "task": "Math", "reference": "1"}) == "eurus_raw"
    assert detect_format({"foo": 1}) is None
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("so $\\boxed 2$.") == "2"
    assert last_boxed("\\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{unbalanced") is None
    assert last_boxed("nothing") is None


def test_unknown_sources_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        read_problems(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError):
        read_problems("./nope/train.parquet")
    p = tmp_path / "weird.jsonl"
    p.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(ValueError, match=r"set data.format \(--config.data.format=NAME\) to one of: verl \(prompt"):
        read_problems(p)
    with pytest.raises(ValueError, match="unknown data source 'math50' \\(did you mean 'math500'"):
        read_problems("math50")  # a typo, not a hub id: no hub round trip

    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="Hugging Face dataset 'PRIME-RL/Eurus-2-RL-Data'"):
        read_problems("PRIME-RL/Eurus-2-RL-Data", split="validation")


def test_hf_dataset_path_reads_rows(monkeypatch):
    import datasets

    rows = _verl_rows()
    seen = {}

    def fake_load(name, split):
        seen["args"] = (name, split)
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    probs, stats = read_problems("PRIME-RL/Eurus-2-RL-Data", split="validation")
    assert seen["args"] == ("PRIME-RL/Eurus-2-RL-Data", "validation")
    assert len(probs) == 2 and stats.n_skipped == 3


def test_data_package_imports_no_jax():
    code = ("import sys, prime_jax.data as d; d.read_problems; "
            "bad = [m for m in ('jax', 'flax', 'prime_jax.models') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tok():
    return build_tiny_tokenizer()


def test_render_prompts_drops_and_counts_long_prompts(tiny_tok):
    probs = make_problems(20, seed=3)
    long = Problem(messages=[{"role": "user", "content": "Compute " + "1+" * 200 + "1"}],
                   ability="math", ground_truth="201", source="t", id="long")
    ids, kept, stats = render_prompts(probs + [long], tiny_tok, max_prompt_tokens=64)
    assert len(ids) == len(kept) == 20 and long not in kept
    assert dict(stats.skipped) == {"prompt_too_long": 1} and stats.total == 21
    for p, x in zip(kept, ids):
        ref = tiny_tok.apply_chat_template(p.messages, add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
        assert x == list(ref)
        assert tiny_tok.decode(x).endswith("<|im_start|>assistant\n")
    ids_all, kept_all, st = render_prompts(probs + [long], tiny_tok, max_prompt_tokens=None)
    assert len(ids_all) == 21 and st.n_skipped == 0


# ------------------------------------------------------------------------------------------
# Iterator
# ------------------------------------------------------------------------------------------


def test_iterator_deterministic_epochs_and_boundaries():
    items = list(range(10))
    a = ShuffledIterator(items, seed=5)
    b = ShuffledIterator(items, seed=5)
    seq = a.next_batch(35)
    assert seq == b.next_batch(35)
    for e in range(3):
        assert sorted(seq[10 * e : 10 * e + 10]) == items  # each epoch is a permutation
    assert seq[:10] != seq[10:20]  # reshuffled per epoch
    assert seq != ShuffledIterator(items, seed=6).next_batch(35)
    assert a.get_state() == {"epoch": 3, "index": 5, "seed": 5}
    c = ShuffledIterator(items, seed=5)
    assert [next(c) for _ in range(7)] + c.next_batch(28) == seq
    unshuffled = ShuffledIterator(items, seed=5, shuffle=False)
    assert unshuffled.next_batch(12) == items + [0, 1]


@pytest.mark.parametrize("first", [0, 3, 10, 17])
def test_iterator_resume_yields_the_remaining_sequence(first):
    items = [f"p{i}" for i in range(13)]
    full = ShuffledIterator(items, seed=1).next_batch(first + 40)
    it = ShuffledIterator(items, seed=1)
    got = it.next_batch(first)
    state = json.loads(json.dumps(it.get_state()))
    assert set(state) == {"epoch", "index", "seed"}
    resumed = ShuffledIterator.from_state(items, state)
    rest = [resumed.next_batch(3) for _ in range(10)] + [resumed.next_batch(10)]
    assert got + [x for b in rest for x in b] == full
    other = ShuffledIterator(items, seed=99)
    other.set_state(state)
    assert other.next_batch(40) == full[first:]


def test_iterator_host_sharding():
    items = list(range(11))
    hosts = [ShuffledIterator(items, seed=2, process_index=h, process_count=3) for h in range(3)]
    assert all(h.epoch_size == 3 for h in hosts)
    for epoch in range(4):
        blocks = [h.next_batch(3) for h in hosts]
        flat = [x for b in blocks for x in b]
        assert len(flat) == len(set(flat)) == 9  # disjoint, equal sizes
        assert all(h.get_state() == {"epoch": epoch, "index": 3, "seed": 2} for h in hosts)
    # Resuming a host from a saved state continues its own shard.
    h1 = ShuffledIterator(items, seed=2, process_index=1, process_count=3)
    h1.next_batch(4)
    r = ShuffledIterator.from_state(items, h1.get_state(), process_index=1, process_count=3)
    assert r.next_batch(8) == h1.next_batch(8)
    with pytest.raises(ValueError):
        ShuffledIterator(items[:2], process_index=0, process_count=3)


# ------------------------------------------------------------------------------------------
# Synthetic task and tiny tokenizer
# ------------------------------------------------------------------------------------------


def test_synthetic_task_deterministic_and_correct():
    a = make_problems(200, seed=0)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in make_problems(200, seed=0)]
    assert [p.to_dict() for p in a[:50]] == [p.to_dict() for p in make_problems(50, seed=0)]
    assert [p.user_content for p in a] != [p.user_content for p in make_problems(200, seed=1)]
    for p in a:
        assert p.ability == "math" and p.source == synthetic.SOURCE
        expr = p.user_content[len(synthetic.PROMPT_PREFIX):]
        assert re.fullmatch(r"[\d+\-*()]+", expr)
        value = eval(expr)  # noqa: S307 - digits, + - * and parentheses only
        assert str(value) == p.ground_truth and 0 <= value < 1000
        assert 2 <= len(p.meta["steps"]) <= 4
        demo = demonstration(p)
        assert last_boxed(demo) == p.ground_truth
        *steps, final = demo.split("\n")
        assert final == f"\\boxed{{{p.ground_truth}}}" and len(steps) == len(p.meta["steps"])
        for line in steps:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs) and 0 <= int(rhs) < 1000  # noqa: S307
    easy = make_problems(100, seed=0, difficulty="easy", ops="+-")
    assert all(len(p.meta["steps"]) <= 2 and "*" not in p.user_content for p in easy)
    knobs = make_problems(50, seed=0, min_steps=3, max_steps=3, max_factor=9)
    assert all(len(p.meta["steps"]) == 3 for p in knobs)
    train = make_problems(300, seed=0, difficulty="easy")
    evals = make_problems(100, seed=0, difficulty="easy", stream=1,
                          exclude={p.meta["expression"] for p in train}, unique=True)
    ev = [p.meta["expression"] for p in evals]
    assert len(set(ev)) == 100 and not set(ev) & {p.meta["expression"] for p in train}


def test_chains_task_deterministic_correct_and_selectable(tiny_tok):
    import ml_collections

    from prime_jax.data import chains, make_task_problems, task_demonstration

    a = chains.make_problems(200, seed=0)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in chains.make_problems(200, seed=0)]
    assert [p.user_content for p in a] != [p.user_content for p in chains.make_problems(200, seed=1)]
    for p in a:
        assert p.ability == "math" and p.source == chains.SOURCE
        expr = p.user_content[len(chains.PROMPT_PREFIX):]
        assert re.fullmatch(r"\d([+-]\d){5}", expr) and str(eval(expr)) == p.ground_truth  # noqa: S307
        demo = task_demonstration(p)
        *steps, final = demo.split("\n")
        assert final == f"\\boxed{{{p.ground_truth}}}" and last_boxed(demo) == p.ground_truth and len(steps) == 5
        for line in steps:  # every running value is one digit: a one-token result per step
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs) and 0 <= int(rhs) <= 9  # noqa: S307
        enc = tiny_tok(demo, add_special_tokens=False)["input_ids"]
        assert tiny_tok.decode(enc) == demo and len(enc) <= 43
    cfg = dict(task="chains", min_steps=3, max_steps=4, difficulty="easy", max_value=999, max_start=0, max_operand=0,
               max_factor=0)
    section = ml_collections.ConfigDict(cfg)  # the config's data.synthetic section
    train = make_task_problems(section, 300, 0, stream=0)
    assert {len(p.meta["steps"]) for p in train} == {3, 4}
    held_out = make_task_problems(section, 100, 0, stream=1, unique=True, exclude={p.meta["expression"] for p in train})
    assert len({p.meta["expression"] for p in held_out}) == 100
    assert not {p.meta["expression"] for p in held_out} & {p.meta["expression"] for p in train}
    arith = make_task_problems(ml_collections.ConfigDict({**cfg, "task": "arith"}), 5, 0, stream=0)
    assert arith[0].source == synthetic.SOURCE and task_demonstration(arith[0]) == demonstration(arith[0])
    with pytest.raises(ValueError, match="unknown task"):
        make_task_problems(ml_collections.ConfigDict({**cfg, "task": "sudoku"}), 1, 0, stream=0)


def test_flawed_chains_demonstrations_slip_by_one_at_flawed_steps_and_carry_on():
    from prime_jax.data import chains

    types = chains.step_types()
    assert len(types) == len(set(types)) == 90
    assert all(0 <= (a + x if op == "+" else a - x) <= 9 for a, op, x in types)
    flawed = chains.flawed_step_types(0.3, seed=0)
    assert len(flawed) == 27 and flawed <= set(types) and flawed == chains.flawed_step_types(0.3, seed=0)
    assert flawed != chains.flawed_step_types(0.3, seed=1) and not chains.flawed_step_types(0.0, seed=0)
    problems = chains.make_problems(400, seed=0)
    rng = np.random.default_rng(0)
    assert all(chains.flawed_demonstration(p, flawed, 0.0, rng) == chains.demonstration(p) for p in problems)
    assert all(chains.flawed_demonstration(p, frozenset(), 1.0, rng) == chains.demonstration(p) for p in problems)
    every = frozenset(types)
    slipped = steps = 0
    for p in problems:
        demo = chains.flawed_demonstration(p, every, 0.6, rng)
        *lines, final = demo.split("\n")
        value = p.meta["start"]
        for line, (op, x) in zip(lines, p.meta["steps"]):
            assert line.startswith(f"{value}{op}{x}=")  # goes on from the (possibly slipped) running value
            result, right = int(line.split("=")[1]), value + x if op == "+" else value - x
            assert 0 <= result <= 9 and abs(result - right) <= 1
            slipped, steps, value = slipped + (result != right), steps + 1, result
        assert final == f"\\boxed{{{value}}}"
    assert 0.4 < slipped / steps < 0.6  # 0.6 where a one-off result keeps the chain in [0, 9]


def test_upward_slips_never_cancel_so_a_slipped_demonstration_ends_wrong():
    from prime_jax.data import chains

    problems = chains.make_problems(600, seed=1)
    every, rng = frozenset(chains.step_types()), np.random.default_rng(1)
    slipped = 0
    for p in problems:
        demo = chains.flawed_demonstration(p, every, 0.6, rng, direction="up")
        value, right_value = p.meta["start"], p.meta["start"]
        for line, (op, x) in zip(demo.split("\n")[:-1], p.meta["steps"]):
            result, right = int(line.split("=")[1]), value + x if op == "+" else value - x
            assert result in (right, right + 1)  # up only
            value, right_value = result, right_value + x if op == "+" else right_value - x
        slipped += value != right_value
        assert (demo != chains.demonstration(p)) == (value != right_value)  # any slip leaves the answer wrong
    assert 0.5 < slipped / len(problems) < 1.0
    with pytest.raises(ValueError, match="direction"):
        chains.flawed_demonstration(problems[0], every, 0.6, rng, direction="down")


def test_flawed_chains_sft_pairs_from_the_config():
    from config_files import load_config
    from prime_jax.data import chains, sft_pairs

    c = load_config("tiny_chains")
    assert c.sft.flawed_steps == 0.3
    c.sft.num_examples, c.sft.flawed_steps = 300, 0.0
    clean = sft_pairs(c, set())
    c.sft.flawed_steps = 0.3
    flawed = sft_pairs(c, set())
    assert flawed == sft_pairs(c, set()) and [m for m, _ in flawed] == [m for m, _ in clean]
    wrong = [last_boxed(d) != last_boxed(f) for (_, d), (_, f) in zip(clean, flawed)]
    assert 0.2 < np.mean(wrong) < 0.8
    c.sft.flawed_steps = 1.0
    wrong_everywhere = [last_boxed(d) != last_boxed(f) for (_, d), (_, f) in zip(clean, sft_pairs(c, set()))]
    assert np.mean(wrong_everywhere) > np.mean(wrong) + 0.2
    assert chains.flawed_step_types(0.3, c.sft.flaw_seed) < chains.flawed_step_types(1.0, c.sft.flaw_seed)


def test_tiny_tokenizer_round_trip_and_chat_template(tmp_path, tiny_tok):
    from transformers import AutoTokenizer

    assert len(tiny_tok) == 102
    assert (tiny_tok.eos_token, tiny_tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    ids = tiny_tok("<|im_start|><|im_end|><|endoftext|>\\boxed{", add_special_tokens=False)["input_ids"]
    assert ids == [1, 2, 0, 101]
    probs = make_problems(300, seed=7, difficulty="hard") + make_problems(300, seed=7, difficulty="medium")
    demo_lens = []
    for p in probs:
        msgs = synthetic.sft_messages(p)
        text = tiny_tok.apply_chat_template(msgs, tokenize=False)
        for t in (text, p.user_content, demonstration(p)):
            enc = tiny_tok(t, add_special_tokens=False)["input_ids"]
            assert tiny_tok.unk_token_id not in enc
            assert tiny_tok.decode(enc) == t
        demo_lens.append(len(tiny_tok(demonstration(p), add_special_tokens=False)["input_ids"]))
    medium = demo_lens[300:]
    assert 20 <= sum(medium) / len(medium) <= 40 and max(medium) <= 50
    ascii_text = "".join(chr(c) for c in range(32, 127)) + "\n\t"
    assert tiny_tok.decode(tiny_tok(ascii_text)["input_ids"]) == ascii_text

    p = probs[0]
    rendered = tiny_tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
    assert rendered == f"<|im_start|>user\n{p.user_content}<|im_end|>\n<|im_start|>assistant\n"
    with_sys = [{"role": "system", "content": "S"}] + p.messages
    assert tiny_tok.apply_chat_template(with_sys, tokenize=False).startswith(
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n")
    full = tiny_tok.apply_chat_template(synthetic.sft_messages(p), tokenize=False)
    assert full == rendered + demonstration(p) + "<|im_end|>\n"

    d1, d2 = tmp_path / "a", tmp_path / "b"
    build_tiny_tokenizer(d1)
    build_tiny_tokenizer(d2)
    assert (d1 / "tokenizer.json").read_bytes() == (d2 / "tokenizer.json").read_bytes()
    loaded = AutoTokenizer.from_pretrained(d1)
    assert loaded.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) == rendered
    assert loaded(rendered, add_special_tokens=False)["input_ids"] == \
        tiny_tok(rendered, add_special_tokens=False)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id) == (2, 0)


def test_data_instruction_named_own_or_refused():
    from config_files import load_config
    from prime_jax.config import ConfigError, validate
    from prime_jax.data import MATH_TASK_SUFFIX, STEP_BY_STEP_SUFFIX, load_eval_sets

    c = load_config("tiny", {"data.eval": "gsm8k", "data.eval_max_problems": 2})
    for instruction, suffix in (("eurus2", MATH_TASK_SUFFIX), ("step_by_step", STEP_BY_STEP_SUFFIX), ("none", ""),
                                (" Answer in \\boxed{}. ", "\n\nAnswer in \\boxed{}.")):
        c.data.instruction = instruction
        validate(c, num_devices=1)
        problem = load_eval_sets(c)[0]["gsm8k"][0]
        assert problem.user_content.endswith("market?" + suffix)
    for typo in ("step_by_stpe", "", "  "):
        c.data.instruction = typo
        with pytest.raises(ConfigError, match="data.instruction: must be one of"):
            validate(c, num_devices=1)
