"""Helpers shared by the side-network methods' tests: a seeded padded batch, training over fixed epochs
while counting the frozen trunk's forward calls (what a trunk cache saves), the no-graph check on the frozen
blocks, and the check of LST's pruning records."""
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


def assert_blocks_keep_no_graph(model, blocks, batch) -> None:
    """One training forward and backward of `model` on `batch`: nothing is saved for backward inside `blocks`
    (the frozen trunk runs without autograd), their outputs carry no graph, and no backbone parameter gets a
    gradient."""
    from memtune.memory.saved import count_saved_inside

    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for b in blocks]
    with count_saved_inside(blocks, model) as inside:
        loss = model(**batch).loss
    for h in hooks:
        h.remove()
    loss.backward()
    assert inside.count == 0 and inside.bytes == 0
    assert len(outputs) == len(blocks) and all(o.grad_fn is None and not o.requires_grad for o in outputs)
    # Embedding, every block, final norm and (decoders) the LM head: all in `backbone`, none has a grad.
    assert all(p.grad is None for p in model.backbone.parameters())


def assert_pruning_records_hold(model) -> dict:
    """Every LST pruning record (side parameter → backbone parameter, kept rows, kept columns) is an exact
    copy of that slice; returns the records."""
    records = model.pruning_records
    for side_name, (src_name, rows, cols) in records.items():
        w = model.get_parameter(src_name)
        if rows is not None:
            w = w[rows]
        if cols is not None:
            w = w[:, cols]
        assert torch.equal(model.get_parameter(side_name), w), side_name
    return records


def assert_side_checkpointing_matches(make_model, make_batch=batch_for) -> None:
    """QST's side_checkpointing: `make_model(ckpt)` builds the same seeded model with it off and on; the loss
    and every gradient agree (the same dropout draws), and fewer bytes are saved for backward with it on."""
    from memtune.memory.saved import saved_bytes

    runs = {}
    for ckpt in (False, True):
        model = make_model(ckpt).train()
        batch = make_batch(model)
        torch.manual_seed(7)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.trainable_named_parameters()}
        torch.manual_seed(7)
        runs[ckpt] = (loss.detach(), grads, saved_bytes(model, lambda: model(**batch).loss))
    (l0, g0, b0), (l1, g1, b1) = runs[False], runs[True]
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)
    assert b1 < b0


def assert_quantized_start_and_training(model, batch) -> None:
    """A side method on a 4-bit backbone: in eval mode it starts at the quantized backbone's own prediction
    (head of its pooled output), a fixed batch's loss halves in 20 AdamW steps, and no backbone parameter
    gets a gradient."""
    bb = model.backbone
    model.eval()
    with torch.no_grad():
        h, ctx = bb(batch)
        assert torch.equal(model(**batch).logits, model.head(bb.pool(h, ctx)))
    first, last = fit_fixed_batch(model, batch, lr=3e-2, steps=20)
    assert last < 0.5 * first
    assert all(p.grad is None for p in bb.parameters())
