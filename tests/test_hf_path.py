"""The Hugging Face path: transformers.Trainer and PEFT LoRA through the unsloth backend (CPU)."""

import pytest
import torch

import unsloth_fx.backend as B
from unsloth_fx.data import byte_tokens, lm_batches, stdlib_corpus
from unsloth_fx.zoo import build_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=24, seq=64):
        it = lm_batches(byte_tokens(stdlib_corpus(max_bytes=100_000)), 1, seq, seed=0)
        self.rows = [next(it)[0][0] for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, max_steps=6, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0, **kw)


def test_transformers_trainer_with_a_model_compiled_in_place_by_unsloth(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model("tiny-qwen2", device="cpu")
    B.LAST.clear()
    # nn.Module.compile compiles in place: the model keeps its class and forward signature, so
    # transformers' column filtering and saving work unchanged. Options may also come from UNSLOTH_FX_*.
    monkeypatch.setenv("UNSLOTH_FX_MEMORY_BUDGET", "1GiB")
    model.compile(backend="unsloth", options={"lower": "eager"})
    tr = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_Rows())
    tr.train()
    losses = [r["loss"] for r in tr.state.log_history if "loss" in r]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.5, losses
    assert B.LAST["ctx"].stats["joint"]["plan_memory"]["budget"] == 2**30  # planned by our backend


def test_torch_compile_backend_unsloth_is_rejected_by_accelerate_today(tmp_path):
    """Known limitation (docs/end_to_end.md): accelerate's DynamoBackend enum only knows torch's own
    backends, so ``TrainingArguments(torch_compile_backend="unsloth")`` fails before training.
    When this test starts failing, accelerate accepts it: update the docs and this test."""
    model = build_model("tiny-qwen2", device="cpu")
    with pytest.raises(ValueError, match="'UNSLOTH' is not a valid DynamoBackend"):
        tr = transformers.Trainer(model=model, args=_args(tmp_path, torch_compile=True,
                                                          torch_compile_backend="unsloth"), train_dataset=_Rows())
        tr.train()


def test_peft_lora_compiles_and_trains_through_the_backend():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = build_model("tiny-qwen2", device="cpu")
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    from unsloth_fx.api import apply_optimizations

    B.LAST.clear()
    compiled, opt = apply_optimizations(model, target_vram="1GiB", optimizer="adamw", lr=1e-2, lower="eager")
    batches = [next(lm_batches(byte_tokens(stdlib_corpus(max_bytes=100_000)), 4, 64, seed=s)) for s in range(8)]
    losses = []
    for x, y in batches:
        loss = compiled(input_ids=x, labels=y, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    ctx = B.LAST["ctx"]
    grads = {i.name for i in ctx.params.values() if i.requires_grad}
    assert grads and all("lora_" in n for n in grads)  # the backend saw frozen base weights as frozen
    for n, p in model.named_parameters():
        if n in frozen:
            torch.testing.assert_close(p, frozen[n], rtol=0, atol=0, msg=n)
        else:
            assert not torch.equal(p, trainable[n]) or "lora_B" in n, n
