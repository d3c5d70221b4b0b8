"""The relevance term that matches each query with the expression (MODEL.INSTALIGN.TEXT_MATCH_SCORE)."""

import math

import pytest
import torch
from test_modeling_decoder import check_relevance_term_switch

from instalign_d2.modeling.transformer_decoder.text_match import TextMatchScore


def test_the_term_starts_at_zero():
    term = TextMatchScore(16, 16)
    logits = torch.tensor([[2.0, 1.0, -3.0]])
    out = term(
        logits, torch.randn(1, 3, 16), torch.randn(1, 4, 16), torch.zeros(1, 4, dtype=torch.bool)
    )
    assert torch.equal(out, logits)


def test_the_term_is_the_scaled_dot_product_of_the_query_and_the_words_not_the_padding():
    torch.manual_seed(0)
    term = TextMatchScore(8, 6)
    torch.nn.init.normal_(term.text_proj.weight)
    torch.nn.init.normal_(term.text_proj.bias)
    queries, text = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    pad = torch.tensor([[False, False, True, True, True], [False] * 5])
    logits = torch.randn(2, 3)
    out = term(logits, queries, text, pad)
    for b, words in ((0, 2), (1, 5)):
        mean_word = text[b, :words].mean(0)
        for i in range(3):
            q = term.query_proj(torch.nn.functional.layer_norm(queries[b, i], (8,)))
            expected = logits[b, i] + q @ term.text_proj(mean_word) / math.sqrt(8)
            assert out[b, i].item() == pytest.approx(expected.item(), abs=1e-5)
    changed = text.clone()
    changed[0, 2:] += 7.0  # padding only
    assert torch.allclose(out, term(logits, queries, changed, pad))


def matching_task(classes=5, samples=2000, dim=16, seed=0):
    """Queries of an object of class k and words of class j (half the pairs equal), with noise;
    label 1 when k == j -- what "the square" asks of a query of a square or of a circle."""
    g = torch.Generator().manual_seed(seed)
    object_codes, word_codes = torch.randn(classes, dim, generator=g), torch.randn(
        classes, dim, generator=g
    )
    k = torch.randint(classes, (samples,), generator=g)
    other = (k + torch.randint(1, classes, (samples,), generator=g)) % classes
    same = torch.rand(samples, generator=g) < 0.5
    j = torch.where(same, k, other)
    queries = object_codes[k] + 0.1 * torch.randn(samples, dim, generator=g)
    words = word_codes[j] + 0.1 * torch.randn(samples, dim, generator=g)
    return queries[:, None, :], words[:, None, :], same.float()[:, None]


def fit(parameters, score, queries, words, labels, steps=300):
    optimizer = torch.optim.Adam(parameters, lr=0.03)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(
            score(queries, words), labels
        ).backward()
        optimizer.step()
    with torch.no_grad():
        return ((score(queries, words) > 0).float() == labels).float().mean().item()


def test_the_match_learns_what_a_score_read_from_the_mixed_query_cannot():
    torch.manual_seed(0)
    queries, words, labels = matching_task()
    pad = torch.zeros(len(words), 1, dtype=torch.bool)
    # A linear score of the query with the words mixed in (what a POT block hands the plain
    # head): equality of two codes is not linear in them.
    linear = torch.nn.Linear(16, 1)
    mixed = fit(linear.parameters(), lambda q, t: linear(q + t).squeeze(-1), queries, words, labels)
    term = TextMatchScore(16, 16)
    bias = torch.zeros(1, requires_grad=True)
    matched = fit(
        [*term.parameters(), bias],
        lambda q, t: term(bias.expand(len(q), 1), q, t, pad),
        queries,
        words,
        labels,
    )
    assert matched > 0.97 and mixed < 0.75, (matched, mixed)


def test_the_decoder_adds_the_term_only_when_asked_and_only_to_the_scores():
    check_relevance_term_switch(
        "TEXT_MATCH_SCORE", "text_match", lambda term: torch.nn.init.normal_(term.text_proj.weight)
    )
