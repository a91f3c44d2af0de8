"""Sampling: every step against hand-computed distributions, plus seeding and statistics."""

import math

import pytest
import torch
from sampling_reference import min_p_filter, top_k_filter, top_p_filter

from mistral7b import sampling
from mistral7b.errors import InputError
from mistral7b.sampling import (
    NonFiniteLogitsError,
    SamplingParams,
    TokenHistory,
    apply_frequency_presence,
    apply_repetition_penalty,
    apply_temperature,
    greedy,
    make_generator,
    sample_batch,
    sample_token,
    token_counts,
    token_logprobs,
)

INF = float("inf")
P4 = [0.5, 0.3, 0.15, 0.05]


def logits_of(probs, shift=0.0):
    """Logits whose softmax is `probs` (log p + any constant)."""
    return torch.tensor([math.log(p) + shift if p > 0 else -INF for p in probs])


def kept(filtered):
    return torch.isfinite(filtered).nonzero().flatten().tolist()


def probs_of(filtered):
    return torch.softmax(filtered, dim=-1)


# --- SamplingParams -------------------------------------------------------------------------


def test_defaults_are_greedy_and_disabled():
    p = SamplingParams()
    assert p.max_tokens == 256 and p.temperature == 0.0 and p.greedy
    assert p.top_p == 1.0 and p.top_k == 0 and p.min_p == 0.0
    assert not p.has_penalties and p.seed is None and p.stop == ()
    assert not p.logprobs and p.top_logprobs == 0 and not p.ignore_eos


def test_stop_is_normalised_to_a_tuple():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None).stop == ()
    # hashable and comparable once normalised
    assert SamplingParams(stop=["x"]) == SamplingParams(stop=("x",))
    hash(SamplingParams(stop=["x"]))


def test_numbers_are_normalised():
    p = SamplingParams(temperature=1, top_p=1, repetition_penalty=2)
    assert isinstance(p.temperature, float) and isinstance(p.repetition_penalty, float)


def test_tiny_temperature_is_greedy():
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", INF),
        ("temperature", "0.7"),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -0.5),
        ("top_p", float("nan")),
        ("top_k", -1),
        ("top_k", 1.5),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("min_p", float("nan")),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("nan")),
        ("frequency_penalty", 2.01),
        ("frequency_penalty", -2.5),
        ("frequency_penalty", float("nan")),
        ("presence_penalty", 3.0),
        ("presence_penalty", -2.01),
        ("presence_penalty", float("nan")),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("seed", 1.5),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [3]),
        ("stop", 3),
        ("top_logprobs", -1),
        ("top_logprobs", 21),
        ("logprobs", "yes"),
        ("ignore_eos", 1),
    ],
)
def test_bad_values_raise_input_error_naming_the_field(field, value):
    kwargs = {field: value}
    if field == "top_logprobs":
        kwargs["logprobs"] = True
    with pytest.raises(InputError, match=field):
        SamplingParams(**kwargs)


def test_boundary_values_are_accepted():
    SamplingParams(
        max_tokens=1, top_p=1.0, min_p=1.0, frequency_penalty=-2, presence_penalty=2,
        seed=2**64 - 1, logprobs=True, top_logprobs=20,
    )
    SamplingParams(min_p=0.0, frequency_penalty=2, presence_penalty=-2, seed=-(2**63))


def test_top_logprobs_needs_logprobs():
    with pytest.raises(InputError, match="logprobs"):
        SamplingParams(top_logprobs=3)


def test_error_message_gives_the_allowed_range():
    with pytest.raises(InputError, match=r"top_p must be in \(0, 1\].*got 1.5"):
        SamplingParams(top_p=1.5)


# --- penalties -------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0])
    out = apply_repetition_penalty(logits, [0, 1, 1, 4], 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0, 0.0]
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 0.5)
    assert out.tolist() == [4.0, -0.5, 0.5, 3.0, 0.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, 0.0]  # pure: input untouched


def test_repetition_penalty_batched_rows():
    logits = torch.tensor([[2.0, -1.0, 4.0], [2.0, -1.0, 4.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 0], [1, 2]]), 2.0)
    assert out.tolist() == [[1.0, -1.0, 4.0], [2.0, -2.0, 2.0]]


def test_repetition_penalty_rejects_out_of_vocab_ids():
    with pytest.raises(InputError, match=r"\[0, 2\]"):
        apply_repetition_penalty(torch.zeros(3), [3], 1.5)


def test_frequency_and_presence_penalty():
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    counts = token_counts([2, 1, 2, 2], 4)
    assert counts.tolist() == [0.0, 1.0, 3.0, 0.0]
    out = apply_frequency_presence(logits, counts, 0.5, 0.25)
    assert out.tolist() == [1.0, 0.25, -0.75, 1.0]  # 1 - 1*0.5 - 0.25; 1 - 3*0.5 - 0.25
    out = apply_frequency_presence(logits, counts, -1.0, 0.0)  # negative: encourage repeats
    assert out.tolist() == [1.0, 2.0, 4.0, 1.0]


def test_penalties_in_sample_token_use_the_right_history():
    logits = torch.tensor([2.0, 1.5])
    # repetition penalty counts the prompt: 2.0 / 2 = 1.0 < 1.5
    p = SamplingParams(repetition_penalty=2.0)
    assert sample_token(logits, p, history=TokenHistory([0], [])) == 1
    assert sample_token(logits, p, history=TokenHistory([1], [])) == 0
    # frequency penalty ignores the prompt, counts the output: 2.0 - 1*1.0 = 1.0 < 1.5
    f = SamplingParams(frequency_penalty=1.0)
    assert sample_token(logits, f, history=TokenHistory([0, 0, 0], [])) == 0
    assert sample_token(logits, f, history=TokenHistory([], [0])) == 1
    # presence penalty: once is enough, count does not matter
    pr = SamplingParams(presence_penalty=0.6)
    assert sample_token(logits, pr, history=TokenHistory([], [0])) == 1


# --- temperature and filters -----------------------------------------------------------------


@pytest.mark.parametrize(
    "temperature, expected",
    [
        # softmax(log p / T) is p^(1/T) renormalised
        (0.5, [x / 0.365 for x in (0.25, 0.09, 0.0225, 0.0025)]),
        (1.0, P4),
        (2.0, [math.sqrt(x) / sum(math.sqrt(y) for y in P4) for x in P4]),
    ],
)
def test_temperature_matches_hand_computed_softmax(temperature, expected):
    out = probs_of(apply_temperature(logits_of(P4), temperature))
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_temperature_must_be_positive():
    with pytest.raises(InputError):
        apply_temperature(torch.zeros(3), 0.0)


def test_top_k():
    out = top_k_filter(logits_of(P4), 3)
    assert kept(out) == [0, 1, 2]
    assert probs_of(out).tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])
    assert kept(top_k_filter(logits_of(P4), 1)) == [0]
    assert top_k_filter(logits_of(P4), 0).equal(logits_of(P4))
    assert top_k_filter(logits_of(P4), 4).equal(logits_of(P4))
    assert top_k_filter(logits_of(P4), 100).equal(logits_of(P4))


def test_top_k_keeps_exactly_k_with_ties_to_lowest_ids():
    logits = torch.tensor([1.0, 2.0, 0.0, 2.0, 2.0])
    assert kept(top_k_filter(logits, 2)) == [1, 3]
    assert kept(top_k_filter(logits, 3)) == [1, 3, 4]
    assert kept(top_k_filter(logits, 4)) == [0, 1, 3, 4]
    batch = torch.stack([logits, logits.flip(0)])  # flipped: [2, 2, 0, 2, 1]
    out = top_k_filter(batch, 2)
    assert kept(out[0]) == [1, 3] and kept(out[1]) == [0, 1]


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.8, [0, 1]),  # 0.5 < 0.8 <= 0.5 + 0.3
        (0.81, [0, 1, 2]),
        (0.95, [0, 1, 2]),
        (0.96, [0, 1, 2, 3]),
        (0.5, [0]),  # the top token alone reaches 0.5
        (0.49, [0]),
        (1e-9, [0]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p(p, expected):
    assert kept(top_p_filter(logits_of(P4), p)) == expected


def test_top_p_ranks_by_probability_not_by_id():
    probs = [0.05, 0.3, 0.15, 0.5]
    assert kept(top_p_filter(logits_of(probs, shift=7.0), 0.8)) == [1, 3]


def test_top_p_ties_go_to_lowest_ids_and_rows_are_independent():
    uniform = logits_of([0.25] * 4)
    assert kept(top_p_filter(uniform, 0.5)) == [0, 1]
    assert kept(top_p_filter(uniform, 0.51)) == [0, 1, 2]
    out = top_p_filter(torch.stack([logits_of(P4), uniform]), 0.8)
    assert kept(out[0]) == [0, 1] and kept(out[1]) == [0, 1, 2, 3]


def test_top_p_renormalises_over_the_nucleus():
    out = probs_of(top_p_filter(logits_of(P4), 0.8))
    assert out.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])


def test_min_p():
    probs = [0.5, 0.3, 0.1, 0.08, 0.02]
    # threshold 0.2 * 0.5 = 0.1: p = 0.1 is kept, 0.08 is not
    assert kept(min_p_filter(logits_of(probs), 0.2)) == [0, 1, 2]
    assert kept(min_p_filter(logits_of(probs), 0.61)) == [0]
    assert kept(min_p_filter(logits_of(probs), 0.6)) == [0, 1]
    assert kept(min_p_filter(logits_of([0.4, 0.4, 0.2]), 1.0)) == [0, 1]
    assert min_p_filter(logits_of(probs), 0.0).equal(logits_of(probs))


def test_filters_keep_masked_tokens_masked():
    logits = logits_of([0.5, 0.0, 0.5])
    for out in (top_k_filter(logits, 2), top_p_filter(logits, 0.99), min_p_filter(logits, 0.1)):
        assert kept(out) == [0, 2]


def test_order_top_p_sees_the_tempered_distribution():
    # At T=0.5 the probabilities become [0.685, 0.247, 0.062, 0.007]: 0.685 < 0.9 <= 0.932,
    # so top_p 0.9 keeps two tokens where at T=1 it would keep three.
    logits = logits_of(P4)
    p = SamplingParams(temperature=0.5, top_p=0.9, seed=0)
    g = make_generator(0)
    draws = {sample_token(logits, p, g) for _ in range(300)}
    assert draws == {0, 1}


# --- greedy ----------------------------------------------------------------------------------


def test_greedy_ties_go_to_lowest_id():
    assert int(greedy(torch.tensor([1.0, 3.0, 3.0, 2.0]))) == 1
    assert greedy(torch.tensor([[0.0, 0.0], [-INF, 5.0]])).tolist() == [0, 1]
    assert sample_token(torch.tensor([1.0, 3.0, 3.0]), SamplingParams()) == 1


def test_greedy_ignores_filters_and_the_generator():
    logits = torch.tensor([0.1, 0.9, 0.3])
    p = SamplingParams(temperature=0.0, top_k=2, top_p=0.1, min_p=0.9)
    g = make_generator(1)
    state = g.get_state()
    assert sample_token(logits, p, g) == 1
    assert g.get_state().equal(state)  # greedy consumes no randomness


def test_top_k_one_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(50, 1000)
    logits[:, 7] = logits.max(dim=1).values  # plenty of ties with id 7
    p = SamplingParams(temperature=1.0, top_k=1)
    for row in logits:
        assert sample_token(row, p, make_generator(3)) == int(greedy(row))


# --- seeding and statistics ------------------------------------------------------------------


def draws(logits, params, generator, n):
    return [sample_token(logits, params, generator) for _ in range(n)]


def test_make_generator():
    assert make_generator(None) is None
    assert make_generator(1234).initial_seed() == 1234


def test_same_seed_same_sequence_different_seeds_differ():
    logits = torch.zeros(1000)  # uniform: two seeds agreeing 100 times is impossible in practice
    p = SamplingParams(temperature=1.0, seed=42)
    a = draws(logits, p, make_generator(42), 100)
    b = draws(logits, p, make_generator(42), 100)
    c = draws(logits, p, make_generator(43), 100)
    assert a == b
    assert a != c


def test_seeded_rows_do_not_depend_on_batch_composition():
    torch.manual_seed(0)
    logits = torch.randn(3, 64)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    other = SamplingParams(temperature=1.0)
    alone_g = make_generator(7)
    alone = [sample_batch(logits[:1], [seeded], [alone_g])[0] for _ in range(50)]
    g = make_generator(7)
    gens = [g, make_generator(99), None]
    batched = [
        sample_batch(logits, [seeded, other, SamplingParams()], gens)[0] for _ in range(50)
    ]
    assert alone == batched


def chi_square(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


# chi-square critical value, 3 degrees of freedom, p = 0.001 (statistical tables): 16.27
CHI2_3DF_999 = 16.27


@pytest.mark.parametrize(
    "params, expected",
    [
        (SamplingParams(temperature=1.0), P4),
        (SamplingParams(temperature=0.5), [x / 0.365 for x in (0.25, 0.09, 0.0225, 0.0025)]),
        (SamplingParams(temperature=1.0, top_p=0.8), [0.625, 0.375, 0.0, 0.0]),
        (SamplingParams(temperature=1.0, top_k=3), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
    ],
)
def test_sampling_follows_the_distribution(params, expected):
    n = 8000
    out = draws(logits_of(P4), params, make_generator(2024), n)
    counts = [out.count(i) for i in range(4)]
    for c, p in zip(counts, expected):
        if p == 0:
            assert c == 0
    dof = sum(p > 0 for p in expected) - 1
    # critical values for p = 0.001 at 1, 2, 3 degrees of freedom: 10.83, 13.82, 16.27
    assert chi_square(counts, expected) < {1: 10.83, 2: 13.82, 3: CHI2_3DF_999}[dof]


def test_unseeded_sampling_uses_the_global_rng():
    p = SamplingParams(temperature=1.0)
    torch.manual_seed(5)
    a = draws(torch.zeros(1000), p, None, 20)
    torch.manual_seed(5)
    assert draws(torch.zeros(1000), p, None, 20) == a


# --- sample_batch ----------------------------------------------------------------------------


def test_sample_batch_greedy_fast_path_equals_per_row(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(16, 500)
    logits[3, [10, 20]] = 100.0  # tie -> 10
    expected = [sample_token(row, SamplingParams()) for row in logits]
    assert expected[3] == 10

    def no_per_row(*args, **kwargs):
        raise AssertionError("the all-greedy batch must not go row by row")

    monkeypatch.setattr(sampling, "_sample_checked_row", no_per_row)
    assert sample_batch(logits, [SamplingParams()] * 16) == expected


def test_sample_batch_mixed_rows_match_per_row_calls():
    torch.manual_seed(1)
    logits = torch.randn(4, 200)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=20, seed=1),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(temperature=1.2, top_p=0.9, min_p=0.05, frequency_penalty=0.5, seed=2),
    ]
    histories = [None, None, TokenHistory([1, 2, 3], [4]), TokenHistory([5], [6, 6, 7])]
    got = sample_batch(logits, params, [None, make_generator(1), None, make_generator(2)],
                       histories)
    want = [
        sample_token(logits[i], params[i], make_generator(params[i].seed), histories[i])
        for i in range(4)
    ]
    assert got == want


def test_sample_batch_checks_lengths():
    with pytest.raises(InputError, match="params has 1 entries for a batch of 2"):
        sample_batch(torch.zeros(2, 5), [SamplingParams()])
    with pytest.raises(InputError, match=r"\[B, V\]"):
        sample_batch(torch.zeros(5), [SamplingParams()])


# --- logprobs --------------------------------------------------------------------------------


def test_token_logprobs_are_the_raw_log_softmax():
    logits = logits_of(P4, shift=3.0)
    lp, top = token_logprobs(logits, 2, top_n=2)
    assert lp == pytest.approx(math.log(0.15), abs=1e-6)
    assert [i for i, _ in top] == [0, 1]
    assert [v for _, v in top] == pytest.approx([math.log(0.5), math.log(0.3)], abs=1e-6)


def test_token_logprobs_sorted_descending_ties_by_id_and_clamped():
    logits = torch.tensor([0.0, 2.0, 1.0, 2.0, -INF])
    lp, top = token_logprobs(logits, 4, top_n=20)
    assert lp == -INF
    assert [i for i, _ in top] == [1, 3, 2, 0, 4]
    z = math.log(2 * math.e**2 + math.e + 1)
    assert [v for _, v in top] == pytest.approx([2 - z, 2 - z, 1 - z, -z, -INF], abs=1e-6)
    assert token_logprobs(logits, 1, top_n=1)[1] == [(1, pytest.approx(2 - z, abs=1e-6))]
    assert token_logprobs(logits, 1, top_n=0)[1] == []


def test_token_logprobs_bad_arguments():
    with pytest.raises(InputError, match="token_id"):
        token_logprobs(torch.zeros(4), 4)
    with pytest.raises(InputError, match="top_n"):
        token_logprobs(torch.zeros(4), 0, top_n=-1)


# --- non-finite logits -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), INF])
def test_non_finite_logits_raise(bad):
    row = torch.tensor([0.0, 1.0, bad, 0.5])
    assert issubclass(NonFiniteLogitsError, InputError)
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=0)):
        with pytest.raises(NonFiniteLogitsError):
            sample_token(row, params, make_generator(0))
    with pytest.raises(NonFiniteLogitsError):
        token_logprobs(row, 0)
    batch = torch.zeros(4, 4)
    batch[1] = row
    batch[3, 0] = bad
    for params in ([SamplingParams()] * 4, [SamplingParams(temperature=1.0)] * 4):
        with pytest.raises(NonFiniteLogitsError) as info:
            sample_batch(batch, params)
        assert info.value.rows == [1, 3]


def test_masking_with_minus_inf_is_fine_but_all_masked_is_not():
    row = torch.tensor([-INF, 0.0, -INF])
    assert sample_token(row, SamplingParams(temperature=1.0), make_generator(0)) == 1
    assert sample_batch(row[None], [SamplingParams()]) == [1]
    with pytest.raises(NonFiniteLogitsError):
        sample_batch(torch.full((2, 3), -INF), [SamplingParams()] * 2)


def test_bfloat16_logits_are_accepted():
    row = torch.tensor([0.0, 2.0, 1.0], dtype=torch.bfloat16)
    assert sample_token(row, SamplingParams(temperature=0.5, seed=0), make_generator(0)) in {
        0, 1, 2,
    }
    assert sample_batch(row[None], [SamplingParams()]) == [1]


# --- the fast per-row path is the documented chain of filters --------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_sample_token_distribution_equals_the_chain_of_filters(seed):
    torch.manual_seed(seed)
    vocab = 5000
    # rounding to 0.25 creates many ties; a steep row puts the nucleus in the top 64,
    # a flat row forces top-p beyond the pruning steps
    rows = [
        (torch.randn(vocab) * 3).round(decimals=0) / 4,
        torch.randn(vocab) * 8,
        torch.randn(vocab) * 0.1,
    ]
    settings_ = [
        {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05},
        {"temperature": 1.0, "top_p": 0.95},
        {"temperature": 1.3, "top_p": 0.5, "min_p": 0.01},
        {"temperature": 0.5, "min_p": 0.1},
        {"temperature": 1.0, "top_k": 300},
        {"temperature": 2.0, "top_k": 7, "top_p": 0.3},
        {"temperature": 1.0},
    ]
    for row in rows:
        for kw in settings_:
            p = SamplingParams(**kw)
            ref = apply_temperature(row, p.temperature)
            ref = min_p_filter(top_p_filter(top_k_filter(ref, p.top_k), p.top_p), p.min_p)
            ref_probs = torch.softmax(ref.double(), dim=-1)
            ids, logits = sampling._filtered_distribution(row, p)
            got = torch.zeros(vocab, dtype=torch.float64)
            got[ids if ids is not None else slice(None)] = torch.softmax(logits.double(), -1)
            assert kept(ref) == (got > 0).nonzero().flatten().tolist(), kw
            assert torch.allclose(got, ref_probs, atol=1e-6), kw
