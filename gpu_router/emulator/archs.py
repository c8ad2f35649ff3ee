"""Tensor lists for catalogue models that have no real ``/api/show`` body on file.

Built from each model's public architecture (layers, widths, heads, experts) and llama.cpp's
quantisation recipes, so that ``/api/show`` ``tensors`` look like a real GGUF's and their sum lands
close to the real file size. Pure: no I/O.

The type choices follow ``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp`` (as
vendored in Ollama's ``llama/llama.cpp``): in a ``*_K_M`` file ``attn_v`` and ``ffn_down`` get Q6_K
on the "more bits" layers, the output layer is Q6_K, norms and biases stay F32.
"""

from __future__ import annotations

from collections.abc import Callable

from gpu_router.emulator.ggml import Tensor
from gpu_router.records import record

_Adder = Callable[..., None]  # t(name, type, *shape)


@record
class Arch:
    """The shape of a transformer, enough to list its tensors."""

    block_count: int
    embedding: int
    heads: int
    heads_kv: tuple[int, ...]  # per layer; 0 = no attention in that layer (recurrent)
    head_dim_k: int
    head_dim_v: int
    ffn: int
    vocab: int
    quant: str  # Q4_K_M, Q4_0, Q8_0, F16
    tied_output: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False  # phi3: attn_qkv and a fused ffn_up
    post_norms: bool = False  # gemma2/3: post-attention and post-ffw norms
    encoder: bool = False  # BERT-like: token types, position embeddings, layer norms with biases
    gated_ffn: bool = False  # an encoder with a SwiGLU feed-forward (nomic-bert: no biases, rotary)
    experts: int = 0
    expert_ffn: int = 0
    shared_expert_ffn: int = 0
    ssm_inner: int = 0  # recurrent (mamba2) layers
    ssm_state: int = 0
    ssm_groups: int = 1
    ssm_heads: int = 0
    ssm_conv: int = 4
    attn_sinks: bool = False  # gpt-oss
    moe_bias: bool = False  # gpt-oss: biases on the router and experts
    dense_type: str = ""  # override for every non-expert matrix (gpt-oss: BF16)
    expert_type: str = ""  # override for expert matrices (gpt-oss: MXFP4)
    vision: Vision | None = None


@record
class Vision:
    """A vision tower stored inside the model's GGUF (``v.*`` and ``mm.*`` tensors, F16)."""

    block_count: int
    embedding: int
    ffn: int
    patch: int
    image: int
    channels: int = 3
    projector_out: int = 0


def _more_bits(i: int, n: int) -> bool:
    # llama-quant.cpp use_more_bits
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _types(quant: str) -> tuple[str, str, str]:
    """(default matrix type, "more bits" type, output type) of a file type."""
    return {
        "Q4_K_M": ("Q4_K", "Q6_K", "Q6_K"),
        "Q4_K_S": ("Q4_K", "Q5_K", "Q6_K"),
        "Q4_0": ("Q4_0", "Q4_0", "Q6_K"),
        "Q8_0": ("Q8_0", "Q8_0", "Q8_0"),
        "F16": ("F16", "F16", "F16"),
    }[quant]


def build_tensors(a: Arch) -> tuple[Tensor, ...]:
    """Every tensor of the model, in GGUF order (embeddings, blocks, output, vision)."""
    base, more, out_type = _types(a.quant)
    dense = a.dense_type
    e = a.embedding
    out: list[Tensor] = []

    def t(name: str, kind: str, *shape: int) -> None:
        out.append(Tensor(name, kind, tuple(shape)))

    embd_type = dense or (out_type if a.tied_output else base)
    if a.encoder:
        embd_type = "F16"
    t("token_embd.weight", embd_type, e, a.vocab)
    biases = a.encoder and not a.gated_ffn
    if biases:
        t("position_embd.weight", "F16", e, 512)
    if a.encoder:
        t("token_types.weight", "F32", e, 2)
        t("token_embd_norm.weight", "F32", e)
        t("token_embd_norm.bias", "F32", e)
    for i in range(a.block_count):
        p = f"blk.{i}"
        mat = dense or base
        v_type = dense or (more if _more_bits(i, a.block_count) else base)
        hkv = a.heads_kv[i]
        q_out = a.heads * a.head_dim_k
        t(f"{p}.attn_norm.weight", "F32", e)
        if a.encoder:
            t(f"{p}.attn_norm.bias", "F32", e)
        if hkv == 0:
            _ssm(a, p, mat, t)
        elif a.fused_qkv:
            t(f"{p}.attn_qkv.weight", mat, e, q_out + 2 * hkv * a.head_dim_k)
            t(f"{p}.attn_output.weight", mat, q_out, e)
        else:
            t(f"{p}.attn_q.weight", mat, e, q_out)
            t(f"{p}.attn_k.weight", mat, e, hkv * a.head_dim_k)
            t(f"{p}.attn_v.weight", v_type, e, hkv * a.head_dim_v)
            t(f"{p}.attn_output.weight", mat, a.heads * a.head_dim_v, e)
            if a.qkv_bias or biases:
                t(f"{p}.attn_q.bias", "F32", q_out)
                t(f"{p}.attn_k.bias", "F32", hkv * a.head_dim_k)
                t(f"{p}.attn_v.bias", "F32", hkv * a.head_dim_v)
            if biases:
                t(f"{p}.attn_output.bias", "F32", e)
            if a.qk_norm:
                t(f"{p}.attn_q_norm.weight", "F32", a.head_dim_k)
                t(f"{p}.attn_k_norm.weight", "F32", a.head_dim_k)
            if a.attn_sinks:
                t(f"{p}.attn_sinks.weight", "F32", a.heads)
        if a.post_norms:
            t(f"{p}.post_attention_norm.weight", "F32", e)
        t(f"{p}.ffn_norm.weight", "F32", e)
        if a.encoder:
            t(f"{p}.ffn_norm.bias", "F32", e)
        if a.experts:
            _experts(a, p, more if _more_bits(i, a.block_count) else base, base, t)
        elif a.fused_qkv and not a.encoder:
            t(f"{p}.ffn_up.weight", mat, e, 2 * a.ffn)
            t(f"{p}.ffn_down.weight", v_type, a.ffn, e)
        else:
            if not a.encoder or a.gated_ffn:
                t(f"{p}.ffn_gate.weight", mat, e, a.ffn)
            t(f"{p}.ffn_up.weight", mat, e, a.ffn)
            t(f"{p}.ffn_down.weight", v_type, a.ffn, e)
            if biases:
                t(f"{p}.ffn_up.bias", "F32", a.ffn)
                t(f"{p}.ffn_down.bias", "F32", e)
        if a.post_norms:
            t(f"{p}.post_ffw_norm.weight", "F32", e)
    if not a.encoder:
        t("output_norm.weight", "F32", e)
    if not a.tied_output and not a.encoder:
        t("output.weight", dense or out_type, e, a.vocab)
    if a.vision is not None:
        _vision(a.vision, e, t)
    return tuple(out)


def _ssm(a: Arch, p: str, mat: str, t: _Adder) -> None:
    # A mamba2 mixer in place of attention (granite-4.0-h, nemotron-h): llama.cpp's tensor names.
    d_in_proj = 2 * a.ssm_inner + 2 * a.ssm_groups * a.ssm_state + a.ssm_heads
    conv_dim = a.ssm_inner + 2 * a.ssm_groups * a.ssm_state
    t(f"{p}.ssm_in.weight", mat, a.embedding, d_in_proj)
    t(f"{p}.ssm_conv1d.weight", "F32", a.ssm_conv, conv_dim)
    t(f"{p}.ssm_conv1d.bias", "F32", conv_dim)
    t(f"{p}.ssm_dt.bias", "F32", a.ssm_heads)
    t(f"{p}.ssm_a", "F32", 1, a.ssm_heads)
    t(f"{p}.ssm_d", "F32", 1, a.ssm_heads)
    t(f"{p}.ssm_norm.weight", "F32", a.ssm_inner // a.ssm_groups, a.ssm_groups)
    t(f"{p}.ssm_out.weight", mat, a.ssm_inner, a.embedding)


def _experts(a: Arch, p: str, down_type: str, base: str, t: _Adder) -> None:
    e, n, f = a.embedding, a.experts, a.expert_ffn
    kind = a.expert_type or base
    t(f"{p}.ffn_gate_inp.weight", "F32", e, n)
    if a.moe_bias:
        t(f"{p}.ffn_gate_inp.bias", "F32", n)
    t(f"{p}.ffn_gate_exps.weight", kind, e, f, n)
    t(f"{p}.ffn_up_exps.weight", kind, e, f, n)
    t(f"{p}.ffn_down_exps.weight", a.expert_type or down_type, f, e, n)
    if a.moe_bias:
        t(f"{p}.ffn_gate_exps.bias", "F32", f, n)
        t(f"{p}.ffn_up_exps.bias", "F32", f, n)
        t(f"{p}.ffn_down_exps.bias", "F32", e, n)
    if a.shared_expert_ffn:
        s = a.shared_expert_ffn
        t(f"{p}.ffn_gate_shexp.weight", base, e, s)
        t(f"{p}.ffn_up_shexp.weight", base, e, s)
        t(f"{p}.ffn_down_shexp.weight", down_type, s, e)


def _vision(v: Vision, text_embedding: int, t: _Adder) -> None:
    # A SigLIP-style tower with a multimodal projector, as Ollama's gemma3 GGUFs carry it.
    d = v.embedding
    patches = (v.image // v.patch) ** 2
    t("v.patch_embedding.weight", "F16", v.patch, v.patch, v.channels, d)
    t("v.patch_embedding.bias", "F32", d)
    t("v.position_embedding.weight", "F16", d, patches)
    for i in range(v.block_count):
        p = f"v.blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t(f"{p}.{name}.weight", "F16", d, d)
            t(f"{p}.{name}.bias", "F32", d)
        t(f"{p}.layer_norm1.weight", "F32", d)
        t(f"{p}.layer_norm1.bias", "F32", d)
        t(f"{p}.mlp.fc1.weight", "F16", d, v.ffn)
        t(f"{p}.mlp.fc1.bias", "F32", v.ffn)
        t(f"{p}.mlp.fc2.weight", "F16", v.ffn, d)
        t(f"{p}.mlp.fc2.bias", "F32", d)
        t(f"{p}.layer_norm2.weight", "F32", d)
        t(f"{p}.layer_norm2.bias", "F32", d)
    t("v.post_layernorm.weight", "F32", d)
    t("v.post_layernorm.bias", "F32", d)
    t("mm.mm_input_projection.weight", "F16", d, v.projector_out or text_embedding)
    t("mm.mm_soft_emb_norm.weight", "F32", d)


def uniform(n: int, heads_kv: int) -> tuple[int, ...]:
    """The same KV head count on every layer."""
    return (heads_kv,) * n
