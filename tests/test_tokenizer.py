import hashlib
import shutil

import pytest
import tiktoken

from production.tokenizer import get_tokenizer, gpt2_files

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


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken's own get_encoding("gpt2"), offline: its cache is filled with the locally installed files under
    the names of the URLs it would download (tiktoken checks their sha256 on read)."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for path in gpt2_files():
        shutil.copy(path, cache / hashlib.sha1((base + path.name).encode()).hexdigest())
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    tiktoken.registry.ENCODINGS.pop("gpt2", None)
    enc = tiktoken.get_encoding("gpt2")
    yield enc
    tiktoken.registry.ENCODINGS.pop("gpt2", None)
    mp.undo()


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
