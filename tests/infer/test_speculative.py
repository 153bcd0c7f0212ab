"""The drafter re-aligns with the source after each kind of edit, so that the drafts after it are the rest of the
source (speed); the acceptance rule keeps exactly the agreeing prefix (correctness)."""

from __future__ import annotations

from zhtune.infer.speculative import CopyDrafter, accepted_length

SOURCE = [10, 11, 12, 13, 14, 15, 16, 17]
END = 99


def test_acceptance_keeps_the_agreeing_prefix_only():
    assert accepted_length([1, 2, 3], [1, 2, 3, 4]) == 3
    assert accepted_length([1, 2, 3], [1, 9, 3, 4]) == 1
    assert accepted_length([1, 2, 3], [9, 2, 3, 4]) == 0
    assert accepted_length([], [5]) == 0


def _after(output: list[int], drafted: int, accepted: int) -> CopyDrafter:
    drafter = CopyDrafter(SOURCE, END, max_draft=16)
    drafter.update(output, drafted, accepted)
    return drafter


def test_copying_moves_past_the_accepted_tokens_and_the_bonus():
    d = _after([10, 11, 12], drafted=2, accepted=2)  # drafts 10, 11 kept; the model's own next token is 12
    assert d.propose(3) == [13, 14, 15]
    assert d.want == 6  # a wholly accepted draft doubles the next one, up to what is left (13..17, END)


def test_realigned_after_a_substitution_an_insertion_and_a_deletion():
    assert _after([10, 11, 50], 3, 2).propose(2) == [13, 14]  # 12 -> 50: one source token skipped
    inserted = CopyDrafter(SOURCE, END, max_draft=16)
    inserted.update([10, 11, 50], 3, 2)
    inserted.update([10, 11, 50, 12], 2, 0)  # then the model goes on with the source: found by the n-gram match
    assert inserted.propose(2) == [13, 14]
    assert _after([10, 11, 13], 3, 2).propose(2) == [14, 15]  # 12 deleted: the model's 13 is found in the source
    assert _after([10, 11, 12, 13, 14, 15, 16, 17], 7, 7).propose(4) == [END]  # the end of turn comes last


def test_width_skips_the_source_characters_a_new_token_replaces():
    widths = {60: 3, 10: 1, 11: 1, 12: 1, 13: 1}  # one 3-character token replaces three 1-character ones
    d = CopyDrafter(SOURCE, END, max_draft=16, width=lambda t: widths.get(t, 1))
    d.update([60], drafted=4, accepted=0)
    assert d.propose(2) == [13, 14]
