import pytest
import torch

from tcopilot.data.arithmetic import generate_arithmetic
from tcopilot.data.prompts import (
    IGNORE_INDEX,
    TaskDataset,
    collate,
    encode_example,
    encode_prompts,
    format_completion,
    format_prompt,
)
from tcopilot.data.tokenizer import WordTokenizer

EXAMPLES = generate_arithmetic(40, "train", seed=0)
ALPACA_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n"
)


@pytest.fixture(scope="module")
def tok():
    texts = [format_prompt(x, s) + format_completion(x, s) for x in EXAMPLES for s in ("short", "alpaca")]
    return WordTokenizer.build(texts)


def test_format_prompt():
    ex = {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5. The answer is 5."}
    assert format_prompt(ex) == "Q: What is 2 + 3? A:"
    assert format_prompt(ex, "alpaca") == ALPACA_HEAD + "What is 2 + 3?\n\n### Response:\n"
    with_input = format_prompt({**ex, "input": "Be brief."}, "alpaca")
    assert "paired with an input" in with_input and "### Input:\nBe brief.\n\n### Response:\n" in with_input
    assert format_prompt({**ex, "input": "Be brief."}) == "Q: What is 2 + 3? Be brief. A:"
    assert format_completion(ex) == " 2 + 3 = 5. The answer is 5."
    assert format_completion(ex, "alpaca") == "2 + 3 = 5. The answer is 5."
    with pytest.raises(ValueError, match="style"):
        format_prompt(ex, "chat")


@pytest.mark.parametrize("style", ["short", "alpaca"])
def test_labels_mask_exactly_the_prompt(tok, style):
    ex = EXAMPLES[0]
    prompt = tok.encode(format_prompt(ex, style), add_bos=True)
    enc = encode_example(tok, ex, max_length=None, style=style)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) :] == ids[len(prompt) :]
    assert IGNORE_INDEX not in labels[len(prompt) :]
    # Decoding the counted tokens gives the target text back.
    target = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert target == ex["output"]
    assert tok.decode(ids) == format_prompt(ex, style) + format_completion(ex, style)


def test_train_on_inputs_and_truncation(tok):
    ex = EXAMPLES[1]
    full = encode_example(tok, ex, train_on_inputs=True)
    assert full["labels"][0] == IGNORE_INDEX and full["labels"][1:] == full["input_ids"][1:]
    cut = encode_example(tok, ex, max_length=10)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 10
    assert tok.eos_token_id not in cut["input_ids"] and set(cut["labels"]) == {IGNORE_INDEX}
    with pytest.raises(ValueError, match="max_length"):
        encode_example(tok, ex, max_length=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_padding(side):
    batch = [
        {"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]},
        {"input_ids": [1, 8], "labels": [-100, 8]},
    ]
    out = collate(batch, pad_token_id=0, padding_side=side)
    assert all(t.dtype == torch.long for t in out.values())
    assert out["input_ids"].shape == out["attention_mask"].shape == out["labels"].shape == (2, 4)
    if side == "right":
        assert out["input_ids"][1].tolist() == [1, 8, 0, 0]
        assert out["attention_mask"][1].tolist() == [1, 1, 0, 0]
        assert out["labels"][1].tolist() == [-100, 8, -100, -100]
    else:
        assert out["input_ids"][1].tolist() == [0, 0, 1, 8]
        assert out["attention_mask"][1].tolist() == [0, 0, 1, 1]
        assert out["labels"][1].tolist() == [-100, -100, -100, 8]
    assert out["input_ids"][0].tolist() == [1, 5, 6, 7] and out["attention_mask"][0].all()
    assert collate(batch, 0, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="padding_side"):
        collate(batch, 0, padding_side="middle")
    with pytest.raises(ValueError, match="labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], 0)


def test_encode_prompts_left_padded(tok):
    ids, mask = encode_prompts(tok, EXAMPLES[:3])
    assert ids.shape == mask.shape and ids.shape[0] == 3
    for row, ex in enumerate(EXAMPLES[:3]):
        n = int(mask[row].sum())
        assert ids[row, -n:].tolist() == tok.encode(format_prompt(ex), add_bos=True)
        assert (ids[row, :-n] == tok.pad_token_id).all() and mask[row, -n:].all()
    right, _ = encode_prompts(tok, EXAMPLES[:3], padding_side="right")
    assert right[:, 0].tolist() == [tok.bos_token_id] * 3
    short, _ = encode_prompts(tok, EXAMPLES[:1], max_length=5)
    assert tok.decode(short[0]).endswith("? A:")


def test_task_dataset(tok):
    ds = TaskDataset(EXAMPLES[:8], tok, max_length=96)
    assert len(ds) == 8 and ds[0] == encode_example(tok, EXAMPLES[0], 96)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 4
    counted = (batch["labels"] != IGNORE_INDEX).sum().item()
    assert counted == sum(sum(lab != IGNORE_INDEX for lab in ds[i]["labels"]) for i in range(4))
    assert ds.n_counted_tokens > counted
