"""The GPT-2 BPE, against transformers' GPT2Tokenizer built from the same OpenAI files."""

from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lab import load_tokenizer
from gpt2lab.tokenizer import bpe_files


def test_known_ids():
    tok = load_tokenizer()
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tok.eot_token == 50256
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tok.n_vocab == 50257
    assert tok.decode([15496, 11, 995, 0]) == "Hello, world!"


def test_tinyshakespeare_ids_equal_the_reference(shared_data):
    from transformers import GPT2Tokenizer

    vocab_bpe, encoder_json = bpe_files()
    reference = GPT2Tokenizer(vocab=encoder_json, merges=vocab_bpe)
    assert reference.encode("Hello, world!") == [15496, 11, 995, 0]  # the reference really tokenizes
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ours = load_tokenizer().encode_ordinary(text)
    theirs = reference.encode(text)
    assert len(ours) > 300_000
    assert ours == theirs


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_encode_roundtrip_arbitrary_unicode(text):
    tok = load_tokenizer()
    assert tok.decode(tok.encode_ordinary(text)) == text
