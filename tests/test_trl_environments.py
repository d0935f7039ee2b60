"""TRL 0.7.11's tests/test_environments.py on rljax (same cases and numbers), plus the
on-device stop sequences TextEnvironment relies on.

TRL's dummy GPT-2 and its tokenizer come from the hub; here a 2-layer GPT-2 (value head) and a
BPE tokenizer trained on the test's own sentences stand in. The tokenizer splits the texts
as GPT-2's does where the test counts tokens ("I am a prompt!\\nHello there!" -> 9 tokens,
"... General Kenobi!" -> 12, "test<response>" -> 4), so TRL's numbers hold unchanged.
"""
import copy
from unittest.mock import patch

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.environment import TextEnvironment, TextHistory

TEXTS = ["I am a prompt!\nHello there! General Kenobi! this is a test, this is another, longer test"
         "<request><DummyTool>test<call>test<response>"] * 20


class DummyTool:
    def __call__(self, text):
        return text


def dummy_generate(histories):
    for i in range(len(histories)):
        histories[i].append_segment("<request><DummyTool>test<call>", np.array([1, 2, 3]), system=False)
    return histories


def _eq(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- TextHistory ---------------------------------------------------------------------------------


def test_text_history_init():
    text, tokens = "Hello there!", np.array([1, 2, 3])
    history = TextHistory(text, tokens)
    assert history.text == text
    _eq(history.tokens, tokens)
    _eq(history.token_masks, np.zeros_like(tokens))
    history = TextHistory(text, tokens, system=False)
    _eq(history.token_masks, np.ones_like(tokens))


def test_text_history_append_segment():
    text = "Hello there!"
    history = TextHistory(text, [1, 2, 3])
    history.append_segment("General Kenobi!", np.array([4, 5, 6]), system=False)
    assert history.text == text + "General Kenobi!"
    _eq(history.tokens, [1, 2, 3, 4, 5, 6])
    _eq(history.token_masks, [0, 0, 0, 1, 1, 1])
    history.append_segment("You are a bold one!", jnp.array([7, 8, 9]))
    assert history.text == text + "General Kenobi!" + "You are a bold one!"
    _eq(history.tokens, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    _eq(history.token_masks, [0, 0, 0, 1, 1, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="empty"):
        history.append_segment("", [1])


def test_text_history_complete():
    history = TextHistory("Hello there!", np.array([1, 2, 3]))
    history.complete()
    assert history.completed and not history.truncated
    history.complete(truncated=True)
    assert history.completed and history.truncated


def test_text_history_last_segment():
    history = TextHistory("Hello there!", np.array([1, 2, 3]))
    history.append_segment("General Kenobi!", np.array([4, 5, 6]))
    history.append_segment("You are a bold one!", np.array([7, 8, 9]))
    assert history.last_text_segment == "You are a bold one!"


def test_text_history_split_query_response():
    history = TextHistory("Hello there!", np.array([1, 2, 3]))
    history.append_segment("General Kenobi!", np.array([4, 5, 6]), system=False)
    history.append_segment("You are a bold one!", np.array([7, 8, 9]), system=True)
    query, response, mask = history.split_query_response_tokens()
    _eq(query, [1, 2, 3])
    _eq(response, [4, 5, 6, 7, 8, 9])
    _eq(mask, [1, 1, 1, 0, 0, 0])


def test_text_history_show_text_and_tokens_with_rich(tokenizer, capsys):
    pytest.importorskip("rich")
    history = TextHistory("Hello there!", tokenizer("Hello there!").input_ids)
    history.append_segment(" General Kenobi!", tokenizer(" General Kenobi!").input_ids, system=False)
    history.reward = 1.5
    history.show_text(show_legend=True)
    history.show_tokens(tokenizer)
    out = capsys.readouterr().out
    assert "Hello there! General Kenobi!" in out and "Reward: 1.5" in out and "Colour Legend" in out
    assert "Kenobi" in out.split("Legend")[-1]  # the tokens


# -- TextEnvironment -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from rljax.data import train_tokenizer

    tok = train_tokenizer(TEXTS, vocab_size=340, bos_token=None)
    tok.pad_token = tok.eos_token  # as TRL's test
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    from rljax.models import GPT2Config, GPT2LMHeadModel, init_params
    from rljax.models.auto import AutoModelForCausalLMWithValueHead

    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    module = GPT2LMHeadModel(cfg)
    return AutoModelForCausalLMWithValueHead.from_lm(module, init_params(module, jax.random.PRNGKey(0)))


def _env(model, tokenizer, **kw):
    kw.setdefault("tools", [DummyTool()])
    kw.setdefault("reward_fn", lambda x: 1)
    return TextEnvironment(model, tokenizer, prompt="I am a prompt!\n", **kw)


def test_text_environment_setup(model, tokenizer):
    env = _env(model, tokenizer)
    assert env.prompt == "I am a prompt!\n"
    assert list(env.tools.keys()) == ["DummyTool"]
    assert isinstance(env.tools["DummyTool"], DummyTool)
    assert env.reward_fn("Hello there!") == 1


def test_text_environment_generate(model, tokenizer):
    generation_kwargs = {"do_sample": False, "max_new_tokens": 4, "pad_token_id": tokenizer.eos_token_id}
    env = _env(model, tokenizer, generation_kwargs=generation_kwargs)
    input_texts = ["this is a test", "this is another, longer test"]
    model_inputs = [np.asarray(tokenizer(t).input_ids) for t in input_texts]
    batched = tokenizer.batch_decode(env._generate_batched(model_inputs, batch_size=2))
    single = tokenizer.batch_decode([env._generate_batched([x], batch_size=1)[0] for x in model_inputs])
    assert single == batched
    assert all(len(tokenizer(t).input_ids) == 4 for t in batched)


def test_text_environment_tool_call_parsing(model, tokenizer):
    env = _env(model, tokenizer)
    assert env.parse_tool_call("Something something <request><Tool1>Hello there!<call>") == ("Tool1", "Hello there!")
    for invalid in ("Something something <Tool1>Hello there!<call>",  # no <request>
                    "Something something <request><Tool1>Hello there!",  # no <call>
                    "Something something <request>|Tool2|Hello there!<call>",  # no <tool>
                    "<>abcdefghijklm<>nopqrstuvwxyz<>"):
        assert env.parse_tool_call(invalid) == (None, None)


def test_text_environment_tool_truncation(model, tokenizer):
    env = _env(model, tokenizer, tools={"dummy": lambda x: "a" * 1000})
    for limit, expected in ((100, 100), (500, 500), (1001, 1000), (2000, 1000)):
        env.max_tool_response = limit
        history = env.step(TextHistory("<request><dummy>Hello there!<call>", np.array([1, 2, 3])))
        assert len(history.last_text_segment) - len(env.response_token) == expected


def test_text_environment_tool_errors_and_unknown_tools_are_answers(model, tokenizer):
    def broken(query):
        raise RuntimeError("boom")

    env = _env(model, tokenizer, tools={"broken": broken})
    assert env.step(TextHistory("<request><broken>x<call>", [1])).last_text_segment == "Tool error: boom<response>"
    assert env.step(TextHistory("<request><nope>x<call>", [1])).last_text_segment == "Unknown tool nope.<response>"


@patch.object(TextEnvironment, "generate", side_effect=dummy_generate)
def test_text_environment_max_calls(mock_generate, model, tokenizer):
    env = _env(model, tokenizer, tools={"DummyTool": DummyTool()}, reward_fn=lambda x: [1 for _ in x])
    for turns in (1, 2, 4):
        env.max_turns = turns
        _, _, _, _, histories = env.run(["test"])
        assert histories[0].text == "I am a prompt!\n" + "test" + turns * "<request><DummyTool>test<call>test<response>"


def test_text_environment_compute_rewards(model, tokenizer):
    env = _env(model, tokenizer, tools={"DummyTool": DummyTool()}, reward_fn=lambda x: [i for i, _ in enumerate(x)])
    histories = [TextHistory("<request><DummyTool>test<call>", np.array([1, 2, 3])) for _ in range(8)]
    histories = env.compute_reward(histories)
    for i in range(8):
        assert histories[i].reward == i


@patch.object(TextEnvironment, "generate", side_effect=dummy_generate)
def test_text_environment_run(mock_generate, model, tokenizer):
    env = _env(model, tokenizer, tools={"DummyTool": DummyTool()}, reward_fn=lambda x: [i for i, _ in enumerate(x)],
               max_turns=2)
    task_1, task_2 = "Hello there!", "Hello there! General Kenobi!"
    query, response, response_mask, reward, histories = env.run([task_1, task_2])
    assert len(query[0]) == 9
    assert len(query[1]) == 12
    assert len(response[0]) == 14
    assert len(response[1]) == 14
    assert response_mask[0].sum() == 2 * 3  # mocked generate always adds 3 tokens
    assert response_mask[1].sum() == 2 * 3
    assert reward[0] == 0
    assert reward[1] == 1
    assert histories[0].text == "I am a prompt!\n" + task_1 + 2 * "<request><DummyTool>test<call>test<response>"
    assert histories[1].text == "I am a prompt!\n" + task_2 + 2 * "<request><DummyTool>test<call>test<response>"


def test_max_length_truncates_and_eos_or_submit_end_the_episode(model, tokenizer):
    env = _env(model, tokenizer, max_length=5)
    history = TextHistory("a b c d e f", np.arange(6))
    assert env.task_end_check(history) == (True, True)
    env.max_length = None
    history.append_segment("Result=4<submit>", [7], system=False)
    assert env.task_end_check(history) == (False, True)
    assert env.task_end_check(TextHistory("x" + tokenizer.eos_token, [1])) == (False, True)
    assert env.task_end_check(TextHistory("<request><T>1<call>", [1])) == (False, False)


def test_host_cut_at_the_first_stop_string(model, tokenizer):
    env = _env(model, tokenizer)
    ids = np.asarray(tokenizer("test<call>test<response> longer").input_ids, np.int32)
    assert tokenizer.decode(env._cut_at_stop(ids).tolist()) == "test<call>"
    ids = np.asarray(tokenizer("no stop here").input_ids, np.int32)
    _eq(env._cut_at_stop(ids), ids)


# -- stop sequences inside the jitted sampler ----------------------------------------------------


def test_generate_stops_rows_on_token_id_sequences_inside_the_loop(model):
    from rljax.generation import generate, make_generate_fn

    module, params = model
    ids = jnp.array([[5, 6, 7], [8, 9, 10]])
    mask = jnp.ones_like(ids)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    free = np.asarray(generate(module, params, ids, mask, jax.random.PRNGKey(1), **kw).sequences[:, 3:])
    stop = tuple(int(x) for x in free[0, 2:4])  # row 0's 3rd and 4th greedy tokens
    out = generate(module, params, ids, mask, jax.random.PRNGKey(1), stop_sequences=[stop, (99999,)], **kw)
    got, rmask = np.asarray(out.sequences[:, 3:]), np.asarray(out.response_mask)
    for row in range(2):
        hits = [t for t in range(1, 12) if tuple(free[row, t - 1 : t + 1]) == stop]
        end = hits[0] + 1 if hits else 12
        _eq(got[row, :end], free[row, :end])  # identical up to and including the stop sequence
        assert (got[row, end:] == 0).all() and rmask[row].sum() == end
    assert rmask[0].sum() == 4
    # one while_loop, no host callback per token
    fn = make_generate_fn(module, stop_sequences=[stop], jit=False, **kw)
    jaxpr = str(jax.make_jaxpr(fn)(params, ids, mask, jax.random.PRNGKey(1)))
    assert "while" in jaxpr and "callback" not in jaxpr


def test_stop_sequences_for_and_bad_settings(tokenizer):
    from rljax.generation import make_generate_fn, stop_sequences_for

    seqs = stop_sequences_for(tokenizer, ["<call>"])
    assert tuple(tokenizer.encode("<call>")) in seqs
    assert all(tokenizer.decode(list(s)).endswith("<call>") for s in seqs)
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<submit>"])  # one added token: one id whatever precedes it
    assert stop_sequences_for(tok, ["<submit>"])[0] == (tok.convert_tokens_to_ids("<submit>"),)
    with pytest.raises(ValueError, match="pad_token_id"):
        make_generate_fn(object(), max_new_tokens=4, stop_sequences=[(1, 2)])
    with pytest.raises(ValueError, match="empty"):
        stop_sequences_for(tokenizer, [""])
