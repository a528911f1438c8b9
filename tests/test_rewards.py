"""Sim-to-real rewards with the real MiniLM embedder and the real rouge-score package."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from rwml_jax.models import load_embedder
from rwml_jax.rwml import judge as J
from rwml_jax.rwml import rewards as R

REAL = "You arrive at countertop 1. On the countertop 1, you see a apple 1, a bread 1, and a knife 2."
PARAPHRASE = "You reach countertop 1. On countertop 1 you see an apple 1, a bread 1 and a knife 2."
# Same place, other objects: MiniLM puts it at d ~ 0.29, between the ALFWorld (0.2) and τ² user (0.4) bounds.
NEAR_MISS = "You arrive at countertop 1. On the countertop 1, you see a mug 3, a spatula 1, and a pan 2."
UNRELATED = "The stock market closed higher on Tuesday after strong earnings reports."


def tagged(text: str) -> str:
    return f"<think>The agent looks at the countertop.</think><next_state>{text}</next_state>"


@pytest.fixture(scope="module")
def minilm():
    return load_embedder("minilm", batch_size=16)


def test_parse_next_state_cases():
    assert R.parse_next_state(tagged(" a b ")) == ("a b", "ok")
    assert R.parse_next_state("no tags at all") == (None, "missing")
    assert R.parse_next_state("<think>x</think><next_state>cut off by max tok") == (None, "unclosed")
    assert R.parse_next_state("<next_state>  \n </next_state>") == (None, "empty")
    # the LAST block counts
    assert R.extract_next_state("<next_state>first</next_state> then <next_state>second</next_state>") == "second"
    # a last opening tag without its closing tag is unclosed, even after a complete block
    assert R.parse_next_state("<next_state>a</next_state><next_state>b")[1] == "unclosed"
    # a block drafted inside the reasoning is not the answer
    assert R.parse_next_state("<think>maybe <next_state>x</next_state></think>no answer")[1] == "missing"
    assert R.extract_next_state("<think>maybe <next_state>x</next_state></think><next_state>y</next_state>") == "y"
    with pytest.raises(TypeError, match="strings"):
        R.parse_next_state(None)


def test_sim_to_real_reward_cases(minilm, caplog):
    outputs = [
        tagged(REAL),  # copy -> 1
        "You arrive at countertop 1.",  # no tags -> 0
        "<think>hmm</think><next_state>" + REAL,  # unclosed -> 0
        "<think>hmm</think><next_state></next_state>",  # empty -> 0
        tagged(UNRELATED),  # unrelated -> 0
        tagged(PARAPHRASE),  # paraphrase -> 1
    ]
    stats: dict = {}
    with caplog.at_level(logging.INFO, logger="rwml_jax.rwml.rewards"):
        r = R.sim_to_real_reward(outputs, [REAL] * 6, minilm, threshold=0.2, stats=stats)
    np.testing.assert_array_equal(r, [1, 0, 0, 0, 0, 1])
    assert (stats["ok"], stats["missing"], stats["unclosed"], stats["empty"]) == (3, 1, 1, 1)
    assert "3 of 6 outputs unparsable" in caplog.text


def test_distances_are_one_minus_cosine(minilm):
    d, counts = R.embedding_distances([tagged(REAL), tagged(PARAPHRASE), tagged(UNRELATED), "x"], [REAL] * 4, minilm)
    e = minilm.embed([REAL, PARAPHRASE, UNRELATED])
    np.testing.assert_allclose(d[:3], 1 - e @ e[0], atol=1e-5)
    assert d[0] < 1e-5 and d[1] < 0.2 < d[2] and np.isnan(d[3]) and counts["missing"] == 1


def test_threshold_separates_near_miss(minilm):
    out = [tagged(NEAR_MISS)]
    assert R.sim_to_real_reward(out, [REAL], minilm, threshold=0.2)[0] == 0.0
    assert R.sim_to_real_reward(out, [REAL], minilm, threshold=0.4)[0] == 1.0
    with pytest.raises(ValueError, match="threshold must be > 0"):
        R.sim_to_real_reward(out, [REAL], minilm, threshold=0.0)
    with pytest.raises(ValueError, match="1 outputs but 2 realized"):
        R.sim_to_real_reward(out, [REAL, REAL], minilm, threshold=0.2)


def test_precomputed_realised_embeddings_give_the_same_rewards(minilm, tmp_path):
    from rwml_jax.rwml.embed_cache import EmbeddingCache

    cache = EmbeddingCache(minilm, tmp_path)
    outputs = [tagged(REAL), tagged(NEAR_MISS), tagged(PARAPHRASE), "nothing"]
    real_vecs = cache.embed([REAL] * 4)
    a = R.sim_to_real_reward(outputs, real_vecs, minilm, threshold=0.2)
    b = R.sim_to_real_reward(outputs, [REAL] * 4, minilm, threshold=0.2)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="expected \\[4, dim\\]"):
        R.sim_to_real_reward(outputs, real_vecs[:2], minilm, threshold=0.2)


def test_rouge_lands_on_the_grid():
    rng = np.random.default_rng(0)
    vocab = ["type", "object", "properties", "customer_id", "string", "array", "items", "order_id", "number"]
    preds, reals = [], []
    for _ in range(200):
        reals.append(" ".join(rng.choice(vocab, rng.integers(1, 12))))
        preds.append(tagged(" ".join(rng.choice(vocab, rng.integers(1, 12)))))
    r = R.rouge_reward(preds, reals)
    grid = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert np.all(np.isin(r, grid)), set(r) - set(grid)
    assert len(set(r)) >= 4  # the random pairs really spread over the grid
    raw = np.array([R.rouge_f1(R.extract_next_state(p), t) for p, t in zip(preds, reals)])
    assert np.all(np.abs(r - raw) <= 0.1 + 1e-9)  # nearest grid point


def test_rouge_values_and_json_tokenisation():
    schema = '{"type":"object","properties":{"customer_id":{"type":"string"},"orders":{"type":"array"}}}'
    assert R.rouge_reward([tagged(schema)], [schema])[0] == 1.0
    assert R.rouge_reward([tagged("completely different words")], [schema])[0] == 0.0
    assert R.rouge_reward(["no tags " + schema], [schema])[0] == 0.0
    # customer_id is one token; punctuation is dropped
    assert R.JsonAwareTokenizer().tokenize(schema) == [
        "type", "object", "properties", "customer_id", "type", "string", "orders", "type", "array"]
    # 9 reference tokens, prediction = its first 3 -> LCS 3, P = 1, R = 1/3, F1 = 0.5 -> rounds up to 0.6
    assert R.rouge_f1('{"type":"object","properties":{}}', schema) == pytest.approx(0.5)
    assert R.rouge_reward([tagged('{"type":"object","properties":{}}')], [schema])[0] == 0.6
    assert list(R.round_to_grid([0.0, 0.09, 0.1, 0.29, 0.31, 0.7, 0.99, 1.0])) == [0, 0, 0.2, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_dispatcher_by_kind(minilm):
    schema = '{"type":"object","properties":{"order_id":{"type":"string"}}}'
    outputs = [tagged(NEAR_MISS), tagged(NEAR_MISS), tagged(schema), tagged('{"type":"object"}'), "broken",
               tagged(PARAPHRASE)]
    realized = [REAL, REAL, schema, schema, REAL, REAL]
    kinds = ["observation", "user_reply", "tool_response", "tool_response", "user_reply", "observation"]
    batch = R.compute_rewards(outputs, realized, kinds, minilm)
    # observation: d ~ 0.29 >= 0.2 -> 0; user_reply: < 0.4 -> 1; ROUGE: 1, and P = 1, R = 2/6, F1 = 0.5 -> 0.6
    np.testing.assert_array_equal(batch.rewards, [0.0, 1.0, 1.0, 0.6, 0.0, 1.0])
    assert np.isnan(batch.distances[2]) and np.isnan(batch.distances[4])
    assert batch.distances[0] == pytest.approx(batch.distances[1])
    s = batch.stats
    assert (s["n"], s["unparsable"], s["missing"]) == (6, 1, 1)
    assert s["user_reply/unparsable"] == 1 and s["tool_response/mean_reward"] == pytest.approx(0.8)
    # the stricter filter thresholds and the paper defaults
    assert R.RewardConfig() == R.RewardConfig(threshold_observation=0.2, threshold_user_reply=0.4)
    strict = R.compute_rewards(outputs[:2], realized[:2], kinds[:2], minilm, R.RewardConfig.filter_defaults())
    np.testing.assert_array_equal(strict.rewards, [0.0, 0.0])
    with pytest.raises(ValueError, match="unknown next-state kind 'obs'"):
        R.compute_rewards(outputs[:1], realized[:1], ["obs"], minilm)
    with pytest.raises(ValueError, match="threshold_observation"):
        R.RewardConfig(threshold_observation=0.0)
    cfg = R.RewardConfig.from_mapping({"kind": "embedding", "threshold_observation": 0.3, "rouge_grid": 0.2})
    assert cfg.threshold_observation == 0.3


def test_status_penalty_and_think_penalty(minilm):
    """The authors' scripts' τ² terms: -status_penalty unless the last line names the true status (and only it),
    -think_penalty without a <think> block of more than think_min_tokens words."""
    assert R.states_status("...</next_state>\nTask status: failed", "failed")
    assert not R.states_status("...</next_state>\nTask status: failed or not yet completed", "failed")
    assert not R.states_status("Task status: failed\nmore text", "failed")
    long_think = f"<think>{'word ' * 20}</think><next_state>{REAL}</next_state>"
    outs = [long_think + "\nTask status: not yet completed", long_think + "\nTask status: failed", tagged(REAL)]
    cfg = R.RewardConfig(status_penalty=0.5, think_penalty=0.1)
    rb = R.compute_rewards(outs, [REAL] * 3, "observation", minilm, cfg, task_statuses=["not yet completed"] * 3)
    np.testing.assert_allclose(rb.rewards, [1.0, 0.5, 1.0 - 0.5 - 0.1])
    assert rb.stats["wrong_status"] == 2 and rb.stats["short_think"] == 1


def test_judge_score_parsing():
    assert J.parse_judge_score("<score>7</score>") == 0.7
    assert J.parse_judge_score("thinking... <score> 12 </score>") == 1.0
    assert J.parse_judge_score("<score>3</score> actually <score>9.5</score>") == 0.95
    assert J.parse_judge_score("I would give it a 7") is None
    msgs = J.judge_messages("pred text", "real text")
    assert msgs[0]["role"] == "system" and "pred text" in msgs[1]["content"] and "real text" in msgs[1]["content"]


@pytest.mark.slow
def test_judge_reward_with_the_project_sampler():
    """The judge path end to end with the real sampler on a tiny random model: its answers carry no score,
    so every judged sample scores 0 and is counted; unparsable predictions never reach the judge."""
    from rwml_jax.sampling.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    config, params = tiny_model(tok)
    judge = J.JudgeReward.from_model(config, params, tok, max_new_tokens=8)
    calls = []
    inner = judge.generate_fn
    judge.generate_fn = lambda msgs: calls.append(len(msgs)) or inner(msgs)
    outputs = [tagged(REAL), "no tags", tagged(PARAPHRASE)]
    rewards, stats = judge.scores(outputs, [REAL] * 3)
    assert calls == [2]
    assert stats["missing"] == 1 and stats["judge_unparsable"] + int((rewards > 0).sum()) == 2
    assert np.all((rewards >= 0) & (rewards <= 1)) and rewards[1] == 0.0
    np.testing.assert_array_equal(judge.binarize([0.0, 0.69, 0.7, 1.0]), [0, 0, 1, 1])
