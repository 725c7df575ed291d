"""unsloth_fx.Trainer: learns, resumes exactly, accumulates exactly, takes packed batches."""

import copy

import pytest
import torch

from unsloth_fx.data import DataEfficientLoader, byte_tokens, lm_batches, stdlib_corpus
from unsloth_fx.trainer import Trainer, model_inputs, predicted_tokens
from unsloth_fx.zoo import build_model


def _batches(n, batch=4, seq=64, seed=0):
    toks = byte_tokens(stdlib_corpus(max_bytes=200_000))
    it = lm_batches(toks, batch, seq, seed=seed)
    return [next(it) for _ in range(n)]


def _model(**kw):
    torch.manual_seed(0)
    return build_model("tiny-qwen2", device="cpu", **kw)


def test_loss_decreases_through_the_backend_on_stdlib_text():
    batches = _batches(10)
    tr = Trainer(_model(), batches, optimizer="hybrid_adam", lr=3e-3, max_epochs=1, log_every=5, progress=False,
                 compile_options={"lower": "eager", "memory_budget": "1GiB"})
    hist = tr.train()
    assert [r["step"] for r in hist] == list(range(1, 11))
    first, last = hist[0]["loss"], sum(r["loss"] for r in hist[-3:]) / 3
    assert first == pytest.approx(6.24, abs=0.15)  # ~ln(512): random init over a 512-token vocab
    assert last < first - 1.0, (first, last)
    import unsloth_fx.backend as B

    assert B.LAST["ctx"].stats["joint"]["plan_memory"]["budget"] == 2**30  # it really went through our backend


def test_resume_gives_the_uninterrupted_runs_next_losses(tmp_path):
    batches = _batches(6)
    kw = dict(optimizer="hybrid_adam", lr=3e-3, progress=False)
    full = Trainer(_model(attention_dropout=0.2), batches, max_steps=5, **kw).train()

    first = Trainer(_model(attention_dropout=0.2), batches, max_steps=2, checkpoint_dir=tmp_path, **kw)
    first.train()
    torch.manual_seed(123)  # disturb the RNG: resume must restore it (dropout draws from it)
    other = build_model("tiny-qwen2", device="cpu", attention_dropout=0.2)  # different init: weights must load
    resumed = Trainer(other, batches, max_steps=5, checkpoint_dir=tmp_path, resume=True, **kw)
    assert resumed.step == 2 and resumed.batches_in_epoch == 2
    hist = resumed.train()
    assert [r["step"] for r in hist] == [1, 2, 3, 4, 5]
    torch.testing.assert_close([r["loss"] for r in hist], [r["loss"] for r in full], rtol=0, atol=0)
    st = torch.load(tmp_path / "last.pt", weights_only=False)
    assert st["step"] == 5 and set(st) >= {"model", "optimizer", "rng", "epoch", "batches_in_epoch"}


def test_two_micro_batches_equal_one_batch_of_both_with_unequal_token_counts():
    (a_ids, a_lab), (b_ids, b_lab) = _batches(2, batch=2, seq=32)
    a_lab = a_lab.clone()
    a_lab[:, :20] = -100  # a predicts far fewer tokens than b: a plain 1/grad_accum average would be wrong
    assert predicted_tokens(a_lab) != predicted_tokens(b_lab)
    m1 = _model()
    m2 = copy.deepcopy(m1)
    # SGD(lr=1): the parameter change is exactly the gradient (Adam would hide a wrong scale)
    t1 = Trainer(m1, [(a_ids, a_lab), (b_ids, b_lab)], optimizer=torch.optim.SGD(m1.parameters(), lr=1.0),
                 grad_accum=2, max_steps=1, progress=False)
    t2 = Trainer(m2, [(torch.cat([a_ids, b_ids]), torch.cat([a_lab, b_lab]))],
                 optimizer=torch.optim.SGD(m2.parameters(), lr=1.0), grad_accum=1, max_steps=1, progress=False)
    h1, h2 = t1.train(), t2.train()
    assert h1[0]["tokens"] == h2[0]["tokens"] == predicted_tokens(a_lab) + predicted_tokens(b_lab)
    assert h1[0]["loss"] == pytest.approx(h2[0]["loss"], rel=1e-5)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=n)


def test_packed_batches_from_data_efficient_loader():
    toks = byte_tokens(stdlib_corpus(max_bytes=20_000)).tolist()
    examples = [toks[i:i + n] for i, n in zip(range(0, 19_000, 300), [17, 90, 33, 64, 120] * 20)]
    loader = DataEfficientLoader(examples, batch_size=4, max_tokens=256, seed=0)
    model = _model()
    batch = next(iter(loader))
    kw = model_inputs(batch, torch.device("cpu"))
    assert kw["use_cache"] is False and "cu_seqlens" not in kw and kw["position_ids"].shape == kw["input_ids"].shape
    with torch.no_grad():
        want = model(**kw).loss.item()
        crossing = model(input_ids=kw["input_ids"], labels=kw["labels"]).loss.item()  # attention crosses examples
    assert want != pytest.approx(crossing, abs=1e-4)
    tr = Trainer(model, loader, optimizer="adamw", lr=1e-3, max_steps=3, progress=False)
    hist = tr.train()
    assert hist[0]["loss"] == pytest.approx(want, abs=1e-5)  # the trainer fed position_ids + use_cache=False
    assert [r["tokens"] for r in hist] == [predicted_tokens(b["labels"]) for b, _ in zip(loader, range(3))]


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        Trainer(_model(), [], resume=True)
    with pytest.raises(ValueError, match="optimizer='sgdx'"):
        Trainer(_model(), [], optimizer="sgdx")
    with pytest.raises(TypeError, match="unsupported batch type"):
        Trainer(_model(), ["text"], optimizer="adamw", max_steps=1, progress=False).train()
