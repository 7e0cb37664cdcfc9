"""PrimeBatch is the batch's one schema: what each jitted step reads is set whenever the loop calls it."""

import dataclasses
import itertools

import numpy as np
import pytest

from prime_jax.train.batch import PrimeBatch


@pytest.mark.parametrize("overlap,recompute,process_rewards,group_scores",
                         list(itertools.product((False, True), repeat=4)))
def test_every_program_gets_what_it_reads(overlap, recompute, process_rewards, group_scores):
    scored = tuple(f for f, on in (("old_logprobs", recompute), ("ref_logprobs", process_rewards)) if on)
    present = lambda program: set(PrimeBatch.present(program, scored=scored, overlap_scoring=overlap,
                                                     group_scores=group_scores))
    assert set(PrimeBatch.needs("score")) <= present("score") and set(PrimeBatch.needs("score")) <= present("prm_score")
    assert set(PrimeBatch.needs("policy")) <= present("policy")
    if process_rewards:  # the PRM trains only then
        assert set(PrimeBatch.needs("prm", group_scores=group_scores)) <= present("prm")
    assert ("outcome" in present("score")) == (not overlap)  # overlapped scoring runs before grading
    assert ("old_logprobs" in present("score")) == (not recompute)  # the sampler's, unless scored
    assert "group_scores" not in present("policy") and ("group_scores" in present("prm")) == group_scores


def test_the_schema_is_read_from_the_annotations():
    assert list(PrimeBatch.FIELDS) == [f.name for f in dataclasses.fields(PrimeBatch)]
    assert PrimeBatch.LOGICAL_AXES["outcome"] == ("batch",)
    assert PrimeBatch.LOGICAL_AXES["advantages"] == ("batch", "seq")
    assert PrimeBatch.RESPONSE_FIELDS == ("response_ids", "response_mask", "old_logprobs", "ref_logprobs", "advantages")
    with pytest.raises(ValueError, match="unknown program"):
        PrimeBatch.needs("prm_score")


def test_only_keeps_the_named_fields_and_names_a_missing_one():
    rows = np.zeros((2, 3), np.int32)
    batch = PrimeBatch(rows, rows, rows, rows, outcome=np.ones(2, np.float32))
    kept = batch.only(("response_mask", "outcome"))
    assert set(kept.fields()) == {"response_mask", "outcome"}
    with pytest.raises(KeyError, match="advantages"):
        batch.only(PrimeBatch.needs("policy"))
