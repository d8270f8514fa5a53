"""Shared pieces of the MEFT tests: tiny models of any depth, wrapping, batches, and the comparison of the
reversible gradients with ordinary autograd on the same modules and dropout masks."""
import torch
import torch.nn.functional as F

import memtune
from memtune.methods import config_for
from memtune.models import load_model
from memtune.tokenizer import VOCAB_SIZE

from ..conftest import tiny_batch

FAMILIES = ("tiny-bert", "tiny-vit", "tiny-dinov2", "tiny-llama", "tiny-opt", "tiny-distilbert", "tiny-gpt2", "tiny-modernbert", "tiny-phi3", "tiny-clip-vision", "tiny-siglip-vision", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3")


def hf_model(kind="bert", layers=4, dtype=torch.float32, seed=0):
    """A seeded tiny HF model of any depth (width 64, eager attention)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, MPNetConfig, MPNetModel

    if kind == "bert":
        cls, cfg = BertModel, BertConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=layers,
                                         num_attention_heads=4, intermediate_size=128)
    elif kind == "mpnet":
        cls, cfg = MPNetModel, MPNetConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=layers,
                                           num_attention_heads=4, intermediate_size=128)
    else:
        cls, cfg = LlamaForCausalLM, LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=layers, num_attention_heads=4,
                                                 num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(cfg).to(dtype)


def wrap(model, method="meft", num_labels=3, seed=1, **options):
    torch.manual_seed(seed)
    if isinstance(model, str):
        model = load_model(model)
    return memtune.wrap(model, config_for(method, options), num_labels=num_labels)


def batch_for(model, b=2, t=12, dtype=torch.float32):
    batch = tiny_batch(model, batch_size=b, length=t)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def twin(model, **changes):
    """The same adapters and head on the same backbone, with other options (e.g. reversible_layers=0)."""
    opts = {**model.method_config.to_dict(), **changes}
    other = memtune.wrap(model.backbone.model, type(model.method_config).from_dict(opts), num_labels=model.num_labels)
    other.load_state_dict(model.state_dict())
    other.train(model.training)
    return other


def loss_of_features(model, feats, batch):
    """The training loss from the read-out: the new head's cross-entropy, or next-token cross-entropy."""
    if model.objective == "causal-lm":
        logits = model.backbone.lm_logits(feats)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
    return F.cross_entropy(model.head(feats).float(), batch["labels"])


def loss_of_top(batch):
    """loss(model, x¹, x², ctx) from the reversible span's top streams (upper layers, read-out, loss), for
    `span_bounds` to weight its gradient bound with the cotangent the test's loss really sends down."""
    def loss(model, x1, x2, ctx):
        stream = model.two_stream(ctx, x1.dtype)
        for n in model.upper_indices:
            x1, x2 = stream.forward_layer(n, x1, x2)
        return loss_of_features(model, model.read_out(x1, x2, ctx, x1.dtype), batch)
    return loss


def loss_and_grads(model, batch, seed=0):
    """Loss and gradients of every trainable tensor and of h₀ (the stack input), dropout seeded."""
    torch.manual_seed(seed)
    h, ctx = model.embed(batch)
    h = h.detach().requires_grad_(True)
    x1, x2 = model.run_streams(h, ctx)
    loss = loss_of_features(model, model.read_out(x1, x2, ctx, h.dtype), batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["h0"] = h.grad.clone()
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def max_rel(got, ref):
    """Largest per-tensor relative error ‖got − ref‖ / ‖ref‖."""
    return max(((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)


def agreement(model, batch):
    """(loss_rev, loss_autograd, max relative gradient error) with identical dropout masks."""
    ref = twin(model, reversible_layers=0)
    lr, gr = loss_and_grads(model, batch)
    la, ga = loss_and_grads(ref, batch)
    assert set(gr) == set(ga)
    return lr, la, max_rel(gr, ga)


def plm_hidden_states(backbone, batch):
    with torch.no_grad():
        h, ctx = backbone.embed(batch)
        out = []
        for i in range(backbone.num_layers):
            out.append((backbone.attention_sublayer(i, h, ctx), backbone.run_block(i, h, ctx)))
            h = out[-1][1]
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()
