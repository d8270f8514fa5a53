"""Helpers shared by the side-network methods' tests: a seeded padded batch, and training over fixed epochs
while counting the frozen trunk's forward calls (what a trunk cache saves)."""
from __future__ import annotations

import torch


def batch_for(model, b=3, t=9, seed=1):
    """A seeded batch for a wrapped model: B×T token ids with the first example right-padded by 3 (plus B×4
    decoder ids for encoder-decoders), or B×3×32×32 pixels; next-token labels (-100 on padding) for causal
    LMs, class labels otherwise."""
    g = torch.Generator().manual_seed(seed)
    bb = model.backbone
    if bb.modality == "image":
        batch = {"pixel_values": torch.randn(b, 3, 32, 32, generator=g)}
    else:
        ids = torch.randint(5, 60, (b, t), generator=g)
        mask = torch.ones_like(ids)
        mask[0, t - 3:] = 0                                    # one right-padded example
        batch = {"input_ids": ids * mask, "attention_mask": mask}
        if bb.is_encoder_decoder:
            batch["decoder_input_ids"] = torch.randint(5, 60, (b, 4), generator=g)
    if model.objective == "causal-lm":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch["labels"] = torch.arange(b) % model.num_labels
    return batch


def randomize_side(model, seed=3):
    """An LST model in eval mode whose side network carries enough signal to vary its output: W_up ~ N(0, 3²),
    every ladder ~ N(0, 0.3²) (the init keeps the side output near zero, which makes decoding checks trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.up.weight.copy_(torch.randn(model.up.weight.shape, generator=g) * 3)
        for s in model.stacks.values():
            for lad in s.ladders.values():
                lad.weight.copy_(torch.randn(lad.weight.shape, generator=g) * 0.3)
    return model.eval()


def train_epochs(model, epochs, lr=1e-2):
    """AdamW over `epochs` (lists of batches, in order); returns every step's loss and the trunk's block-0
    forward calls per epoch (a trunk cache replays its taps instead of calling the block)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    calls = []
    model.backbone.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    losses, per_epoch = [], []
    torch.manual_seed(123)                             # dropout draws: the same in every run
    for batches in epochs:
        before = len(calls)
        for b in batches:
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        per_epoch.append(len(calls) - before)
    return losses, per_epoch


def fit_fixed_batch(model, batch, lr: float, steps: int) -> tuple[float, float]:
    """AdamW on the trainable parameters for `steps` steps on one batch: (first loss, last loss)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    first = model(**batch).loss.item()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return first, model(**batch).loss.item()
