"""GGUF export, read back with the ``gguf`` package's own reader: every tensor, the hyperparameters, the
tokenizer (GPT-2's BPE through Hugging Face ``tokenizers`` from the stored vocab and merges, compared with
tiktoken; characters through a longest-match over the stored bytes), and the refusals."""

import codecs
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.checkpoints.gguf_export import export_gguf
from gpt2lab.errors import GPT2LabError
from gpt2lab.tokenizer import CharTokenizer, gpt2_bpe

gguf = pytest.importorskip("gguf")

TEXT = "Hello world! It's 2024: naïve café — “quotes”, 中文, emoji 🙂 and  double  spaces.\n\tTabs too"


def _state(config: GPTConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped weight/bias would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "ln" in name and name.endswith("weight") else 0.0))
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def _expected(config: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors llama.cpp's loader asks for (src/models/gpt2.cpp, starcoder2.cpp), written out by hand."""
    C, kv = config.n_embd, config.n_kv_head * config.head_dim
    out = {"token_embd.weight": state["transformer.wte.weight"]}
    out |= {"output_norm.weight": state["transformer.ln_f.weight"], "output_norm.bias": state["transformer.ln_f.bias"]}
    if config.pos_encoding == "learned":
        out["position_embd.weight"] = state["transformer.wpe.weight"]
    for i in range(config.n_layer):
        for leaf in ("weight", "bias"):
            h = lambda m, i=i, leaf=leaf: state[f"transformer.h.{i}.{m}.{leaf}"]  # noqa: E731
            out[f"blk.{i}.attn_norm.{leaf}"] = h("ln_1")
            out[f"blk.{i}.ffn_norm.{leaf}"] = h("ln_2")
            out[f"blk.{i}.attn_output.{leaf}"] = h("attn.c_proj")
            out[f"blk.{i}.ffn_up.{leaf}"] = h("mlp.c_fc")
            out[f"blk.{i}.ffn_down.{leaf}"] = h("mlp.c_proj")
            if config.pos_encoding == "learned":
                out[f"blk.{i}.attn_qkv.{leaf}"] = h("attn.c_attn")
            else:
                out[f"blk.{i}.attn_q.{leaf}"] = h("attn.c_attn")[:C]
                out[f"blk.{i}.attn_k.{leaf}"] = h("attn.c_attn")[C : C + kv]
                out[f"blk.{i}.attn_v.{leaf}"] = h("attn.c_attn")[C + kv :]
    return out


def _read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def _field(reader, key):
    return reader.fields[key].contents()


CONFIGS = {
    "gpt2": dict(vocab_size=50304),  # padded vocabulary
    "gpt2-gqa": dict(n_kv_head=2),
    "rope-gqa": dict(pos_encoding="rope", n_kv_head=2, rope_theta=5000.0),
    "rope-mqa": dict(pos_encoding="rope", n_kv_head=1),
}


@pytest.mark.parametrize("variant", CONFIGS)
def test_f32_file_holds_every_tensor_and_hyperparameter_llama_cpp_reads(tmp_path, variant):
    config = GPTConfig.from_preset("tiny", **CONFIGS[variant])
    state = _state(config)
    summary = export_gguf(tmp_path / "m.gguf", config, state, gpt2_bpe(), "f32")
    reader, tensors = _read(tmp_path / "m.gguf")
    arch = "starcoder2" if config.pos_encoding == "rope" else "gpt2"
    assert summary.architecture == arch == _field(reader, gguf.Keys.General.ARCHITECTURE)

    expected = _expected(config, state)
    assert set(tensors) == set(expected)
    # every name is one llama.cpp's architecture declares (gguf.constants mirrors llama-arch.cpp)
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    formats = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch_enum]}
    allowed = {
        f.format(bid=i) + suffix for f in formats for i in range(config.n_layer) for suffix in (".weight", ".bias")
    }
    assert set(tensors) <= allowed
    for name, want in expected.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(want.shape[::-1])  # GGUF lists dimensions innermost first
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want.numpy())

    f = lambda key: _field(reader, key.format(arch=arch))  # noqa: E731
    assert f(gguf.Keys.LLM.CONTEXT_LENGTH) == config.block_size
    assert f(gguf.Keys.LLM.EMBEDDING_LENGTH) == config.n_embd
    assert f(gguf.Keys.LLM.FEED_FORWARD_LENGTH) == 4 * config.n_embd
    assert f(gguf.Keys.LLM.BLOCK_COUNT) == config.n_layer
    assert f(gguf.Keys.Attention.HEAD_COUNT) == config.n_head
    assert f(gguf.Keys.Attention.HEAD_COUNT_KV) == config.n_kv_head
    assert f(gguf.Keys.Attention.LAYERNORM_EPS) == pytest.approx(config.layer_norm_epsilon)
    if arch == "starcoder2":
        assert f(gguf.Keys.Rope.FREQ_BASE) == config.rope_theta
        assert f(gguf.Keys.Rope.DIMENSION_COUNT) == config.head_dim


def test_f16_and_q8_0_matrices_round_to_the_source_within_their_precision(tmp_path):
    config = GPTConfig.from_preset("tiny")
    state = _state(config)
    expected = _expected(config, state)
    export_gguf(tmp_path / "h.gguf", config, state, gpt2_bpe(), "f16")
    export_gguf(tmp_path / "q.gguf", config, state, gpt2_bpe(), "q8_0")
    _, half = _read(tmp_path / "h.gguf")
    reader, q8 = _read(tmp_path / "q.gguf")
    assert _field(reader, gguf.Keys.General.FILE_TYPE) == gguf.LlamaFileType.MOSTLY_Q8_0
    for name, want in expected.items():
        vector_or_table = want.dim() == 1 or name == "position_embd.weight"
        types = (half[name].tensor_type, q8[name].tensor_type)
        T = gguf.GGMLQuantizationType
        assert types == ((T.F32, T.F32) if vector_or_table else (T.F16, T.Q8_0)), name
        got_half = np.asarray(half[name].data).reshape(want.shape)
        np.testing.assert_array_equal(got_half, want.numpy().astype(got_half.dtype))
        got_q8 = gguf.quants.dequantize(q8[name].data, q8[name].tensor_type).reshape(want.shape)
        # q8_0: per block of 32, step = max|x| / 127, stored in f16 (relative error <= 2^-11): the error is at
        # most half a step plus 127 times the step's own rounding
        blocks = want.numpy().reshape(-1, 32) if not vector_or_table else want.numpy().reshape(1, -1)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        err = np.abs(got_q8.reshape(blocks.shape) - blocks)
        assert (err <= step * (0.5 + 127 / 2048) + 1e-7).all(), name
        if not vector_or_table:
            assert err.max() > 0  # really quantized


def test_q8_0_keeps_rows_that_are_not_whole_blocks_in_f16(tmp_path):
    config = GPTConfig(n_layer=1, n_head=2, n_embd=48, block_size=16, vocab_size=50257)
    export_gguf(tmp_path / "q.gguf", config, _state(config), gpt2_bpe(), "q8_0")
    _, tensors = _read(tmp_path / "q.gguf")
    T = gguf.GGMLQuantizationType
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == T.F16  # rows of 48
    assert tensors["blk.0.ffn_down.weight"].tensor_type == T.Q8_0  # rows of 4 x 48 = 192


def test_gpt2_vocabulary_and_merges_tokenize_like_tiktoken(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    config = GPTConfig.from_preset("tiny", vocab_size=50304)
    export_gguf(tmp_path / "m.gguf", config, _state(config), gpt2_bpe(), "f32")
    reader, _ = _read(tmp_path / "m.gguf")
    tokens = _field(reader, gguf.Keys.Tokenizer.LIST)
    merges = _field(reader, gguf.Keys.Tokenizer.MERGES)
    types = _field(reader, gguf.Keys.Tokenizer.TOKEN_TYPE)
    assert _field(reader, gguf.Keys.Tokenizer.MODEL) == "gpt2" and _field(reader, gguf.Keys.Tokenizer.PRE) == "gpt-2"
    assert len(tokens) == len(types) == 50304 and len(merges) == 50000 and len(set(tokens)) == 50304
    assert tokens[50256] == "<|endoftext|>" and types[50256] == gguf.TokenType.CONTROL
    assert tokens[50257:] == [f"[PAD{i}]" for i in range(50257, 50304)]
    assert set(types[50257:]) == {gguf.TokenType.UNUSED} and set(types[:50256]) == {gguf.TokenType.NORMAL}
    assert _field(reader, gguf.Keys.Tokenizer.BOS_ID) == _field(reader, gguf.Keys.Tokenizer.EOS_ID) == 50256
    assert _field(reader, gguf.Keys.Tokenizer.ADD_BOS) is False

    # An independent BPE (Hugging Face tokenizers) built from the stored vocabulary and merges only.
    bpe = tokenizers.models.BPE(
        vocab={t: i for i, t in enumerate(tokens[:50257])}, merges=[tuple(m.split(" ")) for m in merges]
    )
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    enc = gpt2_bpe()
    for text in (TEXT, " leading space", "x" * 40, "\n\n\n  \t"):
        ids = tok.encode(text).ids
        assert ids == enc.encode_ordinary(text)
        assert tok.decode(ids) == text


def test_character_vocabulary_is_stored_as_whole_characters_a_longest_match_reproduces(tmp_path):
    chars = CharTokenizer("".join(sorted(set(TEXT + "\\\"'\r"))))
    config = GPTConfig.from_preset("tiny", vocab_size=chars.n_vocab)
    export_gguf(tmp_path / "c.gguf", config, _state(config), chars, "f32")
    reader, _ = _read(tmp_path / "c.gguf")
    assert _field(reader, gguf.Keys.Tokenizer.MODEL) == "rwkv"
    assert gguf.Keys.Tokenizer.EOS_ID not in reader.fields  # no special token: nothing ends generation early
    # llama.cpp unescapes rwkv tokens (\t \n \r \\ \xNN); Python's escape decoder reads the same escapes
    stored = [codecs.escape_decode(t.encode("ascii"))[0] for t in _field(reader, gguf.Keys.Tokenizer.LIST)]
    assert stored == [c.encode("utf-8") for c in chars.chars]

    def longest_match(data: bytes) -> list[int]:  # what llama.cpp's rwkv trie does, done naively
        ids, at = [], 0
        while at < len(data):
            length = max(n for n in range(1, 5) if data[at : at + n] in stored)
            ids.append(stored.index(data[at : at + length]))
            at += length
        return ids

    assert longest_match(TEXT.encode("utf-8")) == chars.encode(TEXT)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (dict(window=[8, None]), "per-layer windows"),
        (dict(window=16), "no sliding window"),
        (dict(pos_encoding="rope", window=16), "no sliding window"),
        (dict(activation="relu"), "activation 'relu'"),
        (dict(activation="gelu"), "activation 'gelu'"),
    ],
)
def test_what_llama_cpp_cannot_compute_is_refused_in_one_line(tmp_path, overrides, reason):
    config = GPTConfig.from_preset("tiny", **overrides)
    with pytest.raises(GPT2LabError, match=reason) as err:
        export_gguf(tmp_path / "m.gguf", config, _state(config), gpt2_bpe(), "f32")
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_an_existing_file_is_replaced_only_when_asked_and_atomically(tmp_path, monkeypatch):
    config = GPTConfig.from_preset("tiny")
    state = _state(config)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"mine")
    with pytest.raises(GPT2LabError, match="exists; pass --overwrite"):
        export_gguf(path, config, state, gpt2_bpe(), "f32")
    assert path.read_bytes() == b"mine"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(GPT2LabError, match="No space left"):
        export_gguf(path, config, state, gpt2_bpe(), "f32", overwrite=True)
    assert path.read_bytes() == b"mine" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    monkeypatch.undo()
    export_gguf(path, config, state, gpt2_bpe(), "q8_0", overwrite=True)
    assert gguf.GGUFReader(path).tensors


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    config = GPTConfig.from_preset("tiny")
    with pytest.raises(GPT2LabError, match=r"pip install 'gpt2lab\[gguf\]'"):
        export_gguf(tmp_path / "m.gguf", config, _state(config), gpt2_bpe())


def test_cli_exports_gguf_and_refuses_to_overwrite(tmp_path):
    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("tiny", pos_encoding="rope", n_kv_head=2)).save_pretrained(tmp_path / "m")
    cmd = [sys.executable, "-m", "gpt2lab", "export", "--model", str(tmp_path / "m"), "--format", "gguf"]
    run = lambda *a: subprocess.run([*cmd, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    ok = run("--out", str(tmp_path / "m.gguf"), "--type", "q8_0")
    assert ok.returncode == 0, ok.stderr
    assert "'starcoder2'" in ok.stdout and "Q8_0" in ok.stdout
    again = run("--out", str(tmp_path / "m.gguf"))
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--overwrite" in again.stderr
    wrong = run("--out", str(tmp_path / "x.gguf"), "--dtype", "bfloat16")
    assert wrong.returncode == 2 and "--type" in wrong.stderr
    assert run("--out", str(tmp_path / "m.gguf"), "--overwrite").returncode == 0
    assert gguf.GGUFReader(tmp_path / "m.gguf").tensors[1].tensor_type == gguf.GGMLQuantizationType.F32


LLAMA_CPP_VARIANTS = {
    "gpt2-padded": (dict(vocab_size=50304), "bpe"),
    "gpt2-gqa": (dict(n_kv_head=2), "bpe"),
    "starcoder2-gqa": (dict(pos_encoding="rope", n_kv_head=2, rope_theta=5000.0), "bpe"),
    "starcoder2-chars": (dict(pos_encoding="rope"), "chars"),
}


@pytest.mark.parametrize("variant", LLAMA_CPP_VARIANTS)
def test_llama_cpp_tokenizes_and_computes_like_gpt2lab(tmp_path, variant):
    """The strongest check: llama.cpp itself loads the file, tokenizes as gpt2lab does and computes its logits."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp)"
    )
    overrides, kind = LLAMA_CPP_VARIANTS[variant]
    tokenizer = CharTokenizer("".join(sorted(set(TEXT)))) if kind == "chars" else gpt2_bpe()
    config = GPTConfig.from_preset("tiny", **{"vocab_size": tokenizer.n_vocab, **overrides})
    # Sharper attention than an initialised model's near-uniform one, so that positions matter: a RoPE base
    # off by 2x then moves these logits by ~0.16, far past the tolerance.
    state = {k: v * 8 if k.endswith("c_attn.weight") else v for k, v in _state(config).items()}
    export_gguf(tmp_path / "m.gguf", config, state, tokenizer, "f32")
    f32_cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # llama.cpp's default: f16
    llm = llama_cpp.Llama(
        model_path=str(tmp_path / "m.gguf"), n_ctx=128, n_threads=1, logits_all=True, verbose=False, **f32_cache
    )
    ids = llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False)
    assert ids == tokenizer.encode_ordinary(TEXT)
    assert llm.detokenize(ids).decode("utf-8") == TEXT
    model = GPT(config).eval()
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]})
    llm.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(np.array(llm.scores[: len(ids)]), expected, atol=1e-3, rtol=0)
