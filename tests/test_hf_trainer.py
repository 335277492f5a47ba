"""A Hugging Face Trainer run with optimizers=(FusedAdamW(...), None): offline, a tiny randomly initialised GPT-2
built from a config, synthetic data. The loss falls."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install transformers accelerate)")
pytest.importorskip("accelerate", reason="accelerate not installed (the Trainer needs it)")

from fused_adam import FusedAdamW  # noqa: E402


class _Repeating(torch.utils.data.Dataset):
    """A few fixed sequences of a 'count up by one' language, so there is something to learn."""

    def __init__(self, vocab: int, length: int, n: int):
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_with_fused_adamw_trains(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=30, logging_steps=10,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    opt = FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Repeating(32, 16, 64), optimizers=(opt, None))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], losses
    assert trainer.optimizer.optimizer is opt if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer is opt
    assert all(d.backend for group in opt.dispatch for d in group)
