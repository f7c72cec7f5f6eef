"""vLLM reads the config monoquant writes: no key its compressed-tensors does not know, vLLM's own
config normalisation passes, and vLLM picks the expected scheme class for every layer, fused
layers included (also for the schemes vLLM's CPU backend has no kernel for: checked, not run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from conftest import OUTPUTS

from monoquant.schemes import Scheme

QUANTIZED = [n for n, o in OUTPUTS.items() if o["scheme"] not in ("fp16", "bf16")]
# keys compressed-tensors' writer adds next to the QuantizationConfig fields (ModelCompressor.update_config)
WRITER_KEYS = {"version", "quant_method", "sparsity_config", "transform_config"}


def unknown_keys(qc: dict[str, Any]) -> list[str]:
    """Keys of the config that this compressed-tensors' models do not declare (``extra='forbid'``
    semantics, applied by hand: the models themselves accept extras)."""
    bad = [
        f"quantization_config.{k}"
        for k in qc
        if k not in QuantizationConfig.model_fields and k not in WRITER_KEYS
    ]
    for gname, g in qc["config_groups"].items():
        bad += [f"{gname}.{k}" for k in g if k not in QuantizationScheme.model_fields]
        for part in ("weights", "input_activations", "output_activations"):
            if g.get(part):
                bad += [f"{gname}.{part}.{k}" for k in g[part] if k not in QuantizationArgs.model_fields]
    return bad


def expected_class(s: Scheme) -> str:
    """The class vLLM 0.32's ``_get_scheme_from_parts`` picks (on its CPU platform) for scheme ``s``."""
    if s.kind == "nvfp4":
        return "CompressedTensorsW4A4Fp4"  # NVFP4A16 too (``use_a16=True``)
    if s.kind == "mxfp4":
        return "CompressedTensorsW4A4Mxfp4"  # with or without MX activations
    if s.kind == "mxfp8":
        return "CompressedTensorsW8A8Mxfp8"
    if s.kind == "float":
        return "CompressedTensorsW8A8Fp8" if s.dynamic else "CompressedTensorsW8A16Fp8"
    return "CompressedTensorsW8A8Int8" if s.dynamic else "CompressedTensorsWNA16"


#: outputs whose scheme class vLLM's CPU build constructs only to refuse it (no kernel on this
#: platform): the class must still be the expected one, and its error must say why
NO_CPU_KERNEL = {
    "nvfp4a16": "Marlin FP4 not available",  # W4A16 goes to the Marlin (CUDA) kernel
    "nvfp4": "Failed to find a kernel that can implement the NVFP4 linear layer",
    "mxfp4a16": "Failed to find a kernel that can implement the MXFP4 linear layer",
    "mxfp4": "Failed to find a kernel that can implement the MXFP4 linear layer",
}


def refusing_class(e: BaseException) -> str | None:
    """The CompressedTensors scheme class whose constructor raised ``e`` (None if none did)."""
    tb = e.__traceback__
    cls = None
    while tb is not None:
        me = tb.tb_frame.f_locals.get("self")
        if tb.tb_frame.f_code.co_name == "__init__" and type(me).__name__.startswith("CompressedTensors"):
            cls = type(me).__name__
        tb = tb.tb_next
    return cls


def vllm_layers(out: Path) -> dict[str, list[str]]:
    """vLLM's Llama layer names (fused as vLLM builds them) -> the checkpoint modules behind each."""
    from vllm.model_executor.models.llama import LlamaForCausalLM

    fused = LlamaForCausalLM.packed_modules_mapping
    parts_of = {p: f for f, ps in fused.items() for p in ps}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    modules = sorted({n.rsplit(".", 1)[0] for n in index["weight_map"] if ".layers." in n})
    layers: dict[str, list[str]] = {}
    for m in modules:
        parent, leaf = m.rsplit(".", 1)
        if leaf in parts_of:
            layers.setdefault(f"{parent}.{parts_of[leaf]}", []).append(m)
        elif leaf.endswith("proj"):
            layers[m] = [m]
    return layers


@pytest.mark.parametrize("name", QUANTIZED)
def test_config_has_only_keys_vllm_knows(output, name):
    out = output("smollm2", name)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert unknown_keys(qc) == []
    QuantizationConfig.model_validate(qc)
    # vLLM's own normalisation of config.json (the step the old string ``producer`` broke) and
    # its reading of the quantization method
    from vllm.config import ModelConfig

    mc = ModelConfig(model=str(out), max_model_len=256, enforce_eager=True)
    assert mc.quantization == "compressed-tensors"


def test_a_foreign_key_is_caught(output):
    """The check above can fail: the key monoquant used to write is reported."""
    qc = json.loads((output("smollm2", "int4") / "config.json").read_text())["quantization_config"]
    assert unknown_keys({**qc, "producer": "monoquant 0.1.0"}) == ["quantization_config.producer"]


@pytest.mark.parametrize("name", QUANTIZED)
def test_vllm_picks_the_scheme_of_every_layer(output, name):
    """vLLM's CompressedTensorsConfig, with Llama's fused-layer mapping, gives every layer the
    scheme class of the config group its checkpoint modules belong to (None for dense ones)."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from vllm.model_executor.models.llama import LlamaForCausalLM

    out = output("smollm2", name)
    vcfg = VllmConfig(model_config=ModelConfig(model=str(out), max_model_len=256, enforce_eager=True))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["monoquant"]
    schemes = {n: Scheme.from_dict(d) for n, d in meta["schemes"].items()}
    per_tensor = {t.rsplit(".", 1)[0]: schemes[s] for t, s in meta["quantized"].items()}
    cfg = CompressedTensorsConfig.from_config(json.loads(json.dumps(qc)))
    cfg.packed_modules_mapping = dict(LlamaForCausalLM.packed_modules_mapping)
    layer = torch.nn.Linear(1, 1, device="meta")
    problems = []
    refusals: set[str] = set()
    layers = vllm_layers(out)
    assert len(layers) == 30 * 4  # SmolLM2: 30 layers x (qkv, o, gate_up, down)
    for vname, parts in layers.items():
        got = {per_tensor[p].name if p in per_tensor else None for p in parts}
        if len(got) != 1:
            problems.append(f"{vname}: fused partners in different schemes {sorted(map(str, got))}")
            continue
        want = None if None in got else expected_class(per_tensor[parts[0]])
        try:
            with set_current_vllm_config(vcfg):  # the fp8 schemes consult it
                s = cfg.get_scheme(layer, layer_name=vname)
        except Exception as e:  # vLLM refuses the layer
            cls = refusing_class(e)
            refusals.add(f"{cls}: {type(e).__name__}: {e}")
            if cls != want or name not in NO_CPU_KERNEL:
                problems.append(f"{vname}: {cls} refuses it: {type(e).__name__}: {e}")
            continue
        cls = None if s is None else type(s).__name__
        if cls != want:
            problems.append(f"{vname}: vLLM picks {cls}, expected {want}")
        elif (
            s is not None
            and hasattr(s, "group_size")
            and per_tensor[parts[0]].strategy == "group"
            and s.group_size != per_tensor[parts[0]].group_size
        ):
            problems.append(f"{vname}: group size {s.group_size}")
    assert problems == []
    if name in NO_CPU_KERNEL:  # the picked class itself says it has no kernel here
        print(f"{name}: {sorted(refusals)}")
        assert refusals and all(NO_CPU_KERNEL[name] in r for r in refusals), refusals
