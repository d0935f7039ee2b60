from rljax.data import train_tokenizer


def test_train_tokenizer_roundtrip(tiny_tokenizer):
    text = "the movie was great"
    ids = tiny_tokenizer(text).input_ids
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.pad_token_id == 0 and tiny_tokenizer.eos_token_id == 1
