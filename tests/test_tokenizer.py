import pytest

from production.data.tokenizer import get_tokenizer

SAMPLES = [
    "hello world",
    "Hello, World!",
    " leading space",
    "naïve café — “quotes” 😀",
    "1234567 + 89 = ?",
    "line one\n\nline two\r\n\ttabbed",
    "'s 't 're 've 'm 'll 'd",
    "<|endoftext|> is text here",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
]


def test_known_ids():
    tok = get_tokenizer()
    assert tok.encode("hello world") == [31373, 995]
    assert (tok.eot_id, tok.vocab_size) == (50256, 50257)


@pytest.mark.parametrize("text", SAMPLES)
def test_ids_equal_tiktoken_gpt2_and_round_trip(tiktoken_gpt2, text):
    tok = get_tokenizer()
    assert tok.encode(text) == tiktoken_gpt2.encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == text


def test_special_token_text_is_never_eot():
    assert 50256 not in get_tokenizer().encode("<|endoftext|>")
