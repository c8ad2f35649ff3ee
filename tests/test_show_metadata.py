"""parse_show / parse_tags: the metadata the VRAM engine needs, from real /api/show bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_shapes import FIXTURES, group_sums, load_show, tensor_bytes

from gpu_router.memory import NodeProfile, OllamaEnv, estimate_memory
from gpu_router.memory.shapes import model_shape
from gpu_router.ollama import BadResponse, parse_show, parse_tags
from gpu_router.state import GIB, ProjectorInfo


def test_qwen3_tensors_are_reduced_to_per_layer_bytes():
    body = load_show("qwen3_8b")
    g = group_sums(body)
    info = parse_show(body, "qwen3:8b")
    t = info.tensors
    assert t is not None
    assert t.block_bytes == tuple(g[f"blk.{i}"] for i in range(36))
    assert t.token_embd_bytes == g["token_embd"]
    assert t.output_bytes == g["output"]
    assert t.output_norm_bytes == g["output_norm"]
    assert t.has_output
    assert t.known_bytes == sum(g.values())
    assert t.vocab == 151936  # token_embd.weight [4096, 151936]: no qwen3.vocab_size key
    assert info.vocab_size == 151936
    assert info.key_length == info.value_length == 128
    assert t.attn_k_widths == (8 * 128,) * 36
    # the Ollama engine keeps token_embd on the CPU and puts output + output_norm in its last layer
    assert t.engine_input_bytes == g["token_embd"]
    assert t.engine_output_bytes == g["output"] + g["output_norm"]


def test_gemma3_sliding_window_and_tied_embeddings():
    info = parse_show(load_show("gemma3_1b"), "gemma3:1b")
    assert info.architecture == "gemma3"
    assert info.sliding_window == 512
    assert info.head_count_kv == 1
    assert info.tensors is not None
    assert not info.tensors.has_output  # the head is token_embd
    assert info.tensors.vocab == 262144


def test_vision_keys_and_inline_vision_tensors():
    body = load_show("qwen2.5vl_7b")
    g = group_sums(body)
    info = parse_show(body, "qwen2.5vl:7b")
    assert info.vision is not None
    assert info.vision.block_count == 32
    assert info.vision.patch_size == 14
    assert info.vision.num_channels == 3
    assert info.vision.head_count == 16
    assert info.vision.embedding_length == 1280
    assert info.vision.max_pixels is None  # VisionGraphSize then takes 28*28*1280
    assert info.tensors is not None
    assert info.tensors.vision_bytes == sum(v for k, v in g.items() if k == "v" or k.startswith("v."))
    assert "vision" in info.capabilities


def test_a_separate_projector_file_is_described_by_projector_info():
    info = parse_show(load_show("minicpm-v_8b"), "minicpm-v:8b")
    assert info.projector == ProjectorInfo(parameter_count=503973104, file_type=1, architecture="clip")
    assert info.architecture == "qwen2"


def test_gemma3n_shared_layers_and_the_nomic_embedding_keys():
    gemma3n = parse_show(load_show("gemma3n_e4b"), "gemma3n:e4b")
    assert gemma3n.shared_kv_layers == 15
    assert gemma3n.sliding_window_pattern == ()  # an array: null without verbose
    nomic = parse_show(json.loads((FIXTURES / "ollama" / "show-nomic-embed.json").read_text()), "nomic")
    assert nomic.pooling
    assert nomic.causal is False
    assert nomic.num_ctx == 8192
    assert nomic.head_count_kv is None  # no key: Ollama's GraphSize then takes one head
    assert nomic.tensors is None
    assert nomic.embedding_only


def test_gemma4_swa_head_sizes():
    info = parse_show(json.loads((FIXTURES / "ollama" / "show-gemma4.json").read_text()), "gemma4")
    assert info.key_length == 512
    assert info.key_length_swa == 256
    assert info.value_length_swa == 256
    assert info.shared_kv_layers == 18
    assert info.vision is not None
    assert info.vision.patch_size == 16


def _hybrid_body(verbose: bool) -> dict[str, Any]:
    """A hybrid model: attention on every other layer, state-space layers between."""
    layers, e, heads, hkv, head = 4, 512, 8, 2, 64
    info: dict[str, Any] = {
        "general.architecture": "granitehybrid",
        "granitehybrid.block_count": layers,
        "granitehybrid.embedding_length": e,
        "granitehybrid.attention.key_length": head,
        "granitehybrid.attention.value_length": head,
        "granitehybrid.ssm.conv_kernel": 4,
        "granitehybrid.ssm.inner_size": 1024,
        "granitehybrid.ssm.state_size": 128,
        "granitehybrid.ssm.group_count": 1,
        # arrays come back null without verbose=true (getModelData decodes no array values)
        "granitehybrid.attention.head_count": [heads, 0, heads, 0] if verbose else None,
        "granitehybrid.attention.head_count_kv": [hkv, 0, hkv, 0] if verbose else None,
    }
    tensors = [{"name": "token_embd.weight", "type": "Q8_0", "shape": [e, 1000]}]
    for i in range(layers):
        if i % 2 == 0:
            tensors.append({"name": f"blk.{i}.attn_q.weight", "type": "Q8_0", "shape": [e, heads * head]})
            tensors.append({"name": f"blk.{i}.attn_k.weight", "type": "Q8_0", "shape": [e, hkv * head]})
        else:
            tensors.append({"name": f"blk.{i}.ssm_in.weight", "type": "Q8_0", "shape": [e, 2048]})
    return {"model_info": info, "capabilities": ["completion"], "tensors": tensors}


@pytest.mark.parametrize("verbose", [True, False])
def test_per_layer_heads_come_from_the_array_or_from_the_tensor_shapes(verbose: bool):
    info = parse_show(_hybrid_body(verbose), "hybrid")
    shape = model_shape(info, 50 * 2**20)
    assert shape is not None
    assert shape.heads_kv == (2, 0, 2, 0)
    assert shape.heads == (8, 0, 8, 0)
    assert shape.heads_kv_min == 0  # HeadCountKVMin counts the recurrent layers' zeros
    assert info.ssm is not None
    assert info.ssm.state_size == 128


def test_unnamed_tensor_types_are_sized_from_what_the_file_leaves():
    # /api/show prints IQ* types as "unknown" (fs/ggml/type.go@v0.20.0 TensorType.String)
    body = load_show("llama3.2_1b")
    for t in body["tensors"]:
        if t["name"].startswith("blk.") and t["type"] != "F32":
            t["type"] = "unknown"
    info = parse_show(body, "iq")
    assert info.tensors is not None
    assert info.tensors.unknown_elements > 0
    file_bytes = 800 * 2**20
    shape = model_shape(info, file_bytes)
    assert shape is not None
    total = sum(shape.block_bytes) + shape.token_embd_bytes + shape.output_bytes + shape.output_norm_bytes
    assert abs(total - file_bytes) < 16 * 2**20  # the blocks got what the file leaves
    assert any("not named by /api/show" in n for n in shape.notes)


def test_cloud_models_in_tags_and_show():
    tags = {
        "models": [
            {
                "name": "gpt-oss:120b-cloud",
                "size": 384,
                "remote_model": "gpt-oss:120b",
                "remote_host": "https://ollama.com:443",
            },
            {"name": "llama3.2:latest", "size": 2019393189},
        ]
    }
    cloud, local = parse_tags(tags)
    assert cloud.remote
    assert not local.remote
    show = {"model_info": {}, "remote_model": "gpt-oss:120b", "remote_host": "https://ollama.com:443"}
    assert parse_show(show, "gpt-oss:120b-cloud").remote


@pytest.mark.parametrize(
    "tensors",
    [
        "not a list",
        [{"name": "blk.0.attn_k.weight", "type": "Q4_K"}],  # no shape
        [{"name": "blk.0.attn_k.weight", "type": "Q4_K", "shape": [-1, 5]}],
        [{"name": 7, "type": "Q4_K", "shape": [5]}],
        [["blk.0", "Q4_K", [5]]],
        [{"name": "blk.0.attn_k.weight", "type": "unknown", "shape": [2**40, 2**40]}],
    ],
)
def test_a_malformed_tensor_list_is_dropped_not_trusted(tensors: Any):
    body = load_show("mistral_7b")
    body["tensors"] = tensors
    info = parse_show(body, "m")
    assert info.tensors is None
    assert info.block_count == 32


def test_absurd_numbers_are_treated_as_missing():
    body = {
        "model_info": {
            "general.architecture": "llama",
            "llama.block_count": 10**12,
            "llama.embedding_length": -4096,
            "llama.attention.head_count": "32",
        },
        "tensors": [{"name": "blk.0.x", "type": "F32", "shape": [10**15, 10**15]}],
    }
    info = parse_show(body, "m")
    assert info.block_count is None
    assert info.embedding_length is None
    assert info.head_count is None
    assert estimate_memory(info, 10**9, NodeProfile("0.30.0", (24 * GIB,), OllamaEnv())) is None
    with pytest.raises(BadResponse):
        parse_show(["not", "an", "object"], "m")


def test_tensor_byte_sizes_match_the_go_type_table():
    # spot checks of fs/ggml/ggml.go@v0.12.10 TypeSize against the tests' own table
    from gpu_router.memory.ggml import tensor_bytes as engine_tensor_bytes

    for type_name in ("F32", "F16", "Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4", "BF16"):
        assert engine_tensor_bytes(type_name, [4096, 512]) == tensor_bytes(type_name, [4096, 512])
    assert engine_tensor_bytes("IQ4_XS", [256]) == 136
    assert engine_tensor_bytes("unknown", [256]) is None


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
_keys = st.sampled_from(
    [
        "general.architecture",
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.context_length",
        "llama.vocab_size",
        "llama.attention.sliding_window",
        "llama.vision.block_count",
        "llama.vision.patch_size",
        "llama.ssm.conv_kernel",
    ]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    info=st.dictionaries(_keys, _json | st.integers(0, 5000), max_size=11),
    tensors=_json
    | st.lists(st.fixed_dictionaries({"name": st.text(max_size=20), "type": _json, "shape": _json})),
    extra=st.dictionaries(
        st.sampled_from(["capabilities", "parameters", "projector_info", "remote_model"]), _json
    ),
    file_bytes=st.integers(-5, 2**40),
)
def test_hostile_bodies_raise_only_bad_response_and_never_break_the_estimate(
    info: dict[str, Any], tensors: Any, extra: dict[str, Any], file_bytes: int
):
    body = {"model_info": info, "tensors": tensors, **extra}
    parsed = parse_show(body, "m")
    for version in ("0.11.6", "0.16.1", "0.30.0"):
        est = estimate_memory(parsed, file_bytes, NodeProfile(version, (24 * GIB,), OllamaEnv()))
        if est is not None:
            assert est.need_bytes >= 0
            assert est.ps_size_bytes >= 0


def test_a_missing_kv_head_key_stays_missing_even_with_attention_tensors():
    # BERT GGUFs have attn_k tensors but no attention.head_count_kv: Ollama's HeadCountKV() then
    # takes its default of 1 (fs/ggml/ggml.go@v0.12.10); only a nulled array is rebuilt
    body = {
        "model_info": {
            "general.architecture": "bert",
            "bert.block_count": 2,
            "bert.embedding_length": 1024,
            "bert.attention.head_count": 16,
            "bert.pooling_type": 2,
        },
        "tensors": [
            {"name": f"blk.{i}.attn_k.weight", "type": "F16", "shape": [1024, 1024]} for i in range(2)
        ],
    }
    info = parse_show(body, "bge-m3")
    assert info.head_count_kv is None
    shape = model_shape(info, 10**8)
    assert shape is not None
    assert shape.heads_kv == (1, 1)
