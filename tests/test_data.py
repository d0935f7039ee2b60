"""rljax.data: padding, SFT tokenization/packing, collators, DPO rows, batch iteration.

The session tokenizer (tests/conftest.py) has pad=0, eos=1, bos=2 and, with a
128 vocab below the 256-byte alphabet, learns no merges: every character of
these ASCII texts is one token, which keeps expected values hand-checkable.
"""
import copy
import warnings

import numpy as np
import pytest

from rljax.data import (
    BatchIterator,
    ConstantLengthDataset,
    DataCollatorForCompletionOnlyLM,
    DataCollatorForLanguageModeling,
    DPODataCollatorWithPadding,
    RewardDataCollatorWithPadding,
    bucket_length,
    collate_lm,
    concatenated_inputs,
    dpo_tokenize_row,
    ensure_pad_token,
    get_formatting_func_from_dataset,
    iter_packed_sequences,
    pack_sequences,
    pad_sequences,
    tokenize_preference_dataset,
    tokenize_sft_dataset,
    train_tokenizer,
    truncate_sequences,
)

PAD, EOS, BOS = 0, 1, 2


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tok_no_bos():
    from conftest import CORPUS

    return train_tokenizer(CORPUS * 4, vocab_size=128, bos_token=None)


@pytest.fixture(scope="module")
def merging_tokenizer():
    """A tokenizer with merges: 'hel' and 'hello' are single (different) tokens."""
    return train_tokenizer(["hello world"] * 20 + ["help me"] * 5, vocab_size=300)


def test_train_tokenizer_roundtrip(tiny_tokenizer):
    text = "the movie was great"
    ids_ = tiny_tokenizer(text).input_ids
    assert tiny_tokenizer.decode(ids_) == text
    assert tiny_tokenizer.pad_token_id == 0 and tiny_tokenizer.eos_token_id == 1


def test_tokenizer_is_one_token_per_char(tiny_tokenizer):
    assert len(ids(tiny_tokenizer, "abc def")) == 7


# --------------------------------------------------------------------------- padding


def test_bucket_length_rounds_up_and_caps():
    assert bucket_length(5, 8) == 8
    assert bucket_length(8, 8) == 8
    assert bucket_length(9, 8) == 16
    assert bucket_length(0, 8) == 8  # never a zero-width batch
    assert bucket_length(9, 8, max_length=12) == 12
    assert bucket_length(3, 64, max_length=10) == 10
    assert bucket_length(13, 8, max_length=12) == 16  # too long: not cut, own bucket
    assert {bucket_length(n, 64) for n in range(1, 129)} == {64, 128}


def test_pad_sequences_right_left_and_lengths():
    seqs = [[5, 6, 7], [8]]
    right = pad_sequences(seqs, 0)
    np.testing.assert_array_equal(right, [[5, 6, 7], [8, 0, 0]])
    assert right.dtype == np.int32
    left = pad_sequences(seqs, -1, side="left", length=5)
    np.testing.assert_array_equal(left, [[-1, -1, 5, 6, 7], [-1, -1, -1, -1, 8]])
    assert pad_sequences(seqs, 0, pad_to_multiple_of=4).shape == (2, 4)
    assert pad_sequences([[], [1]], 9).tolist() == [[9], [1]]
    with pytest.raises(ValueError, match="more than the requested length"):
        pad_sequences(seqs, 0, length=2)
    with pytest.raises(ValueError, match="side"):
        pad_sequences(seqs, 0, side="middle")


def test_ensure_pad_token(tiny_tokenizer):
    assert ensure_pad_token(tiny_tokenizer) == PAD
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    with pytest.raises(ValueError, match=r"tokenizer\.pad_token = tokenizer\.eos_token"):
        ensure_pad_token(tok)
    assert ensure_pad_token(tok, set_to_eos=True) == EOS  # what SFTTrainer does to a tokenizer it loads
    assert tok.pad_token_id == EOS


def test_truncate_sequences_on_sequence_axis():
    seqs = [[1, 2, 3, 4], [5, 6]]
    assert truncate_sequences(seqs, 3, "keep_start") == [[1, 2, 3], [5, 6]]
    assert truncate_sequences(seqs, 3, "keep_end") == [[2, 3, 4], [5, 6]]
    with pytest.raises(ValueError, match="truncation mode"):
        truncate_sequences(seqs, 3, "middle")


# --------------------------------------------------------------------------- SFT


def test_tokenize_sft_dataset_field_truncates_without_padding(tiny_tokenizer):
    from datasets import Dataset

    ds = Dataset.from_dict({"text": ["abcdef", "ab"], "other": [1, 2]})
    out = tokenize_sft_dataset(ds, tiny_tokenizer, dataset_text_field="text", max_seq_length=4)
    assert out.column_names == ["input_ids", "attention_mask"]
    assert out["input_ids"] == [ids(tiny_tokenizer, "abcd"), ids(tiny_tokenizer, "ab")]
    assert out["attention_mask"] == [[1, 1, 1, 1], [1, 1]]
    kept = tokenize_sft_dataset(
        ds, tiny_tokenizer, dataset_text_field="text", max_seq_length=4, remove_unused_columns=False
    )
    assert kept["other"] == [1, 2]


def test_tokenize_sft_dataset_formatting_func(tiny_tokenizer):
    rows = [{"q": "a", "a": "b"}, {"q": "c", "a": "d"}]

    def fmt(batch):
        return [f"{q}:{a}" for q, a in zip(batch["q"], batch["a"])]

    out = tokenize_sft_dataset(rows, tiny_tokenizer, formatting_func=fmt, max_seq_length=16)
    assert out["input_ids"] == [ids(tiny_tokenizer, "a:b"), ids(tiny_tokenizer, "c:d")]
    with pytest.raises(ValueError, match="should return a list"):
        tokenize_sft_dataset(rows, tiny_tokenizer, formatting_func=lambda b: "x", max_seq_length=16)


def test_tokenize_sft_dataset_errors_name_the_fix(tiny_tokenizer):
    rows = [{"text": "a"}]
    with pytest.raises(ValueError, match="dataset_text_field.*formatting_func"):
        tokenize_sft_dataset(rows, tiny_tokenizer, max_seq_length=8)
    with pytest.raises(ValueError, match="'content'"):
        tokenize_sft_dataset(rows, tiny_tokenizer, dataset_text_field="content", max_seq_length=8)


def test_pack_sequences_exact_chunks_eos_between_docs(tiny_tokenizer):
    t = tiny_tokenizer
    texts = ["ab", "cde", "f"]
    out = pack_sequences(texts, t, 4, shuffle=False)
    stream = ids(t, "ab") + [EOS] + ids(t, "cde") + [EOS] + ids(t, "f") + [EOS]  # 9 tokens
    assert out["input_ids"].shape == (2, 4) and out["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(out["input_ids"], [stream[0:4], stream[4:8]])  # tail [f's eos] dropped
    np.testing.assert_array_equal(out["labels"], out["input_ids"])
    assert set(out) == {"input_ids", "labels"}  # no attention mask, as TRL


def test_pack_sequences_drops_tail_of_every_buffer(tiny_tokenizer):
    t = tiny_tokenizer
    # buffer = 4 chars: ["ab", "cde"] (7 tokens -> 1 chunk, 3 dropped), then ["f"] (2 tokens -> none)
    out = pack_sequences(["ab", "cde", "f"], t, 4, num_of_sequences=1, chars_per_token=1.0, shuffle=False)
    np.testing.assert_array_equal(out["input_ids"], [ids(t, "ab") + [EOS] + ids(t, "c")])
    no_eos = pack_sequences(["ab", "cde", "f"], t, 3, append_concat_token=False, shuffle=False)
    np.testing.assert_array_equal(no_eos["input_ids"], [ids(t, "abc"), ids(t, "def")])


def test_pack_sequences_shuffle_is_seeded_permutation(tiny_tokenizer):
    texts = [f"text number {i}" for i in range(20)]
    plain = pack_sequences(texts, tiny_tokenizer, 8, shuffle=False)["input_ids"]
    a = pack_sequences(texts, tiny_tokenizer, 8, seed=3)["input_ids"]
    b = pack_sequences(texts, tiny_tokenizer, 8, seed=3)["input_ids"]
    c = pack_sequences(texts, tiny_tokenizer, 8, seed=4)["input_ids"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, plain.tolist()))


def test_pack_sequences_dataset_field_and_func(tiny_tokenizer):
    from datasets import Dataset

    ds = Dataset.from_dict({"text": ["ab", "cd"], "q": ["x", "y"]})
    by_field = pack_sequences(ds, tiny_tokenizer, 3, dataset_text_field="text", shuffle=False)
    expected = [ids(tiny_tokenizer, "ab") + [EOS], ids(tiny_tokenizer, "cd") + [EOS]]
    np.testing.assert_array_equal(by_field["input_ids"], expected)
    by_func = pack_sequences(ds, tiny_tokenizer, 2, formatting_func=lambda ex: ex["q"], shuffle=False)
    expected = [ids(tiny_tokenizer, "x") + [EOS], ids(tiny_tokenizer, "y") + [EOS]]
    np.testing.assert_array_equal(by_func["input_ids"], expected)
    # too little text: an empty result (TRL's ConstantLengthDataset is an empty iterable)
    empty = pack_sequences(["a"], tiny_tokenizer, 64)
    assert empty["input_ids"].shape == (0, 64) and empty["labels"].shape == (0, 64)
    with pytest.raises(ValueError, match="dataset_text_field"):
        pack_sequences(ds, tiny_tokenizer, 2)


def test_constant_length_dataset_matches_pack_sequences(tiny_tokenizer):
    texts = [{"t": f"text number {i}"} for i in range(20)]
    cld = ConstantLengthDataset(tiny_tokenizer, texts, dataset_text_field="t", seq_length=8, shuffle=False)
    assert len(cld) == 20 and not cld.infinite  # TRL: len is the text dataset's
    rows = list(cld)
    packed = pack_sequences(texts, tiny_tokenizer, 8, dataset_text_field="t", shuffle=False)
    np.testing.assert_array_equal(np.stack([r["input_ids"] for r in rows]), packed["input_ids"])
    assert all(set(r) == {"input_ids", "labels"} for r in rows)
    cld.infinite = True
    it = iter(cld)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len([next(it) for _ in range(3 * len(rows))]) == 3 * len(rows)  # endless


def test_formatting_func_from_chat_and_instruction_datasets(tiny_tokenizer):
    from datasets import Dataset

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    chat = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]})
    func = get_formatting_func_from_dataset(chat, tok)
    assert func(chat[:1]) == ["<user>hi<assistant>yo"] and func(chat[0]) == "<user>hi<assistant>yo"
    inst = Dataset.from_list([{"prompt": "2+2?", "completion": "4"}])
    assert get_formatting_func_from_dataset(inst, tok)(inst[:1]) == ["<user>2+2?<assistant>4"]
    assert get_formatting_func_from_dataset([{"prompt": "a", "completion": "b"}], tok) is not None
    assert get_formatting_func_from_dataset(Dataset.from_dict({"text": ["x"]}), tok) is None
    with pytest.raises(ValueError, match="chat_template"):
        get_formatting_func_from_dataset(chat, tiny_tokenizer)


class _ZeroEosTokenizer:
    """Minimal tokenizer stub: one token per character (ord), eos id as given."""

    def __init__(self, eos_token_id):
        self.eos_token_id = eos_token_id

    def __call__(self, texts, **kw):
        return {"input_ids": [[ord(c) for c in s] for s in texts]}


def test_pack_sequences_eos_zero_falls_back_quirk():
    # TRL: `tokenizer.eos_token_id if tokenizer.eos_token_id else eos_token_id`
    out = pack_sequences(["ab"], _ZeroEosTokenizer(0), 3, eos_token_id=7, shuffle=False)
    assert out["input_ids"].tolist() == [[97, 98, 7]]
    with pytest.warns(UserWarning, match="no EOS token"):
        out = pack_sequences(["ab"], _ZeroEosTokenizer(None), 3, shuffle=False)
    assert out["input_ids"].tolist() == [[97, 98, 0]]  # TRL's class default 0


def test_iter_packed_sequences_infinite_restarts(tiny_tokenizer):
    it = iter_packed_sequences(
        ["abc"], tiny_tokenizer, 4, infinite=True, shuffle=False, num_of_sequences=1, chars_per_token=1
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = [next(it)["input_ids"].tolist() for _ in range(3)]
    assert first == [ids(tiny_tokenizer, "abc") + [EOS]] * 3


# --------------------------------------------------------------------------- LM collators


def test_collate_lm_labels_and_static_shape():
    batch = collate_lm([[5, 6, 7], {"input_ids": [8, 9]}], pad_token_id=0, pad_to_multiple_of=8)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, 8) for k in ("input_ids", "attention_mask", "labels")}
    np.testing.assert_array_equal(batch["input_ids"][1], [8, 9, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["attention_mask"][0], [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["labels"][0], [5, 6, 7] + [-100] * 5)
    assert collate_lm([[5] * 70], 0)["input_ids"].shape == (1, 128)  # default bucket 64
    assert collate_lm([[5] * 70], 0, max_length=100)["input_ids"].shape == (1, 100)


def test_collate_lm_pad_equals_eos_masks_eos_and_keep_labels():
    # HF semantics: every token equal to pad_token_id becomes -100, real eos included
    b = collate_lm([[5, 1, 6]], pad_token_id=1, pad_to_multiple_of=4)
    np.testing.assert_array_equal(b["labels"], [[5, -100, 6, -100]])
    kept = collate_lm([{"input_ids": [5, 6], "labels": [-100, 6]}], 0, pad_to_multiple_of=4, keep_labels=True)
    np.testing.assert_array_equal(kept["labels"], [[-100, 6, -100, -100]])


def test_lm_collators_follow_padding_side_and_need_pad_only_to_pad(tiny_tokenizer):
    left = copy.deepcopy(tiny_tokenizer)
    left.padding_side = "left"
    b = DataCollatorForLanguageModeling(left, pad_to_multiple_of=4)([[5, 6, 7], {"input_ids": [8, 9]}])
    np.testing.assert_array_equal(b["input_ids"], [[PAD, 5, 6, 7], [PAD, PAD, 8, 9]])
    np.testing.assert_array_equal(b["attention_mask"], [[0, 1, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(b["labels"], [[-100, 5, 6, 7], [-100, -100, 8, 9]])
    no_pad = copy.deepcopy(tiny_tokenizer)
    no_pad.pad_token = None
    coll = DataCollatorForLanguageModeling(no_pad, pad_to_multiple_of=4)
    same = coll([[5, 6, 7], [8, 9, 10]])  # equal lengths: no padding in TRL's sense, no pad token needed
    np.testing.assert_array_equal(same["labels"], [[5, 6, 7, -100], [8, 9, 10, -100]])
    np.testing.assert_array_equal(same["attention_mask"][:, 3], [0, 0])
    with pytest.raises(ValueError, match="Asking to pad but the tokenizer does not have a padding token"):
        coll([[5, 6, 7], [8]])
    completion = DataCollatorForCompletionOnlyLM([6], tokenizer=no_pad, pad_to_multiple_of=4)
    np.testing.assert_array_equal(completion([[5, 6, 7]])["labels"], [[-100, -100, 7, -100]])
    with pytest.raises(ValueError, match="padding token"):
        completion([[5, 6, 7], [6, 8]])
    with pytest.raises(ValueError, match="mlm"):
        DataCollatorForLanguageModeling(tiny_tokenizer, mlm=True)


def test_completion_only_takes_tokenizer_positionally_and_torch_call(tiny_tokenizer):
    coll = DataCollatorForCompletionOnlyLM([50, 51], None, tiny_tokenizer, ignore_index=-1, pad_to_multiple_of=8)
    out = coll.torch_call([[10, 50, 51, 30]])
    np.testing.assert_array_equal(out["labels"][0], [-1, -1, -1, 30] + [-100] * 4)  # pads keep -100, as TRL


def test_completion_only_single_turn_masks_through_last_template(tiny_tokenizer):
    coll = DataCollatorForCompletionOnlyLM([50, 51], tokenizer=tiny_tokenizer, pad_to_multiple_of=8)
    batch = coll([[10, 50, 51, 20, 50, 51, 30, 31], [50, 51, 40]])
    assert batch["labels"].shape == (2, 8)
    np.testing.assert_array_equal(batch["labels"][0], [-100] * 6 + [30, 31])
    np.testing.assert_array_equal(batch["labels"][1], [-100, -100, 40] + [-100] * 5)
    np.testing.assert_array_equal(batch["input_ids"][1], [50, 51, 40, 0, 0, 0, 0, 0])


def test_completion_only_string_template(tiny_tokenizer):
    t = tiny_tokenizer
    coll = DataCollatorForCompletionOnlyLM("### Assistant:", tokenizer=t)
    ex = t("### Human: hello ### Assistant: hi")
    labels = coll([{"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]}])["labels"][0]
    assert t.decode([x for x in labels if x != -100]) == " hi"


def test_completion_only_multi_turn(tiny_tokenizer):
    coll = DataCollatorForCompletionOnlyLM([50, 51], [60, 61], tokenizer=tiny_tokenizer, pad_to_multiple_of=16)
    two_turns = [60, 61, 10, 11, 50, 51, 20, 21, 60, 61, 12, 50, 51, 22, 1]
    trailing_human = [60, 61, 10, 50, 51, 20, 60, 61, 11]
    response_first = [50, 51, 20, 60, 61, 10, 50, 51, 21]
    labels = coll([two_turns, trailing_human, response_first])["labels"]
    I = -100
    np.testing.assert_array_equal(labels[0][:15], [I] * 6 + [20, 21] + [I] * 5 + [22, 1])
    np.testing.assert_array_equal(labels[1][:9], [I] * 5 + [20] + [I] * 3)
    np.testing.assert_array_equal(labels[2][:9], [I, I, 20, I, I, I, I, I, 21])
    assert (labels[:, 15:] == I).all()


def test_completion_only_template_not_found_warns_and_ignores_row(tiny_tokenizer):
    coll = DataCollatorForCompletionOnlyLM("### Assistant:", tokenizer=tiny_tokenizer, pad_to_multiple_of=8)
    found = tiny_tokenizer("### Assistant: ok")["input_ids"]
    with pytest.warns(UserWarning, match="Could not find response key `### Assistant:`"):
        labels = coll([ids(tiny_tokenizer, "no template here"), found])["labels"]
    assert (labels[0] == -100).all()
    assert (labels[1] != -100).sum() == 3  # " ok"
    multi = DataCollatorForCompletionOnlyLM([50], [60], tokenizer=tiny_tokenizer, pad_to_multiple_of=8)
    with pytest.warns(UserWarning, match="Could not find instruction key"):
        labels = multi([[10, 50, 20]])["labels"]
    assert (labels == -100).all()


# --------------------------------------------------------------------------- reward


def test_reward_collator_pads_and_margin(tiny_tokenizer):
    coll = RewardDataCollatorWithPadding(tiny_tokenizer, pad_to_multiple_of=4)
    feats = [
        {"input_ids_chosen": [5, 6, 7], "attention_mask_chosen": [1, 1, 1],
         "input_ids_rejected": [8], "attention_mask_rejected": [1], "margin": 0.5},
        {"input_ids_chosen": [9], "attention_mask_chosen": [1],
         "input_ids_rejected": [4, 4, 4, 4, 4], "attention_mask_rejected": [1] * 5, "margin": 1},
    ]
    b = coll(feats)
    assert b["input_ids_chosen"].shape == b["input_ids_rejected"].shape == (2, 8)
    np.testing.assert_array_equal(b["input_ids_chosen"][0], [5, 6, 7, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["attention_mask_rejected"][0], [1, 0, 0, 0, 0, 0, 0, 0])
    assert b["margin"].dtype == np.float32 and b["margin"].tolist() == [0.5, 1.0]
    assert "margin" not in coll([{k: v for k, v in feats[0].items() if k != "margin"}])
    left_tok = copy.deepcopy(tiny_tokenizer)
    left_tok.padding_side = "left"
    lb = RewardDataCollatorWithPadding(left_tok, pad_to_multiple_of=4)(feats)
    np.testing.assert_array_equal(lb["input_ids_chosen"][0], [0, 0, 0, 0, 0, 5, 6, 7])


def test_reward_collator_missing_keys_error(tiny_tokenizer):
    coll = RewardDataCollatorWithPadding(tiny_tokenizer)
    with pytest.raises(ValueError, match="missing: attention_mask_chosen, attention_mask_rejected"):
        coll([{"input_ids_chosen": [1], "input_ids_rejected": [2]}])


def test_tokenize_preference_dataset(tiny_tokenizer):
    rows = [{"prompt": "Q: ", "chosen": "good answer", "rejected": "bad", "margin": 2.0}]
    ds = tokenize_preference_dataset(rows, tiny_tokenizer, max_length=6)
    assert ds[0]["input_ids_chosen"] == ids(tiny_tokenizer, "Q: goo")
    assert ds[0]["input_ids_rejected"] == ids(tiny_tokenizer, "Q: bad")
    assert ds[0]["attention_mask_rejected"] == [1] * 6 and ds[0]["margin"] == 2.0
    b = RewardDataCollatorWithPadding(tiny_tokenizer, max_length=6)(list(ds))
    assert b["input_ids_chosen"].shape == (1, 6)
    with pytest.raises(ValueError, match="'rejected'"):
        tokenize_preference_dataset([{"chosen": "a"}], tiny_tokenizer)


# --------------------------------------------------------------------------- DPO


def test_dpo_tokenize_row_labels_bos_eos(tiny_tokenizer):
    t = tiny_tokenizer
    a, b, c, d, e = (ids(t, ch)[0] for ch in "abcde")
    row = dpo_tokenize_row({"prompt": "ab", "chosen": "cd", "rejected": "e"}, t)
    assert row["prompt_input_ids"] == [BOS, a, b] and row["prompt_attention_mask"] == [1, 1, 1]
    assert row["chosen_input_ids"] == [BOS, a, b, c, d, EOS]
    assert row["chosen_attention_mask"] == [1] * 6
    assert row["chosen_labels"] == [-100, -100, -100, c, d, EOS]
    assert row["rejected_input_ids"] == [BOS, a, b, e, EOS]
    assert row["rejected_labels"] == [-100, -100, -100, e, EOS]
    other = dpo_tokenize_row({"prompt": "ab", "chosen": "cd", "rejected": "e"}, t, label_pad_token_id=-1)
    assert other["chosen_labels"][:3] == [-1] * 3


def test_dpo_tokenize_row_bos_once_and_absent(tiny_tokenizer, tok_no_bos):
    row = dpo_tokenize_row({"prompt": "<s>ab", "chosen": "c", "rejected": "d"}, tiny_tokenizer)
    assert row["prompt_input_ids"][:2] == [BOS, ids(tiny_tokenizer, "a")[0]]
    assert row["chosen_input_ids"].count(BOS) == 1 and row["rejected_input_ids"].count(BOS) == 1
    row = dpo_tokenize_row({"prompt": "ab", "chosen": "c", "rejected": "d"}, tok_no_bos)
    assert row["prompt_input_ids"] == ids(tok_no_bos, "ab")
    assert row["chosen_input_ids"] == ids(tok_no_bos, "abc") + [tok_no_bos.eos_token_id]
    assert row["chosen_labels"] == [-100, -100] + ids(tok_no_bos, "c") + [tok_no_bos.eos_token_id]
    assert None not in row["chosen_input_ids"]


def test_dpo_tokenize_row_truncation_modes(tiny_tokenizer):
    t = tiny_tokenizer
    feat = {"prompt": "abcdef", "chosen": "gh", "rejected": "i"}  # prompt 1+6, answers 3 and 2
    P = [BOS] + ids(t, "abcdef")
    end = dpo_tokenize_row(feat, t, max_length=8, max_prompt_length=4, truncation_mode="keep_end")
    assert end["prompt_input_ids"] == P[-4:]
    assert end["chosen_input_ids"] == P[-4:] + ids(t, "gh") + [EOS]
    assert end["chosen_labels"] == [-100] * 4 + ids(t, "gh") + [EOS]
    start = dpo_tokenize_row(feat, t, max_length=8, max_prompt_length=4, truncation_mode="keep_start")
    assert start["prompt_input_ids"] == P[:4] and start["rejected_input_ids"] == P[:4] + ids(t, "i") + [EOS]
    # still too long after cutting the prompt: answers keep max_length - max_prompt_length tokens
    cut = dpo_tokenize_row(feat, t, max_length=6, max_prompt_length=4)
    assert cut["chosen_input_ids"] == P[-4:] + ids(t, "gh")  # eos cut off, as TRL
    assert cut["rejected_input_ids"] == P[-4:] + ids(t, "i") + [EOS]
    # fits: nothing truncated
    full = dpo_tokenize_row(feat, t, max_length=10, max_prompt_length=4)
    assert full["prompt_input_ids"] == P
    with pytest.raises(ValueError, match="truncation mode"):
        dpo_tokenize_row(feat, t, max_length=8, truncation_mode="middle")
    with pytest.raises(ValueError, match="prompt should be an str"):
        dpo_tokenize_row({"prompt": ["x"], "chosen": "a", "rejected": "b"}, t)


def test_dpo_tokenize_row_prompt_merge_reconciliation(merging_tokenizer):
    t = merging_tokenizer
    hello, hel = ids(t, "hello"), ids(t, "hel")
    assert len(hello) == 1 and len(hel) == 1 and hello != hel
    row = dpo_tokenize_row({"prompt": "hel", "chosen": "lo", "rejected": "x"}, t)
    # chosen: joint 'hello' swallowed the prompt token -> chosen prompt is empty
    assert row["chosen_input_ids"] == [BOS] + hello + [EOS]
    assert row["chosen_labels"] == [-100] + hello + [EOS]
    # rejected: 'helx' keeps the prompt token; standalone prompt cut to the shorter (0 tokens)
    assert row["rejected_input_ids"] == [BOS] + hel + ids(t, "x") + [EOS]
    assert row["rejected_labels"] == [-100, -100] + ids(t, "x") + [EOS]
    assert row["prompt_input_ids"] == [BOS]


def _dpo_rows(tok):
    return [
        dpo_tokenize_row({"prompt": "ab", "chosen": "cde", "rejected": "f"}, tok),
        dpo_tokenize_row({"prompt": "abcd", "chosen": "g", "rejected": "hi"}, tok),
    ]


def test_dpo_collator_left_pads_prompt_right_pads_answers(tiny_tokenizer):
    rows = _dpo_rows(tiny_tokenizer)
    rows[0]["reference_chosen_logps"], rows[1]["reference_chosen_logps"] = -1.5, -2.0
    rows[0]["prompt"], rows[1]["prompt"] = "ab", "abcd"
    b = DPODataCollatorWithPadding(pad_token_id=PAD, pad_to_multiple_of=8)(rows)
    assert b["prompt_input_ids"].shape == (2, 8)
    np.testing.assert_array_equal(b["prompt_input_ids"][0], [0] * 5 + rows[0]["prompt_input_ids"])
    np.testing.assert_array_equal(b["prompt_attention_mask"][0], [0] * 5 + [1, 1, 1])
    np.testing.assert_array_equal(b["chosen_input_ids"][1], rows[1]["chosen_input_ids"] + [0])
    np.testing.assert_array_equal(b["chosen_labels"][1], rows[1]["chosen_labels"] + [-100])
    np.testing.assert_array_equal(b["rejected_attention_mask"][0], [1] * 5 + [0] * 3)
    assert b["reference_chosen_logps"].dtype == np.float32 and b["prompt"] == ["ab", "abcd"]
    assert all(b[k].dtype == np.int32 for k in b if k.endswith(("_ids", "_mask", "_labels")))
    with pytest.raises(ValueError, match="pad_token"):
        DPODataCollatorWithPadding(pad_token_id=None)(rows)


def test_concatenated_inputs_stacks_chosen_then_rejected(tiny_tokenizer):
    rows = _dpo_rows(tiny_tokenizer)
    b = DPODataCollatorWithPadding(pad_token_id=PAD, pad_to_multiple_of=1)(rows)
    assert b["chosen_input_ids"].shape == (2, 7) and b["rejected_input_ids"].shape == (2, 8)
    cat = concatenated_inputs(b, padding_value=PAD, label_pad_token_id=-100)
    assert set(cat) == {"concatenated_input_ids", "concatenated_attention_mask", "concatenated_labels"}
    assert all(v.shape == (4, 8) for v in cat.values())
    np.testing.assert_array_equal(cat["concatenated_input_ids"][:2, :7], b["chosen_input_ids"])
    np.testing.assert_array_equal(cat["concatenated_input_ids"][:2, 7], [PAD, PAD])
    np.testing.assert_array_equal(cat["concatenated_labels"][:2, 7], [-100, -100])
    np.testing.assert_array_equal(cat["concatenated_attention_mask"][:2, 7], [0, 0])
    np.testing.assert_array_equal(cat["concatenated_labels"][2:], b["rejected_labels"])


# --------------------------------------------------------------------------- batch iteration


def test_batch_iterator_deterministic_epochs_and_drop_last():
    data = list(range(10))
    a = list(BatchIterator(data, 4, seed=1, num_epochs=2))
    b = list(BatchIterator(data, 4, seed=1, num_epochs=2))
    assert a == b and len(a) == 6 and [len(x) for x in a] == [4, 4, 2] * 2
    assert sorted(sum(a[:3], [])) == data and sorted(sum(a[3:], [])) == data
    assert a[:3] != a[3:]  # a new order each epoch
    assert list(BatchIterator(data, 4, seed=2, num_epochs=1)) != a[:3]
    dropped = list(BatchIterator(data, 4, seed=1, drop_last=True, num_epochs=1))
    assert [len(x) for x in dropped] == [4, 4]
    assert list(BatchIterator(data, 4, shuffle=False, num_epochs=1)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_batch_iterator_resumes_from_position():
    data = list(range(10))
    it = BatchIterator(data, 3, seed=5, drop_last=True)
    first = [next(it) for _ in range(4)]
    pos = it.position
    assert pos == 4 and it.epoch == 1
    cont = [next(it) for _ in range(5)]
    resumed = BatchIterator(data, 3, seed=5, drop_last=True, position=pos)
    assert [next(resumed) for _ in range(5)] == cont
    assert BatchIterator(data, 3, seed=5, drop_last=True).indices(0).tolist() == first[0]


def test_batch_iterator_dataset_with_collator(tiny_tokenizer):
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": [[5, 6], [7], [8, 9, 10]]})
    collate = lambda ex: collate_lm(ex, PAD, pad_to_multiple_of=4)  # noqa: E731
    it = BatchIterator(ds, 2, shuffle=False, num_epochs=1, collate_fn=collate)
    batches = list(it)
    assert [bt["input_ids"].shape for bt in batches] == [(2, 4), (1, 4)]
    np.testing.assert_array_equal(batches[0]["labels"], [[5, 6, -100, -100], [7, -100, -100, -100]])
    with pytest.raises(ValueError, match="no batch"):
        BatchIterator([1], 2, drop_last=True)
