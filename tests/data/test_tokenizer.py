import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcopilot.data.arithmetic import arithmetic_splits
from tcopilot.data.prompts import format_completion, format_prompt
from tcopilot.data.tokenizer import SPACE, HFTokenizer, WordTokenizer

CORPUS = [
    "Tom has 105 apples. He buys 7 more apples.",
    "How many apples does Tom have now?\n\n### Response:\n105 + 7 = 112. The answer is 112.",
    "x = -3.5, (it's) $1,023.65!",
    "Q: 105 and 7? A: 112",
]


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer.build(CORPUS)


def test_special_ids(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert len(tok) == tok.vocab_size == len(set(tok.tokens))


def test_numbers_are_single_digits_with_continuations(tok):
    assert tok.convert_ids_to_tokens(tok.encode("105 and 7")) == [
        SPACE + "1",
        "0",
        "5",
        SPACE + "and",
        SPACE + "7",
    ]
    assert tok.convert_ids_to_tokens(tok.encode("12.")) == [SPACE + "1", "2", "."]
    # Digits are always in the vocabulary, even unseen ones, so any number can be written.
    assert tok.unk_token_id not in tok.encode("9876543210")


@pytest.mark.parametrize(
    "text", CORPUS + ["105", "7", "0", "Tom has 7 apples.", "  Tom   has\t105 \n apples  "]
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == WordTokenizer.normalize(text)


def test_normalize():
    assert WordTokenizer.normalize("  a \t b \n\n  c  ") == "a b\n\nc"
    assert WordTokenizer.normalize("a\r\nb") == "a\nb"


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab7 9.,'\n\t-") + ["▁", "é", "x"]), max_size=40))
def test_round_trip_property(text):
    tok = WordTokenizer.build([text])
    assert tok.decode(tok.encode(text)) == WordTokenizer.normalize(text)


def test_bos_eos_unk_and_skip_special(tok):
    ids = tok.encode("Tom has 7 zebras", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id in ids
    assert tok.decode(ids) == "Tom has 7"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos> Tom has 7 <unk> <eos>"
    assert tok.decode([tok.pad_token_id] * 3) == ""
    with pytest.raises(ValueError, match="token id"):
        tok.decode([len(tok)])


def test_continuation_decodes_without_leading_space(tok):
    prompt = tok.encode("Q: Tom has 7 apples. A:")
    answer = tok.encode(" 105 + 7 = 112.")
    assert tok.decode(answer) == "105 + 7 = 112."
    assert tok.decode(prompt + answer) == "Q: Tom has 7 apples. A: 105 + 7 = 112."


def test_min_freq_and_deterministic_ids():
    texts = ["a b b c c c", "c"]
    assert WordTokenizer.build(texts).tokens == WordTokenizer.build(list(texts)).tokens
    full = WordTokenizer.build(texts)
    assert full.tokens[24:] == [SPACE + "c", SPACE + "b", SPACE + "a"]
    assert SPACE + "a" not in WordTokenizer.build(texts, min_freq=2).tokens
    with pytest.raises(ValueError, match="min_freq"):
        WordTokenizer.build(texts, min_freq=0)


def test_save_load(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = WordTokenizer.load(path)
    assert loaded.tokens == tok.tokens
    assert loaded.encode(CORPUS[1]) == tok.encode(CORPUS[1])
    (tmp_path / "bad.json").write_text('{"tokens": []}')
    with pytest.raises(ValueError, match="WordTokenizer"):
        WordTokenizer.load(tmp_path / "bad.json")


def test_default_task_vocabulary_is_small():
    train, test = arithmetic_splits(2000, 100, seed=0)
    for style in ("short", "alpaca"):
        tok = WordTokenizer.build(format_prompt(x, style) + format_completion(x, style) for x in train)
        assert len(tok) < 160
        for x in test[:100]:
            text = format_prompt(x, style) + format_completion(x, style)
            ids = tok.encode(text)
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text


def _tiny_hf_tokenizer(with_pad):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<unk>", "<p>", "Tom", "has", "7", "apples", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"pad_token": "<p>"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra
    )


def test_hf_adapter():
    hf = HFTokenizer(_tiny_hf_tokenizer(with_pad=False))
    assert hf.pad_token_id == hf.eos_token_id == 1 and hf.bos_token_id == 0
    assert hf.vocab_size == len(hf) == 9
    assert hf.encode("Tom has 7 apples", add_bos=True, add_eos=True) == [0, 4, 5, 6, 7, 1]
    assert hf.encode("Tom has") == [4, 5]
    assert hf.decode([0, 4, 5, 1]) == "Tom has"
    assert HFTokenizer(_tiny_hf_tokenizer(with_pad=True)).pad_token_id == 3
