"""Data: the stdlib corpus, byte tokens, LM batches, and padding-free packing."""

import pytest
import torch

from unsloth_fx import data
from unsloth_fx.data import DataEfficientLoader


# ------------------------------------------------------------------ corpus and LM batches


def test_stdlib_corpus_is_deterministic_real_python():
    full = data.stdlib_corpus()
    assert len(full) > 1_000_000
    assert full == data.stdlib_corpus()
    head = data.stdlib_corpus(max_bytes=10_000)
    assert len(head) == 10_000 and full.startswith(head)
    assert b"def " in head and b"import " in head
    assert data.stdlib_corpus(max_bytes=0) == b""


def test_byte_tokens_round_trip():
    t = data.byte_tokens("héllo\n")
    assert t.dtype == torch.long and t.tolist() == list("héllo\n".encode())
    assert bytes(t.tolist()).decode() == "héllo\n"
    assert int(data.byte_tokens(data.stdlib_corpus(4096)).max()) < 256
    with pytest.raises(TypeError, match="str or bytes"):
        data.byte_tokens([1, 2])


def test_train_val_split_partitions_blocks():
    tokens = torch.arange(10_000)
    train, val = data.train_val_split(tokens, val_fraction=0.2, seed=3, block_size=100)
    assert val.numel() == 2_000 and train.numel() == 8_000
    assert torch.equal(torch.sort(torch.cat([train, val])).values, tokens)
    assert torch.equal(val.view(-1, 100)[:, 1:] - val.view(-1, 100)[:, :-1], torch.ones(20, 99, dtype=torch.long))
    again, _ = data.train_val_split(tokens, 0.2, seed=3, block_size=100)
    other, _ = data.train_val_split(tokens, 0.2, seed=4, block_size=100)
    assert torch.equal(train, again) and not torch.equal(train, other)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        data.train_val_split(tokens, 1.0, 0)


def test_lm_batches_shapes_and_determinism():
    tokens = torch.arange(1000)
    batches = list(data.lm_batches(tokens, batch=4, seq=32, seed=0))
    assert len(batches) == 1000 // 32 // 4
    x, y = batches[0]
    assert x.shape == (4, 32) and torch.equal(x, y)  # transformers shifts labels itself
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 31, dtype=torch.long))  # contiguous windows
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, data.lm_batches(tokens, 4, 32, seed=0)))
    assert not torch.equal(batches[0][0], next(data.lm_batches(tokens, 4, 32, seed=1))[0])
    starts = torch.cat([b[0][:, 0] for b in batches])
    assert len(set(starts.tolist())) == len(starts)  # no window twice in an epoch
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(data.lm_batches(tokens, batch=64, seq=32))


# ------------------------------------------------------------------ packing


def _unique_examples(lengths):
    """Example i holds distinct token ids, so every token can be traced to one example."""
    out, start = [], 0
    for n in lengths:
        out.append(list(range(start, start + n)))
        start += n
    return out


LENGTHS = [5, 17, 3, 30, 1, 12, 8, 25, 9, 14, 2, 19, 7, 31, 6, 11]


def test_no_padding_and_every_token_exactly_once():
    examples = _unique_examples(LENGTHS)
    loader = DataEfficientLoader(examples, batch_size=4, max_tokens=32, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader)
    seen = torch.cat([b["input_ids"][0] for b in batches])
    total = sum(LENGTHS)
    assert seen.numel() == total  # zero padding: batch tokens sum to the dataset's tokens
    assert torch.equal(torch.sort(seen).values, torch.arange(total))  # each token exactly once
    for b in batches:
        n = b["input_ids"].shape[1]
        assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (1, n)
        assert n <= 32 and len(b["example_indices"]) <= 4
    assert sorted(i for b in batches for i in b["example_indices"]) == list(range(len(LENGTHS)))


def test_boundaries_positions_labels_and_cu_seqlens():
    examples = _unique_examples(LENGTHS)
    for b in DataEfficientLoader(examples, batch_size=5, max_tokens=40, seed=1):
        ids, pos, lab, cu = b["input_ids"][0], b["position_ids"][0], b["labels"][0], b["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == ids.numel()
        for k, i in enumerate(b["example_indices"]):
            s, e = int(cu[k]), int(cu[k + 1])
            assert ids[s:e].tolist() == examples[i]
            assert pos[s:e].tolist() == list(range(e - s))  # restart at 0 per example
            assert lab[s] == -100 and lab[s + 1 : e].tolist() == examples[i][1:]
        assert b["max_seqlen"] == int((cu[1:] - cu[:-1]).max())
        assert int((lab == -100).sum()) == len(b["example_indices"])


def test_packed_forward_equals_separate_forwards():
    # The real boundary check: a transformers model fed a packed batch gives each
    # example exactly the logits it gets alone, so attention stays inside each example.
    from unsloth_fx import zoo

    torch.manual_seed(0)
    examples = [torch.randint(0, 512, (n,)).tolist() for n in (6, 11, 3, 9)]
    batch = next(iter(DataEfficientLoader(examples, batch_size=4, max_tokens=64, shuffle=False)))
    for name in ("tiny-qwen2", "tiny-deepseek-v3"):
        model = zoo.build_model(name, device="cpu")
        packed = model(**DataEfficientLoader.model_inputs(batch))
        alone = [model(input_ids=torch.tensor([e]), labels=torch.tensor([e])) for e in examples]
        torch.testing.assert_close(packed.logits[0], torch.cat([o.logits[0] for o in alone]), rtol=1e-4, atol=1e-5)
        # Per-token mean over all predicted tokens = length-weighted mean of the per-example losses.
        weights = torch.tensor([len(e) - 1 for e in examples], dtype=torch.float)
        expected = (torch.stack([o.loss for o in alone]) * weights).sum() / weights.sum()
        torch.testing.assert_close(packed.loss, expected, rtol=1e-5, atol=1e-6)
        # And the same batch with a KV cache leaks across examples: why model_inputs sets use_cache=False.
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True)
        assert (leaky.logits[0] - packed.logits[0]).abs().max() > 1e-3


def test_deterministic_given_seed_and_epoch():
    examples = _unique_examples(LENGTHS)

    def order(**kw):
        return [b["example_indices"] for b in DataEfficientLoader(examples, 3, 40, **kw)]

    assert order(seed=7) == order(seed=7)
    assert order(seed=7) != order(seed=8)
    assert [i for b in order(shuffle=False) for i in b] == list(range(len(LENGTHS)))
    loader = DataEfficientLoader(examples, 3, 40, seed=7)
    first = [b["example_indices"] for b in loader]
    loader.set_epoch(1)
    assert [b["example_indices"] for b in loader] != first
    loader.set_epoch(0)
    assert [b["example_indices"] for b in loader] == first


def test_budgets_are_used_greedily():
    loader = DataEfficientLoader([[1] * 4] * 10, batch_size=3, max_tokens=100, shuffle=False)
    assert [len(b["example_indices"]) for b in loader] == [3, 3, 3, 1]
    loader = DataEfficientLoader([[1] * 4] * 10, batch_size=100, max_tokens=12, shuffle=False)
    assert [b["input_ids"].shape[1] for b in loader] == [12, 12, 12, 4]
    dropped = DataEfficientLoader([[1] * 4] * 10, batch_size=100, max_tokens=12, shuffle=False, drop_last=True)
    assert len(dropped) == 3 and [b["input_ids"].shape[1] for b in dropped] == [12, 12, 12]
    tight = DataEfficientLoader([[1] * 3] * 6, batch_size=100, max_tokens=8, shuffle=False)
    assert [b["input_ids"].shape[1] for b in tight] == [6, 6, 6]  # 9 tokens would exceed the budget
    full = DataEfficientLoader([[1] * 4] * 9, batch_size=100, max_tokens=12, shuffle=False, drop_last=True)
    assert len(full) == 3  # a full last batch is kept


def test_dataset_kinds():
    examples = _unique_examples([4, 7, 2, 9])

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return {"input_ids": torch.tensor(examples[i]), "text": "x"}

    ref = [b["input_ids"] for b in DataEfficientLoader(examples, 2, 16, seed=0)]
    for ds in (Dicts(), [torch.tensor(e) for e in examples], tuple(examples)):
        got = [b["input_ids"] for b in DataEfficientLoader(ds, 2, 16, seed=0)]
        assert all(torch.equal(a, b) for a, b in zip(ref, got)) and len(got) == len(ref)
    renamed = [{"tokens": e} for e in examples]
    got = [b["input_ids"] for b in DataEfficientLoader(renamed, 2, 16, seed=0, key="tokens")]
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_hf_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    examples = _unique_examples([4, 7, 2, 9])
    import pyarrow as pa
    from datasets.table import InMemoryTable

    # An explicit fingerprint skips datasets' dill hashing, which fails with some
    # pyarrow/dill combinations (PicklingError on MonthDayNano) and is not under test.
    ds = datasets.Dataset(InMemoryTable(pa.table({"input_ids": examples})), fingerprint="unsloth-fx-test")
    ref = [b["input_ids"] for b in DataEfficientLoader(examples, 2, 16, seed=0)]
    got = [b["input_ids"] for b in DataEfficientLoader(ds, 2, 16, seed=0)]
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(ref, got))


def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match=r"example 1 has 40 tokens, more than max_tokens=32.*truncate=True"):
        DataEfficientLoader([[1] * 5, [2] * 40], batch_size=2, max_tokens=32)
    with pytest.raises(ValueError, match="empty dataset"):
        DataEfficientLoader([], batch_size=2, max_tokens=32)
    with pytest.raises(ValueError, match="example 0 is empty"):
        DataEfficientLoader([[]], batch_size=2, max_tokens=32)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        DataEfficientLoader([[1]], batch_size=0, max_tokens=32)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        DataEfficientLoader([[1]], batch_size=1, max_tokens=0)
    with pytest.raises(KeyError, match=r"no 'input_ids' field \(fields: \['text'\]\)"):
        DataEfficientLoader([{"text": "hi"}], batch_size=1, max_tokens=8)
    with pytest.raises(TypeError, match="sized, indexable dataset"):
        DataEfficientLoader(iter([[1]]), batch_size=1, max_tokens=8)


def test_truncate_keeps_the_first_max_tokens():
    loader = DataEfficientLoader([list(range(40)), [7, 8]], batch_size=2, max_tokens=32, truncate=True, shuffle=False)
    batches = list(loader)
    assert batches[0]["input_ids"][0].tolist() == list(range(32))
    assert batches[1]["input_ids"][0].tolist() == [7, 8]
    assert loader.num_tokens == 34
