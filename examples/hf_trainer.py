"""Train a tiny GPT-2 with the Hugging Face Trainer and AdamMonitorCallback; TensorBoard logs go
under runs/hf_trainer/runs, beside the Trainer's own.

pip install 'adam-monitor[transformers]'
python examples/hf_trainer.py            # then: tensorboard --logdir runs/hf_trainer
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from adam_monitor.integrations.transformers import AdamMonitorCallback


def token_data(n=256, length=32, vocab=64, seed=0):
    """Sequences that count up from a random start (mod vocab): a pattern a small model learns."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n, 1), generator=g)
    ids = (starts + torch.arange(length)) % vocab
    return [{"input_ids": row, "labels": row} for row in ids]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", default="runs/hf_trainer")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        logging_steps=5,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = AdamMonitorCallback()
    trainer = Trainer(model=model, args=training_args, train_dataset=token_data(), callbacks=[callback])
    trainer.train()
    print(callback.monitor.summary())
    return callback


if __name__ == "__main__":
    main()
